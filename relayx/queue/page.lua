-- page.lua: one page of the jobs an operator lists or searches, in acceptance
-- order, from a cursor (reads only).
--
-- KEYS[1]  <p>:leased
-- KEYS[2]  <p>:deferred
-- KEYS[3]  <p>:failed
-- ARGV[1]  key prefix <p>
-- ARGV[2]  JSON array of delivery queues to look in (example.org, example.org#1, ...)
-- ARGV[3]  JSON filter, each optional:
--            exact: "recipient", "message_id" (lower case, without <>; from their index
--            buckets, each job checked), "sender" (address, "" for <>; examined job by job)
--            examined job by job: "sender_has", "recipient_has", "subject_has" (lower-case
--            substrings), "state" (ready held deferred in_flight failed), "before" and
--            "after" (ms: accepted before, at or after)
-- ARGV[4]  cursor: the acceptance sequence of the last job already seen (0: from the start)
-- ARGV[5]  most matches to return
-- ARGV[6]  most jobs to examine (the cost bound)
-- ARGV[7]  now (ms)
-- ARGV[8]  clock skew allowed between nodes (ms), for the age bounds
-- Returns JSON {"jobs": [{jid, qid, seq, domain, state, sender, subject, rcpts, owed,
-- created, attempts, error}, ...], "cursor": the last sequence examined, "more": whether
-- jobs past the cursor remain to be examined, "examined": n}.
--
-- Source: the index bucket of the Message-ID or recipient when one is given (plus
-- the key a previous version indexed that value under, while it exists: common.lua),
-- whose jobs are kept only if they have the value; else each queue's ready
-- seqset <p>:rq:<queue> (state ready or held) or its <p>:aq:<queue> (seqsets,
-- common.lua); all ordered by acceptance sequence and merged here. A sender is
-- matched job by job over the queues' order, like its parts: a bounded scan
-- driven by the cursor. Cost bound: at most ARGV[6] entries fetched (from a
-- seqset: at most one chunk more than entries, seqset_range) and jobs examined
-- (each a few O(1) and O(log n) reads; with a sender, its part, a Subject part
-- or a Message-ID, one HMGET of the message hash for a job that does not
-- match), plus, with an "after" bound on the first page, a binary search of
-- O(log n) reads per source (a seqset's: over its chunks, then within one); never a walk of
-- a queue. A page may hold fewer than ARGV[5] matches while "more" is true: the
-- caller continues from "cursor".
--
-- Invariant: none changed.

local prefix = ARGV[1]
local queues, filter = cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local cursor, limit, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, skew = tonumber(ARGV[7]), tonumber(ARGV[8])

local wanted = {}
for _, q in ipairs(queues) do wanted[q] = true end

local held = {}
local function is_held(queue)
  if held[queue] == nil then held[queue] = held_at(prefix .. ':dom:' .. base_domain(queue), now) end
  return held[queue]
end

-- where to look: a value's bucket, and the key a previous version indexed it
-- under while that exists (unless it is the bucket's own name)
local sources = {}
local function indexed(kind, value)
  local bucket = prefix .. ':ix:' .. kind .. ':' .. index_bucket(value)
  local legacy = prefix .. ':ix:' .. kind .. ':' .. value
  sources = {bucket}
  if legacy ~= bucket and redis.call('EXISTS', legacy) == 1 then sources[2] = legacy end
end
if filter.message_id then
  indexed('mid', filter.message_id)
elseif filter.recipient then
  indexed('rcpt', filter.recipient)
elseif filter.state == 'ready' or filter.state == 'held' then
  for _, q in ipairs(queues) do
    if is_held(q) == (filter.state == 'held') then sources[#sources + 1] = prefix .. ':rq:' .. q end
  end
else
  for _, q in ipairs(queues) do sources[#sources + 1] = prefix .. ':aq:' .. q end
end
-- the sources that are seqsets (the per-queue orders), not plain zsets (indexes)
local seqsets = {}
for _, q in ipairs(queues) do
  seqsets[prefix .. ':rq:' .. q], seqsets[prefix .. ':aq:' .. q] = true, true
end

-- an "after" bound on the first page: start at the first job accepted then,
-- found by bisection (acceptance order is time order, give or take the skew)
-- the rank in zset `key` of its first job created at or after t, and the
-- sequence of the job before it (0: none)
local function bisect(key, t)
  local low, high = 0, redis.call('ZCARD', key)
  while low < high do
    local mid = math.floor((low + high) / 2)
    local entry = redis.call('ZRANGE', key, mid, mid)
    local created = tonumber(job_get(prefix, entry[1], 'created') or '0')
    if created < t then low = mid + 1 else high = mid end
  end
  if low == 0 then return 0, 0 end
  local before = redis.call('ZRANGE', key, low - 1, low - 1, 'WITHSCORES')
  return low, tonumber(before[2])
end

-- a seqset's: the first chunk whose first job is created at or after t (by
-- bisection over the directory: each probe the chunk's first job), then within
-- the chunk before it, which holds the answer
local function first_after(key, t)
  if not seqsets[key] then
    local _, seq = bisect(key, t)
    return seq
  end
  local low, high = 0, redis.call('ZCARD', key)
  while low < high do
    local mid = math.floor((low + high) / 2)
    local n = redis.call('ZRANGE', key, mid, mid)[1]
    local entry = redis.call('ZRANGE', key .. ':' .. n, 0, 0)
    local created = tonumber((entry[1] and job_get(prefix, entry[1], 'created')) or '0')
    if created < t then low = mid + 1 else high = mid end
  end
  if low == 0 then return 0 end
  local _, seq = bisect(key .. ':' .. redis.call('ZRANGE', key, low - 1, low - 1)[1], t)
  return seq
end

-- up to `per` entries of a source past sequence `from`: {{jid, seq}, ...}
local function fetch(key, from, per)
  if seqsets[key] then return seqset_range(key, from, per) end
  local got, out = redis.call('ZRANGEBYSCORE', key, '(' .. from, '+inf', 'WITHSCORES', 'LIMIT', 0, per), {}
  for i = 1, #got, 2 do out[#out + 1] = {got[i], tonumber(got[i + 1])} end
  return out
end

-- fetch up to `per` entries past the cursor from each source and merge them;
-- only entries up to the horizon (the lowest last sequence of a source that
-- gave a full batch) are certain to be in order with what was not fetched
-- with nothing to check job by job, a source never needs more than `limit`
-- (a bucket holds other values' jobs: an exact filter is always checked)
local checks = filter.sender_has or filter.recipient_has or filter.subject_has or filter.before
  or filter.after or filter.sender or filter.recipient or filter.message_id
  or (filter.state and filter.state ~= 'ready' and filter.state ~= 'held')
local per = math.max(1, math.floor(budget / math.max(1, #sources)))
if not checks then per = math.min(per, limit) end
local entries, horizon = {}, nil
for _, key in ipairs(sources) do
  local from = cursor
  if filter.after and cursor == 0 then from = first_after(key, filter.after - skew) end
  local got = fetch(key, from, per)
  for _, entry in ipairs(got) do entries[#entries + 1] = entry end
  if #got == per then
    local last = got[#got][2]
    if horizon == nil or last < horizon then horizon = last end
  end
end
table.sort(entries, function(a, b) return a[2] < b[2] end)

local function lower(s) return string.lower(s or '') end
local function state_of(jid, queue)
  if redis.call('ZSCORE', KEYS[1], jid) then return 'in_flight' end
  if redis.call('ZSCORE', KEYS[2], jid) then return 'deferred' end
  if redis.call('ZSCORE', KEYS[3], jid) then return 'failed' end
  return is_held(queue) and 'held' or 'ready'
end

local found, examined, last, stop = {}, 0, cursor, false
for _, entry in ipairs(entries) do
  local jid, seq = entry[1], entry[2]
  if horizon and seq > horizon then break end
  if #found >= limit then break end
  examined = examined + 1
  last = seq
  -- the sender, its part, a Subject part or the Message-ID is looked at first, in
  -- the message hash (its queue id is the job id's, enqueue_message): a scan that
  -- matches rarely reads one small hash per job, not two
  local sender, subject
  local ok = true
  local first = filter.sender or filter.sender_has or filter.subject_has or filter.message_id
  if first then
    local mid
    sender, subject, mid = unpack(redis.call('HMGET', msg_key(prefix, job_qid(jid)), 'sender', 'subject', 'mid'))
    if filter.sender and lower(sender) ~= filter.sender then ok = false end
    if filter.message_id and (mid or '') ~= filter.message_id then ok = false end
    if filter.sender_has and not string.find(lower(sender), filter.sender_has, 1, true) then ok = false end
    if filter.subject_has and not string.find(lower(subject), filter.subject_has, 1, true) then ok = false end
  end
  local domain, qid, rcpts, owed, created, attempts, err
  if ok then
    domain, qid, rcpts, owed, created, attempts, err = job_get(prefix, jid,
      'domain', 'qid', 'rcpts', 'owed', 'created', 'attempts', 'error')
  end
  created = tonumber(created or '0')
  ok = ok and domain ~= nil and wanted[domain]
  if ok and filter.before and created >= filter.before then
    ok = false
    -- past the bound by more than the skew: nothing later can match
    if created >= filter.before + skew then stop = true; break end
  end
  if ok and filter.after and created < filter.after then ok = false end
  -- a recipient's bucket holds other recipients' jobs: the job must have it
  if ok and filter.recipient then
    local has = false
    for _, rcpt in ipairs(cjson.decode(rcpts)) do
      if string.lower(rcpt) == filter.recipient then has = true; break end
    end
    ok = has
  end
  local state
  if ok and filter.state then
    state = state_of(jid, domain)
    ok = state == filter.state
  end
  if ok and filter.recipient_has and not string.find(lower(rcpts), filter.recipient_has, 1, true) then ok = false end
  if ok and not first then
    sender, subject = unpack(redis.call('HMGET', msg_key(prefix, qid), 'sender', 'subject'))
  end
  if ok then
    found[#found + 1] = {jid = jid, qid = qid, seq = seq, domain = domain, state = state or state_of(jid, domain),
      sender = sender or '', subject = subject or '', rcpts = cjson.decode(rcpts), owed = cjson.decode(owed),
      created = created, attempts = tonumber(attempts or '0'), error = err or ''}
  end
end

-- more remains when a source was cut short, or when this page stopped early
local more = not stop and (horizon ~= nil or examined < #entries)
return cjson.encode({jobs = found, cursor = last, more = more, examined = examined})
