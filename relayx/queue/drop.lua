-- drop.lua: take a message out of the queue for an operator: delete it, or
-- bounce it (its undelivered recipients fail, and the bouncer sends the DSN).
--
-- KEYS[1]  <p>:job:<qid>.1  the message's hash (msg_key, common.lua: or <p>:msg:<qid>)
-- KEYS[2]  <p>:leased
-- KEYS[3]  <p>:deferred
-- KEYS[4]  <p>:failed    zset jid -> time, jobs waiting for their DSN
-- KEYS[5]  <p>:delayed
-- KEYS[6]  <p>:audit
-- ARGV[1]  key prefix <p>
-- ARGV[2]  queue id
-- ARGV[3]  now (ms)
-- ARGV[4]  "delete" or "bounce"
-- ARGV[5]  the audit record (JSON; "" in a bulk action's steps)
-- ARGV[6]  how many audit records to keep
-- Returns the number of jobs dropped (0: no such message).
--
-- Invariant: as in enqueue.lua. A job being delivered loses its lease token, so
-- the node delivering it cannot settle it (renew and settle refuse it); a
-- bounced job goes to <p>:failed with every recipient still owed as failed.
-- Jobs move through move()/retire_job() (common.lua), which keep the counters.
-- Each job's end (bounced or deleted, with the recipients still owed) goes to
-- its domain's event log (record_event, common.lua) in the same step.
--
-- Cost bound: O(1) keys per job of the one message (its domains and copies),
-- and one event log entry per job.

local prefix, qid, now, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local msg = msg_key(prefix, qid)
if redis.call('EXISTS', msg) == 0 then return 0 end
local jobs = message_jobs(prefix, qid)
for _, jid in ipairs(jobs) do
  local job = prefix .. ':job:' .. jid
  local domain, owed, failed = job_get(prefix, jid, 'domain', 'owed', 'failed')
  local from = location(prefix, jid, domain)
  redis.call('ZREM', KEYS[5], jid)
  local ended = 'deleted'
  if mode == 'bounce' then ended = 'bounced' end
  record_event(prefix, domain, qid, jid, now, ended, {'rcpts', owed})
  if mode == 'bounce' then
    local failures = cjson.decode(failed)
    for _, rcpt in ipairs(cjson.decode(owed)) do
      failures[#failures + 1] = {rcpt, 0, '5.0.0', 'returned to the sender by the postmaster'}
    end
    redis.call('HSET', job, 'owed', '[]', 'failed', cjson.encode(failures), 'finished', now)
    redis.call('HDEL', job, 'token', 'owner', 'expires')
    move(prefix, jid, domain, from, 'failed', now)
  else
    retire_job(prefix, jid, domain, from)
  end
end
if mode ~= 'bounce' and redis.call('EXISTS', msg) == 1 then
  -- jobs already gone left their message behind (only before counters): it goes too
  local size = message_size(msg)
  redis.call('DEL', msg)
  redis.call('HINCRBY', prefix .. ':totals', 'messages', -1)
  redis.call('HINCRBY', prefix .. ':totals', 'bytes', -size)
  redis.call('HINCRBY', prefix .. ':totals', 'v', 1)
end
audit(KEYS[6], ARGV[5], ARGV[6])
return #jobs
