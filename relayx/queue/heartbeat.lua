-- heartbeat.lua: a node says it is alive.
--
-- KEYS[1]  <p>:nodes        zset node id -> last heartbeat (ms)
-- KEYS[2]  <p>:node:<id>    hash: hostname, started, version, pid, seen
-- ARGV[1]  node id
-- ARGV[2]  now (ms)
-- ARGV[3]  how long a silent node stays listed (ms)
-- ARGV[4..] field, value pairs for the node's hash
--
-- Invariant: a node is listed while its last heartbeat is recent; the hash of a
-- node gone longer than that is removed with it.
-- Cost bound: two keys, plus the nodes gone silent.

local now, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'seen', now, unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], keep)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
return 1
