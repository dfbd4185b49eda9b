-- warn.lua: send a job's delay warning once, queueing the DSN in the same step.
--
-- KEYS[1]  <p>:delayed        zset of jobs due a delay warning
-- KEYS[2]  <p>:seq
-- KEYS[3]  <p>:domains
-- KEYS[4]  <p>:job:<dsn qid>.1  the warning's message hash (msg_key, common.lua)
-- ARGV[1]  key prefix
-- ARGV[2]  jid
-- ARGV[3]  now (ms)
-- ARGV[4]  the warning's queue id, or "" when none is due (null sender)
-- ARGV[5]  its body
-- ARGV[6]  its recipient (the original sender)
-- ARGV[7]  that recipient's domain
--
-- Invariant: as in enqueue.lua; a job leaves <p>:delayed once, with its warning
-- queued in the same step; the job itself goes on being retried. Returns 1, or 0
-- if another node already sent it.
--
-- Cost bound: O(1) keys (the warning's message and job, through enqueue_message).

if redis.call('ZREM', KEYS[1], ARGV[2]) == 0 then return 0 end
if ARGV[4] ~= '' then
  local r = enqueue_message(ARGV[1], KEYS[2], KEYS[3], KEYS[4], ARGV[4], tonumber(ARGV[3]), '', ARGV[5],
    {ARGV[7], cjson.encode({ARGV[6]})})
  if type(r) == 'table' and r.err then return r end
end
return 1
