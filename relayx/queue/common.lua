-- common.lua: helpers shared by the queue scripts; prepended to each script
-- that uses them when it is loaded (Redis 6 has no shared script functions).
--
-- Job states, defined once here. While its hash <p>:job:<jid> exists, a job of
-- delivery queue <q> ("example.org", or "example.org#1" for a copy destination)
-- is in exactly one LOCATION, and only move() below changes which:
--   ready      seqset <p>:rq:<q> (below)            by acceptance seq (and <q> in <p>:domains)
--   in_flight  <p>:leased and <p>:inflight:<q>      score: lease expiry (ms)
--   deferred   <p>:deferred and <p>:deferred:<q>    score: when its retry is due (ms)
--   failed     <p>:failed                           score: when it failed (waits for its DSN)
-- "held" is not a location but a property of the domain (held_at below): a
-- ready job of a held domain is held. Counts follow the same rule: while a
-- domain is held, its queues' ready count is reported as held and ready as 0
-- (cheap, and consistent with job_state; deferred and in-flight jobs of a held
-- domain keep their state). Mirrored once in Python by relayx.queue.states.
--
-- Counters, kept by move(), add_job() and retire_job() in the same step as the
-- change, so every reader's count is O(1) per queue:
--   <p>:count:<q>   hash: ready, in_flight, deferred, failed (jobs in each
--                   location), bytes (the sizes of its jobs' messages), v (how
--                   many changes so far: a repair's compare-and-set)
--   <p>:aq:<q>      seqset (below): every job of the queue, any location, in
--                   acceptance order (a search index too, below); its first is
--                   the queue's oldest job
--   <p>:queues      set of every queue that has had a job (and a count hash)
--   <p>:totals      hash: messages, bytes (each message once), jobs, v (changes)
--   <p>:busy:<q>    hash: recipient (lower case) -> how many of the queue's jobs
--                   for that recipient are in_flight or deferred (taken out of
--                   ready and not finished); a recipient at 0 has no field.
--                   claim.lua leases no job with a busy recipient, so each
--                   mailbox gets its mail in acceptance order while different
--                   mailboxes are delivered in parallel. Counted from the job's
--                   "rcpts" (all its recipients at the queue, never changed), so
--                   every increment has its decrement; a recipient already
--                   delivered of a deferred job stays busy until its retry.
-- A message's size is its "size" field (older messages: its body's length).
--
-- The hashes (small, for memory at depth: issue #14). A message's fields live in
-- the hash of its first job, <p>:job:<qid>.1 (msg_key below), next to that job's:
--   message  sender, body (or a body store's stub), received, jobs (its job hashes
--            that still exist), njobs (how many it had; absent: 1), size, mid,
--            subject, dsn
--   job      domain, rcpts, seq, and, written only when they differ from their
--            default (job_get below applies them): qid (absent: the jid before its
--            last "."), owed (absent: rcpts), failed (absent: "[]"), created
--            (absent: the message's received), held_base, attempts, token (absent:
--            0); while leased or after attempts: owner, expires, error, history,
--            pushbacks, warned, finished
-- No name is in both sets, so a reader of one ignores the other's fields. A
-- job exists while its hash has a "domain" (job_exists): the .1 hash outlives
-- its job while the message has other jobs (retire_job). Hashes written before
-- (every job field present, the message in a hash of its own) read the same.
--
-- The two per-queue orders (<p>:rq:<q>: ready, the claim order; <p>:aq:<q>:
-- every job, the listing order) are seqsets: an ordered set of job ids by
-- acceptance sequence (the job hash's "seq" field, global INCR of <p>:seq),
-- kept small at any depth. Members live in chunk zsets <base>:<start> (jid ->
-- seq) of at most SEQSET_CHUNK (128) members, so Redis keeps each
-- listpack-encoded (~21 B a member) under the default zset-max-listpack-entries
-- 128; the directory zset <base> lists the chunks (member: <start>, score:
-- start). Invariant: the chunks are non-empty and in the directory; a chunk's
-- members have sequences from its start up to (not including) the next
-- chunk's start. Chunks follow a queue's own jobs, not the global sequence, so
-- a queue whose jobs are spread thin among other queues' still fills them
-- (chunks of floor(seq / 128) would hold one job each at 100 busy queues:
-- ~190 B a job, measured). Only the seqset_* functions below touch them.
-- (Before: one zset each, <p>:q:<q> and <p>:ready:<q>, ~100 B a job at depth;
-- migrate.lua moves a queue written so.)
--
-- Domain state lives in the hash <p>:dom:<domain>:
--   paused_until, failures, last_error   destination failing (settle.lua, resume.lua)
--   pace_c, pace_r                        the adaptive pace (settle.lua): sessions, msg/s
--                                         (absent: the configured ceiling); pace_at, pace_cut_at,
--                                         pace_event (start/cut/ceiling), pace_why, pace_kind, pace_peak,
--                                         pace_step, pace_ss (in slow start); ok_w, ok_n, ok_r, ok_at (successes), rt_avg
--                                         (reply ms), busy_since (pushbacks since the last success),
--                                         pace_wait (no new lease before: a moment after a pushback)
--   held, held_since, held_ms             an operator's hold and the time held so far
--   hold_start, hold_end                  a scheduled hold (ms; 0 or absent: none)
--   release_rate                          messages/s while a released backlog drains
--   tokens, tokens_at                     the domain's token bucket
-- Invariant: held_ms only grows; a job's age for retention is its time in the
-- queue minus the time its domain was held since the job was accepted.

-- The domain a queue belongs to: "example.org#1", the first copy destination of
-- example.org (dual delivery), is held with example.org and ages with it.
local function base_domain(queue)
  return string.match(queue, '^([^#]+)')
end

-- The one definition of "held" for a reader (changes nothing): an operator's
-- hold not yet past its end, or a scheduled hold whose start has come and
-- whose end has not. held_clock below applies the same rule and records it.
-- Mirrored once in Python (relayx/queue/states.py).
local function held_at(dom, now)
  local s = redis.call('HMGET', dom, 'held', 'hold_start', 'hold_end')
  local start, stop = tonumber(s[2] or '0'), tonumber(s[3] or '0')
  if stop > 0 and stop <= now then return false end
  return s[1] == '1' or (start > 0 and start <= now)
end

-- The hash holding the message fields of `qid` (see the top): its first job's.
-- Upgrade path: a message written by the previous version has a hash of its own,
-- <p>:msg:<qid>, used for as long as it exists (one EXISTS); relayx/queue/redis.py
-- (RedisQueue.message_key) does the same.
local function msg_key(prefix, qid)
  local old = prefix .. ':msg:' .. qid
  if redis.call('EXISTS', old) == 1 then return old end
  return prefix .. ':job:' .. qid .. '.1'
end

-- The queue id of a job: its jid before the last "." (enqueue_message numbers them).
local function job_qid(jid)
  return string.match(jid, '^(.*)%.[^.]*$') or jid
end

-- The message's fields (see the top): the rest of a .1 hash is its job's.
local MESSAGE_FIELDS = {sender = true, body = true, received = true, jobs = true, njobs = true, size = true,
  mid = true, subject = true, dsn = true}

-- Whether job `jid` exists: its hash has a domain (the .1 hash also holds its
-- message's fields, which outlive the job while the message has other jobs).
local function job_exists(prefix, jid)
  return redis.call('HEXISTS', prefix .. ':job:' .. jid, 'domain') == 1
end

-- A job's fields that are not written while they have their default (see the top).
local JOB_DEFAULTS = {failed = '[]', held_base = '0', attempts = '0', token = '0'}

-- The job's fields named `...`, in order, with their defaults (see the top); all
-- nil when the job does not exist. Every script reads a job's fields through this
-- (the defaults are defined here once). Cost: one HMGET, plus one HGET for a
-- defaulted owed and an EXISTS and HGET for a defaulted created.
local function job_get(prefix, jid, ...)
  local names = {...}
  local n = #names
  local key = prefix .. ':job:' .. jid
  local values = redis.call('HMGET', key, 'domain', ...)
  local out = {}
  if values[1] then
    for i = 1, n do
      local v, name = values[i + 1], names[i]
      if not v then
        if name == 'qid' then v = job_qid(jid)
        elseif name == 'owed' then v = redis.call('HGET', key, 'rcpts')
        elseif name == 'created' then v = redis.call('HGET', msg_key(prefix, job_qid(jid)), 'received')
        else v = JOB_DEFAULTS[name] end
      end
      out[i] = v or nil
    end
  end
  return unpack(out, 1, n)
end

-- Seqsets (see the top). `base` is the directory's key; `seq` the member's
-- acceptance sequence (number or its text). A chunk covers the sequences from
-- its start (its name and directory score) up to the next chunk's start, so
-- each member has one place whatever other queues' jobs took the sequences
-- between; chunks fill by appends (the next sequence past a full last chunk
-- starts a chunk), a member added inside a full chunk splits it in halves, and
-- one below every chunk joins the first chunk if it has room (its start moves
-- down: the chunk is renamed), so that retries coming back in the order they
-- fell due, not their sequence's, share a chunk instead of each making one.
local SEQSET_CHUNK = 128

-- The start of the chunk whose range holds `seq` (nil: below every chunk).
-- Cost: one O(log n) read of the directory.
local function seqset_find(base, seq)
  return redis.call('ZREVRANGEBYSCORE', base, seq, '-inf', 'LIMIT', 0, 1)[1]
end

-- Add (or keep) `id` at `seq`. Cost: at most six O(log n) calls, plus, when
-- a middle insert splits a full chunk, one move of 64 members (O(128)).
local function seqset_add(base, seq, id)
  seq = tonumber(seq)
  local start = seqset_find(base, seq)
  if start then
    local chunk = base .. ':' .. start
    if redis.call('ZCARD', chunk) < SEQSET_CHUNK or redis.call('ZSCORE', chunk, id) then
      redis.call('ZADD', chunk, seq, id)
      return
    end
    local last = redis.call('ZRANGE', chunk, -1, -1, 'WITHSCORES')
    if seq < tonumber(last[2]) then
      -- full, and seq falls inside: its upper half becomes a chunk of its own
      local half = redis.call('ZRANGE', chunk, SEQSET_CHUNK / 2, -1, 'WITHSCORES')
      local upper = half[2]
      local args = {'ZADD', base .. ':' .. upper}
      for i = 1, #half, 2 do args[#args + 1], args[#args + 2] = half[i + 1], half[i] end
      redis.call(unpack(args))
      redis.call('ZREMRANGEBYRANK', chunk, SEQSET_CHUNK / 2, -1)
      redis.call('ZADD', base, upper, upper)
      if seq >= tonumber(upper) then chunk = base .. ':' .. upper end
      redis.call('ZADD', chunk, seq, id)
      return
    end
  end
  local name = string.format('%d', seq)
  if not start then
    -- below every chunk: the first chunk takes it if it has room, starting here now
    local first = redis.call('ZRANGE', base, 0, 0)[1]
    if first and redis.call('ZCARD', base .. ':' .. first) < SEQSET_CHUNK then
      redis.call('RENAME', base .. ':' .. first, base .. ':' .. name)
      redis.call('ZREM', base, first)
      redis.call('ZADD', base, seq, name)
      redis.call('ZADD', base .. ':' .. name, seq, id)
      return
    end
  end
  -- below every chunk (the first is full), or past a full chunk's last member: a chunk starts here
  redis.call('ZADD', base .. ':' .. name, seq, id)
  redis.call('ZADD', base, seq, name)
end

-- Take `id` (at `seq`) out; a chunk it leaves empty leaves the directory (its
-- range goes to the chunk before). Cost: at most four O(log n) calls.
local function seqset_remove(base, seq, id)
  if not seq then return end
  local start = seqset_find(base, seq)
  if not start then return end
  local chunk = base .. ':' .. start
  if redis.call('ZREM', chunk, id) == 1 and redis.call('ZCARD', chunk) == 0 then
    redis.call('ZREM', base, start)
  end
end

-- Whether `id` is in the set at `seq`. Cost: two O(log n) reads.
local function seqset_has(base, seq, id)
  if not seq then return false end
  local start = seqset_find(base, seq)
  return start ~= nil and redis.call('ZSCORE', base .. ':' .. start, id) ~= false
end

-- Whether the set has no member. Cost: one O(1) read.
local function seqset_empty(base)
  return redis.call('ZCARD', base) == 0
end

-- Up to `limit` members with a sequence above `after` (0: from the first), in
-- order: {{id, seq}, ...}. Walks the directory from the chunk holding `after`,
-- a few chunks at a time (as many as `limit` full chunks need, then doubling);
-- every later chunk holds at least one member past `after` (chunks are never
-- empty), so it reads at most limit + 1 chunks (each a ZRANGEBYSCORE of <= 128
-- members) and O(log limit) directory ranges: O(log n + limit).
local function seqset_range(base, after, limit)
  local out = {}
  if limit <= 0 then return out end
  after = string.format('%d', tonumber(after))
  local from = seqset_find(base, after) or '-inf'
  local batch = math.floor(limit / SEQSET_CHUNK) + 2
  while true do
    local chunks = redis.call('ZRANGEBYSCORE', base, from, '+inf', 'LIMIT', 0, batch)
    for _, n in ipairs(chunks) do
      local got = redis.call('ZRANGEBYSCORE', base .. ':' .. n, '(' .. after, '+inf', 'WITHSCORES', 'LIMIT', 0,
        limit - #out)
      for i = 1, #got, 2 do out[#out + 1] = {got[i], tonumber(got[i + 1])} end
      if #out >= limit then return out end
    end
    if #chunks < batch then return out end
    from = '(' .. chunks[#chunks]
    batch = math.min(batch * 2, limit - #out + 1)
  end
end

-- The first member: id, seq, or nil when empty. Cost: as seqset_range for one.
local function seqset_first(base)
  local head = seqset_range(base, 0, 1)[1]
  if not head then return nil end
  return head[1], head[2]
end

-- A job's location (see the top): in_flight, deferred, failed, ready, or nil
-- when it is in none (its hash is gone). O(1) reads and two O(log n) (seqset_has).
local function location(prefix, jid, queue)
  if redis.call('ZSCORE', prefix .. ':leased', jid) then return 'in_flight' end
  if redis.call('ZSCORE', prefix .. ':deferred', jid) then return 'deferred' end
  if redis.call('ZSCORE', prefix .. ':failed', jid) then return 'failed' end
  local seq = redis.call('HGET', prefix .. ':job:' .. jid, 'seq')
  if seqset_has(prefix .. ':rq:' .. queue, seq, jid) then return 'ready' end
  return nil
end

-- The one definition of a job's state (for views and counts): in_flight,
-- deferred, failed, held or ready. Mirrored by relayx.queue.states.JobState.
local function job_state(prefix, jid, queue, now)
  local where = location(prefix, jid, queue) or 'ready'
  if where == 'ready' and held_at(prefix .. ':dom:' .. base_domain(queue), now) then return 'held' end
  return where
end

-- The locations whose jobs keep their recipients busy (<p>:busy:<q>, above).
local BUSY = {in_flight = true, deferred = true}

-- Add `by` (1 or -1) to each of the job's recipients in its queue's busy hash
-- (a field that reaches 0 goes: a job from before the hash existed, leaving,
-- does not leave a negative count). Cost: one write per recipient.
local function mark_busy(prefix, jid, queue, by)
  local rcpts = redis.call('HGET', prefix .. ':job:' .. jid, 'rcpts')
  if not rcpts then return end
  local key = prefix .. ':busy:' .. queue
  for _, rcpt in ipairs(cjson.decode(rcpts)) do
    local name = string.lower(rcpt)
    if redis.call('HINCRBY', key, name, by) <= 0 then redis.call('HDEL', key, name) end
  end
end

-- Move a job of `queue` from one location to another (see the top), keeping
-- the queue's counters and busy recipients in the same step: the one place a
-- job changes location (its hash must still exist: retire_job deletes it after).
-- `from` nil: the job enters (add_job); `to` nil: it leaves (retire_job).
-- `score` is the new location's (seq, lease expiry, due time, failure time).
-- Cost: one HGET (the seq, leaving ready) and at most ~12 O(log n) calls (a
-- seqset_add that splits a chunk also moves 64 members), plus one per recipient when the job starts
-- or stops being busy.
local function move(prefix, jid, queue, from, to, score)
  local counts = prefix .. ':count:' .. queue
  local was, will = BUSY[from] or false, BUSY[to] or false
  if was ~= will then mark_busy(prefix, jid, queue, will and 1 or -1) end
  if from == 'ready' then
    seqset_remove(prefix .. ':rq:' .. queue, redis.call('HGET', prefix .. ':job:' .. jid, 'seq'), jid)
  elseif from == 'in_flight' then
    redis.call('ZREM', prefix .. ':leased', jid)
    redis.call('ZREM', prefix .. ':inflight:' .. queue, jid)
  elseif from == 'deferred' then
    redis.call('ZREM', prefix .. ':deferred', jid)
    redis.call('ZREM', prefix .. ':deferred:' .. queue, jid)
  elseif from == 'failed' then
    redis.call('ZREM', prefix .. ':failed', jid)
  end
  if from then redis.call('HINCRBY', counts, from, -1) end
  if to == 'ready' then
    seqset_add(prefix .. ':rq:' .. queue, score, jid)
    redis.call('SADD', prefix .. ':domains', queue)
  elseif to == 'in_flight' then
    redis.call('ZADD', prefix .. ':leased', score, jid)
    redis.call('ZADD', prefix .. ':inflight:' .. queue, score, jid)
  elseif to == 'deferred' then
    redis.call('ZADD', prefix .. ':deferred', score, jid)
    redis.call('ZADD', prefix .. ':deferred:' .. queue, score, jid)
  elseif to == 'failed' then
    redis.call('ZADD', prefix .. ':failed', score, jid)
  end
  if to then redis.call('HINCRBY', counts, to, 1) end
  redis.call('HINCRBY', counts, 'v', 1)
end

-- Search indexes, kept for every job while its hash exists (all zsets jid -> seq):
--   <p>:aq:<queue>         every job of a delivery queue, in acceptance order (a seqset)
--   <p>:ix:rcpt:<bucket>   jobs by each of their recipients (lower case), hashed (index_bucket)
--   <p>:ix:mid:<bucket>    jobs by their message's Message-ID (lower case, no <>), hashed
-- A bucket holds the jobs of every value that hashes to it, so a search reads
-- its bucket in acceptance order and keeps the jobs that really have the value
-- (page.lua). There is no sender index: a sender search examines the queues'
-- jobs in acceptance order, a bounded scan driven by the cursor (page.lua).
-- index_job adds a job (add_job); unindex_job removes it and must be called
-- just before its hash is deleted (it reads the job and its message): retire_job.
-- Cost: one ZADD/ZREM per recipient of the job, plus two (plus, on removal, the
-- legacy keys below: one ZREM per recipient, plus two).
--
-- Bucket count: 16^INDEX_BUCKET_HEX = 65,536. Recipients and Message-IDs are
-- nearly always unique per message, so a key per value cost a whole key (~120 B)
-- per job; a bucket costs ~25 B per job while it stays listpack-encoded
-- (zset-max-listpack-entries, default 128). At 1,000,000 queued jobs a bucket
-- holds ~15 of them (a search reads that many entries to find its value's),
-- and it stays a listpack up to ~8,000,000; with fewer buckets (16^3) they
-- would turn into skiplists (~100 B per job) past ~500,000, with more (16^5)
-- the buckets would hold one job each and cost a key per value again.
local INDEX_BUCKET_HEX = 4

local function index_bucket(value)
  return string.sub(redis.sha1hex(value), 1, INDEX_BUCKET_HEX)
end

local function index_job(prefix, jid, seq, queue, mid, rcpts)
  seqset_add(prefix .. ':aq:' .. queue, seq, jid)
  if mid and mid ~= '' then redis.call('ZADD', prefix .. ':ix:mid:' .. index_bucket(mid), seq, jid) end
  for _, rcpt in ipairs(cjson.decode(rcpts)) do
    redis.call('ZADD', prefix .. ':ix:rcpt:' .. index_bucket(string.lower(rcpt)), seq, jid)
  end
end

-- Jobs accepted before the buckets were indexed under a key per value:
-- <p>:ix:from:<sender>, <p>:ix:rcpt:<address>, <p>:ix:mid:<id>. They leave them
-- here (a ZREM of a missing key costs O(1)), so those keys empty themselves as
-- the old jobs retire; a search reads the old key too while it exists (page.lua).
-- A bucket name (4 hex digits) is never an address (it has an @) nor, in
-- practice, a Message-ID. To be dropped once no node of the previous version
-- can have queued a job.
local function unindex_job(prefix, jid)
  local job = {job_get(prefix, jid, 'domain', 'rcpts', 'qid')}
  if not job[1] then return end
  local msg = redis.call('HMGET', msg_key(prefix, job[3]), 'sender', 'mid')
  seqset_remove(prefix .. ':aq:' .. job[1], redis.call('HGET', prefix .. ':job:' .. jid, 'seq'), jid)
  redis.call('ZREM', prefix .. ':ix:from:' .. string.lower(msg[1] or ''), jid)  -- legacy
  if msg[2] and msg[2] ~= '' then
    redis.call('ZREM', prefix .. ':ix:mid:' .. index_bucket(msg[2]), jid)
    redis.call('ZREM', prefix .. ':ix:mid:' .. msg[2], jid)  -- legacy
  end
  for _, rcpt in ipairs(cjson.decode(job[2])) do
    local name = string.lower(rcpt)
    redis.call('ZREM', prefix .. ':ix:rcpt:' .. index_bucket(name), jid)
    redis.call('ZREM', prefix .. ':ix:rcpt:' .. name, jid)  -- legacy
  end
end

-- A message's size from its hash's "body" field: the body's length, or the
-- size a body store's stub records (relayx/queue/bodyref.py: a NUL, "relayx-body ",
-- the reference, a space, the size, CRLF, then the header section). The stubs
-- stored now have no size (stored_body below): the "size" field has it.
local function body_size(body)
  if string.byte(body, 1) == 0 and string.sub(body, 2, 13) == 'relayx-body ' then
    local stop = string.find(body, '\r\n', 1, true) or (#body + 1)
    local size = string.match(string.sub(body, 14, stop - 1), ' (%d+)$')
    if size then return tonumber(size) end
  end
  return #body
end

-- The "body" field as stored: a body store's stub is kept as a NUL and its
-- reference only (the message's "size" field has the size; the marker's words
-- would cost every queued message 12 bytes, relayx/queue/bodyref.py), the rest
-- as it came.
local function stored_body(body)
  if string.byte(body, 1) == 0 and string.sub(body, 2, 13) == 'relayx-body '
    and not string.find(body, '\r\n', 1, true) then
    return '\0' .. string.match(string.sub(body, 14), '^(%S+)')
  end
  return body
end

-- The size counted for a message: its "size" field (messages from before
-- counters: read from its body field).
local function message_size(msg_key)
  local size = redis.call('HGET', msg_key, 'size')
  if size then return tonumber(size) end
  return body_size(redis.call('HGET', msg_key, 'body') or '')
end

-- A new job (its hash written) enters its queue, ready: counters, the queue's
-- acceptance index and the search indexes (index_job), the totals.
-- Cost: O(1) writes, plus one per recipient (index_job).
local function add_job(prefix, jid, queue, seq, size, sender, mid, rcpts)
  index_job(prefix, jid, seq, queue, mid, rcpts)
  redis.call('SADD', prefix .. ':queues', queue)
  redis.call('HINCRBY', prefix .. ':count:' .. queue, 'bytes', size)
  redis.call('HINCRBY', prefix .. ':totals', 'jobs', 1)
  move(prefix, jid, queue, nil, 'ready', seq)
end

-- How long after its reception a message that has left the queue is still
-- remembered (<p>:done:<qid>) for its node's take-back: a node that lost the
-- reply to the enqueue tries to take it back for up to 300 s
-- (TAKE_BACK_PATIENCE, queue/redis.py), and must hear "taken", not find nothing.
local TAKE_BACK_WINDOW_MS = 360000

-- A job leaves the queue for good (delivered, bounced, deleted): out of its
-- location `from`, its counters and the index; its hash deleted, and its
-- message too when this was the message's last job (remembered by a
-- <p>:done:<qid> until TAKE_BACK_WINDOW_MS after its reception). The .1 job of
-- a message with other jobs left loses only its job fields (the message's stay
-- in its hash). Returns the message key, and whether this was the message's
-- last job (the message is gone: its body can be deleted).
-- Cost: O(1) writes.
local function retire_job(prefix, jid, queue, from)
  local job = prefix .. ':job:' .. jid
  local qid = job_get(prefix, jid, 'qid') or ''
  local msg = msg_key(prefix, qid)
  local size = message_size(msg)
  move(prefix, jid, queue, from, nil)
  unindex_job(prefix, jid)
  redis.call('HINCRBY', prefix .. ':count:' .. queue, 'bytes', -size)
  redis.call('HINCRBY', prefix .. ':totals', 'jobs', -1)
  redis.call('HINCRBY', prefix .. ':totals', 'v', 1)
  local left = redis.call('HINCRBY', msg, 'jobs', -1)
  if job ~= msg then
    redis.call('DEL', job)
  elseif left > 0 then
    local fields = {}
    for _, name in ipairs(redis.call('HKEYS', job)) do
      if not MESSAGE_FIELDS[name] then fields[#fields + 1] = name end
    end
    if #fields > 0 then redis.call('HDEL', job, unpack(fields)) end
  end
  if left <= 0 then
    local t = redis.call('TIME')
    local left = tonumber(redis.call('HGET', msg, 'received') or '0') + TAKE_BACK_WINDOW_MS
      - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    if left > 0 then redis.call('SET', prefix .. ':done:' .. qid, 1, 'PX', math.min(left, TAKE_BACK_WINDOW_MS)) end
    redis.call('DEL', msg)
    redis.call('HINCRBY', prefix .. ':totals', 'messages', -1)
    redis.call('HINCRBY', prefix .. ':totals', 'bytes', -size)
  end
  return msg, left <= 0
end

-- Whether the domain is held at `now`, and its total held time (ms) up to `now`.
-- A scheduled hold whose start or end has come is applied here, by whichever
-- script looks first.
local function held_clock(dom, now)
  local s = redis.call('HMGET', dom, 'held', 'held_since', 'held_ms', 'hold_start', 'hold_end')
  local held, since, total = s[1] == '1', tonumber(s[2] or '0'), tonumber(s[3] or '0')
  local start, stop = tonumber(s[4] or '0'), tonumber(s[5] or '0')
  if not held and start > 0 and start <= now then
    if stop > 0 and stop <= now then
      -- the whole window passed while no node looked
      total = total + (stop - start)
      redis.call('HSET', dom, 'held_ms', total)
      redis.call('HDEL', dom, 'hold_start', 'hold_end')
      return false, total
    end
    held, since = true, start
    redis.call('HSET', dom, 'held', 1, 'held_since', start)
    redis.call('HDEL', dom, 'hold_start')
  end
  if held and stop > 0 and stop <= now then
    total = total + (stop - since)
    redis.call('HSET', dom, 'held', 0, 'held_ms', total)
    redis.call('HDEL', dom, 'held_since', 'hold_end')
    return false, total
  end
  if held then return true, total + (now - since) end
  return false, total
end

-- Store a message and one delivery job per destination domain (pairs: domain,
-- JSON array of recipients, ...). Each job records its domain's held time at
-- acceptance (held_base), so that time held later does not count against its
-- retention. `mid` and `subject` (optional) are the header's Message-ID (lower
-- case, no <>) and Subject, for search. Returns the number of jobs, or an
-- error if the queue id is taken. Cost: O(jobs of the message) writes.
local function enqueue_message(prefix, seq_key, domains_key, key, qid, now, sender, body, pairs, mid, subject)
  if redis.call('EXISTS', prefix .. ':aborted:' .. qid) == 1 then
    -- abort.lua took this message back (its sender got 451) before it arrived
    return redis.error_reply('ABORTED enqueue of ' .. qid .. ' was taken back')
  end
  if redis.call('EXISTS', msg_key(prefix, qid)) == 1 then
    return redis.error_reply('DUPLICATE queue id ' .. qid)
  end
  local njobs = #pairs / 2
  local size = body_size(body)
  redis.call('HSET', key, 'sender', sender, 'body', stored_body(body), 'received', now, 'jobs', njobs, 'size', size)
  if njobs > 1 then redis.call('HSET', key, 'njobs', njobs) end
  if mid and mid ~= '' then redis.call('HSET', key, 'mid', mid) end
  if subject and subject ~= '' then redis.call('HSET', key, 'subject', subject) end
  redis.call('HINCRBY', prefix .. ':totals', 'messages', 1)
  redis.call('HINCRBY', prefix .. ':totals', 'bytes', size)
  redis.call('HINCRBY', prefix .. ':totals', 'v', 1)
  for i = 1, njobs do
    local domain, rcpts = pairs[2 * i - 1], pairs[2 * i]
    local jid = qid .. '.' .. i
    local seq = redis.call('INCR', seq_key)
    local _, held_base = held_clock(prefix .. ':dom:' .. base_domain(domain), now)
    -- only what differs from its default (job_get): qid, owed, failed, created,
    -- attempts and token have theirs
    redis.call('HSET', prefix .. ':job:' .. jid, 'domain', domain, 'rcpts', rcpts, 'seq', seq)
    if held_base ~= 0 then redis.call('HSET', prefix .. ':job:' .. jid, 'held_base', held_base) end
    add_job(prefix, jid, domain, seq, size, sender, mid, rcpts)
  end
  return njobs
end

-- Record an operator's change (a JSON object) in the audit log, newest first,
-- keeping the newest `keep`. Every script that changes what an operator can
-- change calls this in the same step, so no change goes unrecorded; a bulk
-- action's steps pass "" (its one record is written when it starts).
-- An audit record (a JSON object's text) with "previous": what the change
-- replaced (JSON text), spliced in so that the rest stays as Python wrote it.
local function with_previous(record, previous)
  return string.sub(record, 1, -2) .. ',"previous":' .. previous .. '}'
end

local function audit(key, record, keep)
  if record == '' then return end  -- one step of a bulk action, audited once at its start
  redis.call('LPUSH', key, record)
  redis.call('LTRIM', key, 0, tonumber(keep) - 1)
end

-- How many jobs the message of hash `key` (msg_key) had: its "njobs" (absent:
-- 1; in a hash of its own, from before njobs was written: up to 100 are looked for).
local function message_njobs(prefix, qid, key)
  local n = redis.call('HGET', key, 'njobs')
  if n then return tonumber(n) end
  if key == prefix .. ':msg:' .. qid then return 100 end
  return 1
end

-- The jobs of a message still queued: <qid>.1 to <qid>.<n> as enqueue_message
-- numbered them; those already done are gone.
local function message_jobs(prefix, qid)
  local jobs = {}
  local total = message_njobs(prefix, qid, msg_key(prefix, qid))
  for i = 1, total do
    local jid = qid .. '.' .. i
    if job_exists(prefix, jid) then jobs[#jobs + 1] = jid end
  end
  return jobs
end

-- The report's event log (proof of delivery): per domain, a time-ordered stream
-- <p>:events:<domain> (the delivery queue's base domain), one entry per change
-- of a message's fate, written by the script that makes the change, in the same
-- step: accepted (enqueue.lua), delivered / failed / deferred (settle.lua),
-- bounced / deleted (drop.lua), dsn (bounce.lua), withdrawn (abort.lua),
-- requeued (requeue.lua). Every entry has kind, queue,
-- qid, jid and at (the node's now, ms); the rest by kind (JSON lists as text):
--   accepted   sender, rcpts, mid, subject, size
--   delivered  rcpts, mx, reply (the destination's reply to the message: its queue id)
--   failed     failures ([[rcpt, code, status, text], ...]), mx
--   deferred   rcpts (still owed), why, mx
--   bounced, deleted  rcpts (still owed)
--   dsn        dsn (the DSN's queue id)
--   withdrawn  (nothing: an enqueue taken back by abort.lua, its sender told 451)
--   requeued   rcpts (failed ones owed again, requeue.lua)
-- Entry IDs are the node's now in ms (or the stream's last ms, if later: IDs only
-- grow), so a window is one XRANGE between its ms bounds. What an entry's ID and
-- key tell is written as "": at when it is the ID's ms, jid when it is <qid>.1,
-- queue when it is the stream's domain (every entry keeps the same fields: a
-- stream stores only the values of an entry whose fields are its node's first
-- entry's). The one reader, RedisQueue.events (queue/redis.py), puts them back. Bounded: each XADD
-- trims (MINID ~) what is older than <p>:events:keep (ms), which settle.lua sets
-- to the retention plus EVENT_MARGIN. Memory: about 550 bytes per delivered
-- one-recipient message (accepted + delivered; measured 1.09 MB for 2,000)
-- before the "" defaults above.
-- Cost: O(1) keys (the stream, the keep key), O(1) amortized writes.
local EVENT_MARGIN = 86400000

local function record_event(prefix, queue, qid, jid, now, kind, fields)
  local domain = base_domain(queue)
  local key = prefix .. ':events:' .. domain
  local id = now
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then
    local ms = tonumber(string.match(last[1][1], '^(%d+)'))
    if ms > id then id = ms end
  end
  local args = {'XADD', key}
  local keep = tonumber(redis.call('GET', prefix .. ':events:keep') or '0')
  if keep > 0 then
    args[#args + 1], args[#args + 2], args[#args + 3] = 'MINID', '~', tostring(now - keep)
  end
  local at = now == id and '' or string.format('%d', now)
  if jid == qid .. '.1' then jid = '' end
  if queue == domain then queue = '' end
  for _, v in ipairs({string.format('%d-*', id), 'kind', kind, 'queue', queue, 'qid', qid, 'jid', jid,
    'at', at}) do
    args[#args + 1] = v
  end
  for _, v in ipairs(fields) do args[#args + 1] = v end
  redis.call(unpack(args))
end
