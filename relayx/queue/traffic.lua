-- traffic.lua: add to the counters of jobs accepted and jobs delivered, for
-- the history's per-minute rates (relayx/ops/history.py reads the counters
-- each minute; a rate is the difference of two readings). Each process counts
-- in memory and adds its counts here about once a second.
--
-- KEYS[1]  <p>:accepted    hash queue -> jobs accepted through SMTP since the counters began; '*': all queues
-- KEYS[2]  <p>:delivered   hash queue -> jobs delivered in full (every recipient took it); '*': all queues
-- ARGV     triples: 'accepted' or 'delivered', a queue, how many jobs
--
-- Cost bound: two field increments per triple (a process sends at most two
-- per queue it saw a job of since its last call).
-- Invariant: the counters only grow. A queue is counted in <p>:delivered
-- (field and '*') only when <p>:accepted has it, so DSN jobs to senders'
-- domains are not counted and both hashes have no more fields than the
-- queues that ever took mail.

for i = 1, #ARGV, 3 do
  local accepted, queue, n = ARGV[i] == 'accepted', ARGV[i + 1], tonumber(ARGV[i + 2])
  if accepted or redis.call('HEXISTS', KEYS[1], queue) == 1 then
    local key = accepted and KEYS[1] or KEYS[2]
    redis.call('HINCRBY', key, queue, n)
    redis.call('HINCRBY', key, '*', n)
  end
end
return 1
