-- tally.lua: one bounded step of a consistency check (check_queue in redis.py):
-- recount a slice of one zset, and with repair, mend what the slice shows.
--
-- KEYS[1]  the zset walked: <p>:ready:<q>, <p>:leased, <p>:deferred or <p>:failed
--          (kind "ready", "in_flight", "deferred", "failed": a location, see
--          common.lua), <p>:q:<q> (kind "index"), or <p>:inflight:<q> or
--          <p>:deferred:<q> (kind "pair": a per-queue copy of KEYS[2])
-- KEYS[2]  for kind "pair": the location it copies (<p>:leased or <p>:deferred)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  kind
-- ARGV[3]  offset (index of the first entry; the caller's cursor)
-- ARGV[4]  most entries to look at
-- ARGV[5]  "1" to repair, "0" to look only
-- ARGV[6]  for "ready", "index" and "pair": the queue
-- Returns JSON {"seen": entries looked at, "removed": entries taken out of KEYS[1]
-- (the caller's cursor moves back by as many), "queues": {queue: [jobs, bytes,
-- messages, message bytes]} for the jobs counted in this location (a message is
-- counted with its first job that still exists), "busy": {queue: {recipient: n}}
-- (kinds "in_flight" and "deferred": the jobs' recipients, lower case, as
-- common.lua's <p>:busy:<q> counts them), "problems": {name: n}}.
--
-- Problems: "stale" (an entry whose job is gone, or of another queue), "twice"
-- (a job also in a location that comes first in job_state's order), "unindexed"
-- (a job missing from its queue's <p>:q:<q>), "unpaired" (in <p>:leased or
-- <p>:deferred but not in its queue's copy). Repair takes stale and twice
-- entries out of KEYS[1] and adds missing index and copy entries; counters are
-- set apart (recount.lua), only if the queue did not change meanwhile.
--
-- Invariant: without repair, none changed; with it, every job is in exactly one
-- location and in the indexes of its queue (common.lua).
-- Cost bound: ARGV[4] entries (the caller passes 100 by default), each about five
-- O(1) or O(log n) reads: ~1,000 keys, whatever the depth.

local prefix, kind, offset, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local repair, only = ARGV[5] == '1', ARGV[6]
local queues, busy, problems, removed = {}, {}, {}, 0
local function problem(name) problems[name] = (problems[name] or 0) + 1 end
local function drop(jid)
  if repair then
    redis.call('ZREM', KEYS[1], jid)
    removed = removed + 1
  end
end
local copies = {in_flight = ':inflight:', deferred = ':deferred:'}

local entries = redis.call('ZRANGE', KEYS[1], offset, offset + count - 1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local jid, score = entries[i], entries[i + 1]
  local job = prefix .. ':job:' .. jid
  local domain, qid, seq = job_get(prefix, jid, 'domain', 'qid', 'seq')
  if not domain or (only ~= '' and domain ~= only) then
    problem('stale')
    drop(jid)
  elseif kind == 'index' then
    -- nothing more: the job exists and belongs here
  elseif kind == 'pair' then
    if not redis.call('ZSCORE', KEYS[2], jid) then
      problem('stale')
      drop(jid)
    end
  else
    local where = location(prefix, jid, domain)
    if where ~= kind then
      problem('twice')
      drop(jid)
    else
      if not redis.call('ZSCORE', prefix .. ':q:' .. domain, jid) then
        problem('unindexed')
        if repair then redis.call('ZADD', prefix .. ':q:' .. domain, seq, jid) end
      end
      local copy = copies[kind]
      if copy and not redis.call('ZSCORE', prefix .. copy .. domain, jid) then
        problem('unpaired')
        if repair then redis.call('ZADD', prefix .. copy .. domain, score, jid) end
      end
      local msg = msg_key(prefix, qid)
      local size = message_size(msg)
      -- the message is counted with its first job that still exists
      local first = 1
      local own = tonumber(string.sub(jid, #qid + 2)) or 1
      for n = 1, own - 1 do
        if job_exists(prefix, qid .. '.' .. n) then
          first = 0
          break
        end
      end
      local t = queues[domain] or {0, 0, 0, 0}
      queues[domain] = {t[1] + 1, t[2] + size, t[3] + first, t[4] + size * first}
      if BUSY[kind] then
        local b = busy[domain] or {}
        for _, rcpt in ipairs(cjson.decode(redis.call('HGET', job, 'rcpts') or '[]')) do
          b[string.lower(rcpt)] = (b[string.lower(rcpt)] or 0) + 1
        end
        busy[domain] = b
      end
    end
  end
end
return cjson.encode({seen = #entries / 2, removed = removed, queues = queues, busy = busy, problems = problems})
