-- abort.lua: take back a message whose enqueue was not confirmed (no reply in
-- time, a lost connection, fewer replicas than durability asks), so that the
-- 451 its sender gets leaves no copy that could be delivered later.
--
-- KEYS[1]  <p>:job:<qid>.1  the message's hash (msg_key, common.lua: or <p>:msg:<qid>)
-- KEYS[2]  <p>:aborted:<qid>   tombstone: an enqueue of <qid> arriving after this one
--                              (still in flight when the node gave up) is refused
-- ARGV[1]  key prefix <p>
-- ARGV[2]  queue id
-- ARGV[3]  how long the tombstone lasts (ms)
-- Returns "aborted" (no copy remains and none can arrive later), or "taken": a
-- job of the message was already leased or finished, so it is being or has been
-- delivered and its sender must get 250 (a 451 would have it sent twice). A
-- message whose jobs have all finished is known by <p>:done:<qid> (retire_job,
-- common.lua).
--
-- Invariant: as in enqueue.lua; jobs leave through retire_job (common.lua),
-- which keeps the counters and indexes. A message is either wholly queued or
-- wholly gone. A message taken back was never accepted: its jobs' "withdrawn"
-- events (record_event, common.lua) take it out of the report.
-- Cost bound: O(1) keys per job of the one message (its domains and copies),
-- and one event log entry per job.

local prefix, qid = ARGV[1], ARGV[2]
local done = prefix .. ':done:' .. qid
local msg = msg_key(prefix, qid)
if redis.call('EXISTS', msg) == 0 then
  -- taken back already (this is a retry), or never landed: 'aborted'; landed,
  -- and delivered (or bounced) before this ran: 'taken'
  if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', done) == 1 then return 'taken' end
  redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
  return 'aborted'
end
local jobs = message_jobs(prefix, qid)
if #jobs < message_njobs(prefix, qid, msg) then return 'taken' end
for _, jid in ipairs(jobs) do
  if tonumber(job_get(prefix, jid, 'attempts') or '0') > 0 then return 'taken' end
end
local received = tonumber(redis.call('HGET', msg, 'received') or '0')
for _, jid in ipairs(jobs) do
  local domain = job_get(prefix, jid, 'domain')
  record_event(prefix, domain, qid, jid, received, 'withdrawn', {})
  retire_job(prefix, jid, domain, location(prefix, jid, domain))
end
redis.call('DEL', done)  -- retire_job remembered it as gone through the queue: it was not
redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
return 'aborted'
