-- renew.lua: extend a lease that is still current.
--
-- KEYS[1]  <p>:job:<jid>
-- KEYS[2]  <p>:leased
-- KEYS[3]  <p>:inflight:<domain>
-- ARGV[1]  jid
-- ARGV[2]  the lease's fencing token
-- ARGV[3]  new expiry (ms)
--
-- Invariant: only the holder of the current token moves the expiry; a stale
-- token (the job was reclaimed and leased again, or finished) gets STALE.
-- The job stays in flight: no counter changes.
-- Cost bound: three keys.

if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then
  return redis.error_reply('STALE lease token')
end
redis.call('HSET', KEYS[1], 'expires', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return ARGV[3]
