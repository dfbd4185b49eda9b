-- requeue.lua: give a message's recipients another try now: its deferred jobs,
-- and the recipients of failed jobs whose DSN has not been sent yet, go back
-- to their place in their domain's queue with a fresh retry count.
--
-- KEYS[1]  <p>:job:<qid>.1  the message's hash (msg_key, common.lua: or <p>:msg:<qid>)
-- KEYS[2]  <p>:deferred
-- KEYS[3]  <p>:failed
-- KEYS[4]  <p>:domains
-- KEYS[5]  <p>:audit
-- ARGV[1]  key prefix <p>
-- ARGV[2]  queue id
-- ARGV[3]  the audit record (JSON; "" in a bulk action's steps)
-- ARGV[4]  how many audit records to keep
-- Returns the number of jobs requeued.
--
-- Invariant: as in enqueue.lua; recipients already accepted by the destination
-- are never owed again, only those deferred or failed. Jobs move through
-- move() (common.lua), which keeps the counters. Failed recipients owed again
-- are "requeued" in the domain's event log (record_event, common.lua; at
-- Redis's clock, as this script is given no time).
--
-- Cost bound: O(1) keys per job of the one message (its domains and copies),
-- and one event log entry per failed job.

local prefix, qid = ARGV[1], ARGV[2]
if redis.call('EXISTS', msg_key(prefix, qid)) == 0 then return 0 end
local moved = 0
for _, jid in ipairs(message_jobs(prefix, qid)) do
  local job = prefix .. ':job:' .. jid
  local domain, seq, owed, failed = job_get(prefix, jid, 'domain', 'seq', 'owed', 'failed')
  local from = location(prefix, jid, domain)
  if from == 'failed' then
    local again = cjson.decode(owed)
    for _, entry in ipairs(cjson.decode(failed)) do again[#again + 1] = entry[1] end
    redis.call('HSET', job, 'owed', cjson.encode(again))
    redis.call('HDEL', job, 'finished', 'failed')
    local t = redis.call('TIME')
    record_event(prefix, domain, qid, jid, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'requeued',
      {'rcpts', cjson.encode(again)})
  end
  if from == 'failed' or from == 'deferred' then
    redis.call('HDEL', job, 'attempts')
    move(prefix, jid, domain, from, 'ready', seq)
    moved = moved + 1
  end
end
audit(KEYS[5], ARGV[3], ARGV[4])
return moved
