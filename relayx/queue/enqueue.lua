-- enqueue.lua: commit one accepted message and its delivery jobs, all or nothing.
--
-- KEYS[1]  <p>:seq         acceptance sequence (INCR), orders each domain's queue
-- KEYS[2]  <p>:domains     set of domains that have ready jobs
-- KEYS[3]  <p>:msg:<qid>   the message hash (sender, body, received, jobs)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  queue id <qid>
-- ARGV[3]  now, milliseconds since the epoch
-- ARGV[4]  sender ("" for the null reverse-path)
-- ARGV[5]  body, as stored
-- ARGV[6], ARGV[7], ...  pairs of destination domain and its recipients (JSON array)
--
-- Invariant: every job hash <p>:job:<jid> is in exactly one of <p>:ready:<domain>,
-- <p>:deferred, <p>:leased (and <p>:inflight:<domain>) or <p>:failed, and the
-- message's "jobs" field counts the job hashes that still exist. A job records
-- its domain's held time at acceptance (held_base), so that time held later
-- does not count against its retention.
-- Per-domain keys are built from the prefix: standalone or Sentinel Redis, not Redis Cluster.

local prefix, qid, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then
  return redis.error_reply('DUPLICATE queue id ' .. qid)
end
local njobs = (#ARGV - 5) / 2
redis.call('HSET', KEYS[3], 'sender', ARGV[4], 'body', ARGV[5], 'received', now, 'jobs', njobs)
for i = 1, njobs do
  local domain, rcpts = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
  local jid = qid .. '.' .. i
  local seq = redis.call('INCR', KEYS[1])
  local _, held_base = held_clock(prefix .. ':dom:' .. domain, now)
  redis.call('HSET', prefix .. ':job:' .. jid,
    'qid', qid, 'domain', domain, 'rcpts', rcpts, 'owed', rcpts, 'failed', '[]',
    'seq', seq, 'created', now, 'held_base', held_base, 'attempts', 0, 'token', 0)
  redis.call('ZADD', prefix .. ':ready:' .. domain, seq, jid)
  redis.call('SADD', KEYS[2], domain)
end
return njobs
