-- traffic.lua: count the jobs accepted and the jobs delivered, for the
-- history's per-minute rates (relayx/ops/history.py reads the counters each
-- minute; a rate is the difference of two readings).
--
-- KEYS[1]  <p>:accepted    hash queue -> jobs accepted through SMTP since the counters began; '*': all queues
-- KEYS[2]  <p>:delivered   hash queue -> jobs delivered in full (every recipient took it); '*': all queues
-- ARGV[1]  'accepted' or 'delivered'
-- ARGV[2..] the queues, one job each
--
-- Cost bound: two field increments per queue named (at most the destination
-- domains of one message).
-- Invariant: the counters only grow. A queue is counted in <p>:delivered
-- (field and '*') only when <p>:accepted has it, so DSN jobs to senders'
-- domains are not counted and both hashes have no more fields than the
-- domains that ever took mail.

local accepted = ARGV[1] == 'accepted'
local key = accepted and KEYS[1] or KEYS[2]
for i = 2, #ARGV do
  if accepted or redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HINCRBY', key, ARGV[i], 1)
    redis.call('HINCRBY', key, '*', 1)
  end
end
return 1
