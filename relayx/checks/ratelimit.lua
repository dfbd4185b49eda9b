-- ratelimit.lua: count one event of a client in a sliding window, for the whole cluster.
--
-- KEYS[1]  <p>:rate:<kind>:<client>   zset of events, scored by time (ms)
-- ARGV[1]  now (ms)
-- ARGV[2]  the window (ms)
-- ARGV[3]  this event's id (unique)
--
-- Invariant: the zset holds exactly the events of the last window; it expires
-- with the window when the client goes quiet. Returns how many events the
-- window holds, this one included.

local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return redis.call('ZCARD', KEYS[1])
