-- enqueue.lua: commit one accepted message and its delivery jobs, all or nothing.
--
-- KEYS[1]  <p>:seq         acceptance sequence (INCR), orders each domain's queue
-- KEYS[2]  <p>:domains     set of domains that have ready jobs
-- KEYS[3]  <p>:job:<qid>.1 the message hash (sender, body, received, jobs): its first job's (msg_key, common.lua)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  queue id <qid>
-- ARGV[3]  now, milliseconds since the epoch
-- ARGV[4]  sender ("" for the null reverse-path)
-- ARGV[5]  body, as stored
-- ARGV[6]  the header's Message-ID (lower case, without <>; "" if none), for search
-- ARGV[7]  the header's Subject ("" if none), for search
-- ARGV[8]  deadline (ms since the epoch, by Redis's clock; 0: none): an enqueue that runs
--          later was given up by its node (which answered 451) and is refused
-- ARGV[9]  the envelope's DSN parameters (JSON: ret, envid, rcpts), "" when none were given
-- ARGV[10], ARGV[11], ...  pairs of destination domain and its recipients (JSON array)
--
-- A queue id that abort.lua took back (<p>:aborted:<qid>) is refused, so an
-- enqueue still in flight when its node gave up (and answered 451) never lands.
--
-- Invariant: every job hash <p>:job:<jid> is in exactly one of <p>:ready:<domain>,
-- <p>:deferred, <p>:leased (and <p>:inflight:<domain>) or <p>:failed, and the
-- message's "jobs" field counts the job hashes that still exist. A job records
-- its domain's held time at acceptance (held_base), so that time held later
-- does not count against its retention. Each job enters through add_job
-- (common.lua), which keeps the counters, its queue's <p>:q:<queue> and the
-- search indexes, and the totals. Each job's acceptance is recorded in its
-- domain's event log (record_event, common.lua) in the same step.
--
-- Cost bound: O(1) keys per destination queue of the message (its domains and
-- their copies) plus one per recipient, plus one event log entry per job (its
-- domain's stream: O(1) keys); O(log n) writes; independent of the depth.
-- Per-domain keys are built from the prefix: standalone or Sentinel Redis, not Redis Cluster.

local deadline = tonumber(ARGV[8])
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then
    return redis.error_reply('LATE enqueue of ' .. ARGV[2] .. ' ran after its deadline; its node answered 451')
  end
end
local pairs_ = {}
for i = 10, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
local njobs = enqueue_message(ARGV[1], KEYS[1], KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5],
  pairs_, ARGV[6], ARGV[7])
if type(njobs) == 'table' then return njobs end  -- the queue id is taken or was taken back
if ARGV[9] ~= '' then redis.call('HSET', KEYS[3], 'dsn', ARGV[9]) end
local size = tostring(body_size(ARGV[5]))
for i = 1, #pairs_ / 2 do
  record_event(ARGV[1], pairs_[2 * i - 1], ARGV[2], ARGV[2] .. '.' .. i, tonumber(ARGV[3]), 'accepted',
    {'sender', ARGV[4], 'rcpts', pairs_[2 * i], 'mid', ARGV[6] or '', 'subject', ARGV[7] or '', 'size', size})
end
return njobs
