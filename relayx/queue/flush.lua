-- flush.lua: deliver a domain's queue now: end its wait for a failing
-- destination and bring its deferred jobs back to their place in the queue,
-- one bounded batch per call (the caller calls again while some remain).
--
-- KEYS[1]  <p>:dom:<domain>      domain state (see common.lua)
-- KEYS[2]  <p>:paused            zset domain -> paused_until
-- KEYS[3]  <p>:deferred:<domain> the queue's deferred jobs, jid -> due time
-- KEYS[4]  <p>:rq:<domain>      the queue's ready jobs (a seqset, common.lua)
-- KEYS[5]  <p>:domains
-- KEYS[6]  <p>:audit
-- ARGV[1]  key prefix <p>
-- ARGV[2]  domain (a delivery queue: example.org or example.org#1)
-- ARGV[3]  the audit record (JSON; "" for the batches after the first)
-- ARGV[4]  how many audit records to keep
-- ARGV[5]  most deferred jobs to bring back in this call
-- Returns {jobs brought back, deferred jobs left in the queue}.
--
-- Invariant: as in enqueue.lua (a job leaves deferred only for ready, through
-- move() in common.lua, which keeps the counters); a hold is not touched:
-- flushing a held domain queues its mail for release.
--
-- Cost bound: ARGV[5] jobs (each O(1) keys, O(log n) writes), whatever the depth.

local prefix, domain, batch = ARGV[1], ARGV[2], tonumber(ARGV[5])
redis.call('HDEL', KEYS[1], 'paused_until', 'failures')
redis.call('ZREM', KEYS[2], domain)
local moved = 0
for _, jid in ipairs(redis.call('ZRANGE', KEYS[3], 0, batch - 1)) do
  local seq = redis.call('HGET', prefix .. ':job:' .. jid, 'seq')
  if seq then
    move(prefix, jid, domain, 'deferred', 'ready', seq)
    moved = moved + 1
  else
    redis.call('ZREM', KEYS[3], jid)  -- a stale entry: no job behind it
  end
end
audit(KEYS[6], ARGV[3], ARGV[4])
return {moved, redis.call('ZCARD', KEYS[3])}
