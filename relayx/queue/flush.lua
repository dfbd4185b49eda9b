-- flush.lua: deliver a domain's queue now: end its wait for a failing
-- destination and bring its deferred jobs back to their place in the queue.
--
-- KEYS[1]  <p>:dom:<domain>  domain state (see common.lua)
-- KEYS[2]  <p>:paused        zset domain -> paused_until
-- KEYS[3]  <p>:deferred      zset jid -> due time
-- KEYS[4]  <p>:ready:<domain>
-- KEYS[5]  <p>:domains
-- KEYS[6]  <p>:audit
-- ARGV[1]  key prefix <p>
-- ARGV[2]  domain (a delivery queue: example.org or example.org#1)
-- ARGV[3]  the audit record (JSON)
-- ARGV[4]  how many audit records to keep
-- Returns the number of deferred jobs brought back.
--
-- Invariant: as in enqueue.lua (a job leaves deferred only for ready); a
-- hold is not touched: flushing a held domain queues its mail for release.

local prefix, domain = ARGV[1], ARGV[2]
redis.call('HDEL', KEYS[1], 'paused_until', 'failures')
redis.call('ZREM', KEYS[2], domain)
local moved = 0
for _, jid in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local job = prefix .. ':job:' .. jid
  local d, seq = unpack(redis.call('HMGET', job, 'domain', 'seq'))
  if d == domain then
    redis.call('ZREM', KEYS[3], jid)
    redis.call('ZADD', KEYS[4], seq, jid)
    moved = moved + 1
  end
end
if redis.call('ZCARD', KEYS[4]) > 0 then redis.call('SADD', KEYS[5], domain) end
audit(KEYS[6], ARGV[3], ARGV[4])
return moved
