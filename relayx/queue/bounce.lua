-- bounce.lua: retire a job whose recipients failed, queueing its DSN in the same step.
--
-- KEYS[1]  <p>:failed        zset of failed jobs awaiting their DSN
-- KEYS[2]  <p>:job:<jid>     the failed job
-- KEYS[3]  <p>:job:<qid>.1   its message's hash (msg_key, common.lua)
-- KEYS[4]  <p>:seq
-- KEYS[5]  <p>:domains
-- KEYS[6]  <p>:job:<dsn qid>.1 the DSN's message hash
-- ARGV[1]  key prefix
-- ARGV[2]  jid
-- ARGV[3]  now (ms)
-- ARGV[4]  DSN queue id, or "" when no DSN is due (null sender: a DSN is never bounced)
-- ARGV[5]  DSN body
-- ARGV[6]  the DSN's recipient (the original sender)
-- ARGV[7]  the DSN recipient's domain
--
-- Invariant: as in enqueue.lua; a failed job leaves <p>:failed exactly once, with
-- its DSN queued in the same step, so a DSN is neither lost nor sent twice when
-- several nodes bounce at once. Returns 1, or 0 if another node already did.
-- The job leaves through retire_job (common.lua), which keeps the counters.
-- The DSN's queue id goes to the domain's event log (record_event, common.lua).
--
-- Cost bound: O(1) keys (the job, its message, the DSN's message and job, the event log).

if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
local domain = redis.call('HGET', KEYS[2], 'domain')
if not domain then
  redis.call('ZREM', KEYS[1], ARGV[2])  -- a stale entry: no job behind it
  return 0
end
local now = tonumber(ARGV[3])
if ARGV[4] ~= '' then
  local r = enqueue_message(ARGV[1], KEYS[4], KEYS[5], KEYS[6], ARGV[4], now, '', ARGV[5],
    {ARGV[7], cjson.encode({ARGV[6]})})
  if type(r) == 'table' and r.err then return r end
end
record_event(ARGV[1], domain, job_get(ARGV[1], ARGV[2], 'qid') or '', ARGV[2], now, 'dsn', {'dsn', ARGV[4]})
retire_job(ARGV[1], ARGV[2], domain, 'failed')
return 1
