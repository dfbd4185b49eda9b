-- settle.lua: record a delivery attempt's outcome and end its lease.
--
-- KEYS[1]  <p>:job:<jid>
-- KEYS[2]  <p>:leased
-- KEYS[3]  <p>:inflight:<domain>
-- KEYS[4]  <p>:deferred
-- KEYS[5]  <p>:failed        zset jid -> time, jobs with failed recipients (for the DSN)
-- KEYS[6]  <p>:rq:<domain>    the queue's ready jobs (a seqset, common.lua)
-- KEYS[7]  <p>:domains
-- KEYS[8]  <p>:dom:<domain>  domain state (see common.lua)
-- KEYS[9]  <p>:job:<qid>.1  the message's hash (msg_key, common.lua)
-- KEYS[10] <p>:paused        zset domain -> paused_until, the domains whose destination is failing
-- KEYS[11] <p>:delayed       zset of jobs due a delay warning to their sender
-- ARGV[1]  jid
-- ARGV[2]  the lease's fencing token
-- ARGV[3]  now (ms)
-- ARGV[4]  JSON array of recipients the destination accepted
-- ARGV[5]  JSON array of [recipient, code, status, text] refused permanently
-- ARGV[6]  JSON array of [recipient, code, status, text] refused temporarily
-- ARGV[7]  why the destination was unreachable, or "" when it answered
-- ARGV[8]  retention (ms): a job older than this (not counting time held) fails
-- ARGV[9]  retry schedule (ms), comma-separated; the last step repeats
-- ARGV[10] key prefix
-- ARGV[11] delay warning (ms): a job waiting longer (time held not counted) is
--          put in <p>:delayed once; 0 for no warnings
-- ARGV[12] the destination that answered ("name [address]:port"; "" if none)
-- ARGV[13] its reply to the message when it took it ("250 ... queued as X"; "" if none)
-- ARGV[14] JSON pace: {"c": ceiling sessions (0: unknown), "r": ceiling msg/s (0: none),
--          "u": ramp-up ms, "b": backoff factor, "i": interval ms, "f": floor msg/s,
--          "s": slow factor, "t": start fraction (1: none), "w": idle ms before it applies again}
-- ARGV[15] pushback: "" or "sessions"/"rate" (the destination answered "not now")
-- ARGV[16] the pushback's reply and host ("421 4.7.0 busy from mx1 [10.0.0.1]:25")
-- ARGV[17] how long the destination took to answer the transaction (ms, 0: unknown)
-- Returns {fate, pace change, sessions, msg/s, gone}: fate "done", "failed", "deferred",
-- "paused" or "ready" (pushed back to its place); the pace change "" or "start"
-- (slow start) or "cut" or "ceiling" (back at full pace), with the pace after it
-- ("" for the ceiling); gone "1" when the job was its message's last (its body
-- can be deleted), else "".
--
-- Invariant: as in enqueue.lua. Only the current token's holder settles; recipients
-- once accepted or failed are never owed again, so a retry resends only to the rest.
-- A domain is in <p>:paused exactly while its paused_until is set. Every change
-- of a job's location goes through move() (common.lua), keeping the counters.
-- What the attempt did (delivered, failed, deferred when its reason changed,
-- and jobs failed for their retention) goes to the domain's event log (record_event, common.lua), whose
-- trim (<p>:events:keep) this sets to the retention plus EVENT_MARGIN.
--
-- The adaptive pace (AIMD, per destination, cluster-wide; fields pace_* in the
-- domain hash, see common.lua): a destination answering with no delivery and no
-- cut in the last idle ms (none yet, idle, or after an outage) starts slowly, at
-- the start fraction of its ceiling's sessions and rate, and doubles both each
-- interval with a delivery while nothing pushes back (pace_ss), so a healthy
-- destination is at full pace within log2(1 / start) intervals; after an outage
-- the sessions start again at one (resume.lua) and climb over the ramp-up (u),
-- or without one by a session per delivery (pace_ss "round": doubling with each
-- round of deliveries, as TCP's slow start), while the rate doubles. The first
-- round before the first answer goes at the ceiling.
-- A pushback ends the slow start and cuts the sessions ("sessions"), the
-- rate ("rate") or both (a slow reply) to backoff times what was in use (the jobs
-- in flight; the current rate, or at the ceiling the rate the destination accepted
-- over the last second), and the rate to no more than the destination accepted
-- over the last second (the cut lands at what it took, not above it), at most
-- once per interval, never below 1 session / the floor rate; each interval with
-- a delivery adds back one session (or c * i / u) and rate (quickly to 0.9 of the
-- rate it accepted before the cut, then in doubling steps) until the ceiling,
-- where the pace_ fields go. A pushback, and a connection refused
-- while other sessions are in flight within PATIENCE intervals of a delivery,
-- hold new starts for a quarter interval (pace_wait, claim.lua) and put the job
-- back at its place instead of pausing the domain; a pushback PATIENCE intervals
-- after the last delivery, and a job pushed back PUSHBACKS times, take the usual
-- way (pause, or the retry schedule). A 421 never fails a recipient.
--
-- Cost bound, whatever the queue's depth: O(1) keys for the job itself; when the
-- destination is unreachable, the queue's first 100 jobs are looked at twice
-- (retention, delay warning; each time one seqset_range of KEYS[6]: at most 101 chunks), each O(1) keys and an event: at most ~1,000 keys, O(log n) writes.
-- The pace (slow start, cut, climb) adds O(1) reads and writes of the domain hash and one ZCARD.

local jid, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HGET', KEYS[1], 'token') ~= token then
  return redis.error_reply('STALE lease token')
end
local PATIENCE, PUSHBACKS = 10, 20
local retention, prefix = tonumber(ARGV[8]), ARGV[10]
local domain = redis.call('HGET', KEYS[1], 'domain')
local schedule = {}
for step in string.gmatch(ARGV[9], '[^,]+') do schedule[#schedule + 1] = tonumber(step) end
local function step(n) return schedule[math.max(1, math.min(n, #schedule))] end
local _, held_now = held_clock(prefix .. ':dom:' .. base_domain(domain), now)
local mx = ARGV[12] or ''
-- a deferral is logged when its reason changes, not at every retry (bounded per message)
local last_error = redis.call('HGET', KEYS[1], 'error') or ''
redis.call('SET', prefix .. ':events:keep', retention + EVENT_MARGIN)
local function event(job, jobid, kind, fields)
  record_event(prefix, domain, job_get(prefix, jobid, 'qid') or '', jobid, now, kind, fields)
end
if ARGV[4] ~= '[]' then event(KEYS[1], jid, 'delivered', {'rcpts', ARGV[4], 'mx', mx, 'reply', ARGV[13] or ''}) end
if ARGV[5] ~= '[]' then event(KEYS[1], jid, 'failed', {'failures', ARGV[5], 'mx', mx}) end

-- the job is still in flight until one of the moves below takes it elsewhere
redis.call('HDEL', KEYS[1], 'token', 'owner', 'expires')

-- the job's last attempts that did not end it, for an operator's message view
local function remember(what)
  local history = cjson.decode(redis.call('HGET', KEYS[1], 'history') or '[]')
  history[#history + 1] = {now, what}
  if #history > 10 then table.remove(history, 1) end
  redis.call('HSET', KEYS[1], 'history', cjson.encode(history))
end

-- the adaptive pace (see the top)
local pace = cjson.decode(ARGV[14] or '{}')
pace.c, pace.r, pace.u = pace.c or 0, pace.r or 0, pace.u or 0

-- the destination answered: it is up, whatever it said about these recipients;
-- after an outage its pace starts at one session and climbs: as its ramp_up says,
-- or without one by a session per delivery (round_climb)
local function destination_up()
  if redis.call('HEXISTS', KEYS[8], 'failures') == 1 then
    redis.call('HSET', KEYS[8], 'pace_c', 1, 'pace_at', now, 'pace_event', 'cut', 'pace_kind', 'sessions',
      'pace_why', 'the destination came back')
    if pace.u <= 0 then redis.call('HSET', KEYS[8], 'pace_ss', 'round') end
  end
  redis.call('HDEL', KEYS[8], 'paused_until', 'failures', 'last_error')
  redis.call('ZREM', KEYS[10], domain)
end

local interval, backoff, floor_rate = pace.i or 1000, pace.b or 0.7, pace.f or 1
local start, idle = pace.t or 1, pace.w or 300000
local HUGE = math.huge
local change = ''
-- "1" once the job settled was its message's last: the body can go
local message_gone = ''

-- the rate the destination accepted: messages per second over the last window
local function accepted_rate()
  local s = redis.call('HMGET', KEYS[8], 'ok_w', 'ok_n', 'ok_r')
  local since = now - tonumber(s[1] or now)
  local last = tonumber(s[3] or '0')
  if since >= interval then return math.max(last, tonumber(s[2] or '0') * 1000 / since) end
  return last
end

local function count_success()
  local s = redis.call('HMGET', KEYS[8], 'ok_w', 'ok_n')
  local w, n = tonumber(s[1] or '0'), tonumber(s[2] or '0')
  if now - w >= 1000 then
    if w > 0 then redis.call('HSET', KEYS[8], 'ok_r', tostring(n * 1000 / (now - w))) end
    w, n = now, 0
  end
  redis.call('HSET', KEYS[8], 'ok_w', w, 'ok_n', n + 1, 'ok_at', now)
  redis.call('HDEL', KEYS[8], 'busy_since')
end

-- cut the pace: "sessions" the sessions, "rate" the rate, "slow" both
local function cut(kind, why)
  local s = redis.call('HMGET', KEYS[8], 'pace_c', 'pace_r', 'pace_cut_at')
  if now - tonumber(s[3] or '0') < interval then return end
  redis.call('HDEL', KEYS[8], 'pace_ss')
  local c, r = tonumber(s[1]), tonumber(s[2])
  local fields = {'pace_at', now, 'pace_cut_at', now, 'pace_event', 'cut', 'pace_why', why, 'pace_kind', kind}
  if kind ~= 'rate' then
    local busy = redis.call('ZCARD', KEYS[3])
    c = math.max(1, math.floor(math.min(c or HUGE, busy) * backoff))
    fields[#fields + 1], fields[#fields + 2] = 'pace_c', c
  end
  if kind ~= 'sessions' then
    -- from the current pace; from the ceiling, the rate the destination accepted lately
    local base, seen = r, accepted_rate()
    if not base then
      base = pace.r > 0 and pace.r or HUGE
      if seen > 0 then base = math.min(base, seen) end
      if base == HUGE then base = floor_rate / backoff end
    end
    r = base * backoff
    -- no higher than the destination took lately: a pace far above what it
    -- accepts (a slow start's doubling, a capacity that dropped) lands there at once
    if seen > 0 and seen < r then r = seen end
    if seen > 0 and seen < base then base = seen end
    r = math.max(floor_rate, r)
    for _, v in ipairs({'pace_r', tostring(r), 'pace_peak', tostring(base), 'pace_step',
      tostring(math.max(0.2, base / 100))}) do fields[#fields + 1] = v end
  end
  redis.call('HSET', KEYS[8], unpack(fields))
  change = 'cut'
end

-- each interval with a success: climb back towards the ceiling
local function climb()
  local s = redis.call('HMGET', KEYS[8], 'pace_c', 'pace_r', 'pace_at', 'pace_peak', 'pace_step', 'pace_ss')
  if not s[1] and not s[2] then return end
  if now - tonumber(s[3] or '0') < interval then return end
  local c, r, peak, step = tonumber(s[1]), tonumber(s[2]), tonumber(s[4]), tonumber(s[5] or '1')
  local ramp = 0
  if pace.u > 0 then ramp = interval / pace.u end
  if r and s[6] then
    -- slow start: double while nothing pushes back
    r = r * 2
    if pace.r <= 0 or r >= pace.r then r = nil end
  end
  if c and s[6] == 'both' then
    c = c * 2
    if pace.c <= 0 or c >= pace.c then c = nil end
  elseif c and s[6] ~= 'round' then
    c = c + math.max(1, math.floor(pace.c * ramp))
    if pace.c <= 0 or c >= pace.c then c = nil end
  end
  if r and not s[6] then
    -- (0.85: the stored rates are rounded; what reached 0.9 goes on below)
    if peak and r < 0.85 * peak then
      r = math.min(0.9 * peak, r + math.max(peak / 4, pace.r * ramp))
    else
      r, step = r + step, step * 2
    end
    if (pace.r > 0 and r >= pace.r) or (pace.r <= 0 and (not peak or r >= 2 * peak)) then r = nil end
  end
  if not c and not r then
    redis.call('HDEL', KEYS[8], 'pace_c', 'pace_r', 'pace_peak', 'pace_step', 'pace_kind', 'pace_why', 'pace_ss')
    redis.call('HSET', KEYS[8], 'pace_at', now, 'pace_event', 'ceiling')
    change = 'ceiling'
    return
  end
  redis.call('HSET', KEYS[8], 'pace_at', now, 'pace_step', tostring(step))
  if c then redis.call('HSET', KEYS[8], 'pace_c', c) else redis.call('HDEL', KEYS[8], 'pace_c') end
  if r then redis.call('HSET', KEYS[8], 'pace_r', tostring(r)) else redis.call('HDEL', KEYS[8], 'pace_r') end
end

-- slow start: a destination with no delivery and no cut in the last idle ms (none
-- yet, or after an outage) starts at `start` of its ceiling and doubles (pace_ss
-- "both"); a recent pace that is lower (one session after an outage, resume.lua)
-- is kept and climbs as configured (ramp_up), only the rate doubling (pace_ss
-- "rate"). A cut since is the AIMD's (pushbacks before the first delivery).
local function slow_start()
  if start >= 1 then return end
  local s = redis.call('HMGET', KEYS[8], 'ok_at', 'pace_c', 'pace_r', 'pace_at', 'pace_cut_at', 'pace_ss')
  local ok_at, cut_at = tonumber(s[1] or '0'), tonumber(s[5] or '0')
  if (ok_at > 0 and now - ok_at < idle) or (cut_at > 0 and now - cut_at < idle) then return end
  local recent = now - tonumber(s[4] or '0') < idle
  local c, r, doubled = nil, nil, 'both'
  if pace.c > 0 then
    c = math.max(1, math.ceil(pace.c * start))
    if recent and tonumber(s[2]) and tonumber(s[2]) < c then
      c, doubled = tonumber(s[2]), s[6] == 'round' and 'round' or 'rate'
    end
    if c >= pace.c then c = nil end
  end
  if pace.r > 0 then
    r = math.max(floor_rate, pace.r * start)
    if recent and tonumber(s[3]) and tonumber(s[3]) < r then r = tonumber(s[3]) end
    if r >= pace.r then r = nil end
  end
  if not r and (not c or doubled ~= 'both') then return end
  redis.call('HDEL', KEYS[8], 'pace_c', 'pace_r', 'pace_peak', 'pace_step', 'pace_kind')
  -- (a recent pace keeps its time: the climb goes on from it)
  redis.call('HSET', KEYS[8], 'pace_ss', doubled, 'pace_at', recent and s[4] or now, 'pace_event', 'start',
    'pace_why', 'slow start: no delivery lately')
  if c then redis.call('HSET', KEYS[8], 'pace_c', c) end
  if r then redis.call('HSET', KEYS[8], 'pace_r', tostring(r)) end
  change = 'start'
end

-- what settle returns: the fate and the pace change
local function answer(fate)
  if change == '' then return {fate, '', '', '', message_gone} end
  local s = redis.call('HMGET', KEYS[8], 'pace_c', 'pace_r')
  return {fate, change, s[1] or '', s[2] or '', message_gone}
end

-- after an outage without a ramp-up (pace_ss "round"), each delivery adds a
-- session: the sessions double with each round of deliveries, as TCP's slow
-- start, until the ceiling or a pushback (whose cut ends it)
local function round_climb()
  local s = redis.call('HMGET', KEYS[8], 'pace_ss', 'pace_c', 'pace_r')
  if s[1] ~= 'round' or not s[2] then return end
  local c = tonumber(s[2]) + 1
  if c < pace.c then
    redis.call('HSET', KEYS[8], 'pace_c', c)
  elseif s[3] then
    -- at the ceiling's sessions; the rate's slow start goes on each interval
    redis.call('HDEL', KEYS[8], 'pace_c')
    redis.call('HSET', KEYS[8], 'pace_ss', 'rate')
  else
    redis.call('HDEL', KEYS[8], 'pace_c', 'pace_r', 'pace_peak', 'pace_step', 'pace_kind', 'pace_why', 'pace_ss')
    redis.call('HSET', KEYS[8], 'pace_at', now, 'pace_event', 'ceiling')
    change = 'ceiling'
  end
end

-- the reply time against its recent average: a destination slowing down
local reply_ms = tonumber(ARGV[17] or '0')
local function slow_or_climb()
  local avg = tonumber(redis.call('HGET', KEYS[8], 'rt_avg') or '0')
  if reply_ms > 0 then
    redis.call('HSET', KEYS[8], 'rt_avg', tostring(avg > 0 and avg * 0.9 + reply_ms * 0.1 or reply_ms))
  end
  if avg > 0 and reply_ms > (pace.s or 4) * avg and reply_ms > avg + 500 then
    cut('slow', string.format('replies in %d ms (usually %d ms) from %s', reply_ms, avg, ARGV[12] or ''))
  else
    climb()
  end
end

local pushback, pushback_why = ARGV[15] or '', ARGV[16] or ''
local unreachable = ARGV[7]
if pushback == '' and unreachable ~= '' then
  -- no connection, while the destination answers other sessions (others in
  -- flight, a delivery within PATIENCE intervals): a pushback
  local ok_at = tonumber(redis.call('HGET', KEYS[8], 'ok_at') or '0')
  if ok_at > 0 and now - ok_at < PATIENCE * interval and redis.call('ZCARD', KEYS[3]) > 1
    and redis.call('HEXISTS', KEYS[8], 'paused_until') == 0 then
    pushback, pushback_why, unreachable = 'sessions', unreachable, ''
  end
elseif pushback ~= '' then
  local since = tonumber(redis.call('HGET', KEYS[8], 'busy_since') or '0')
  if since == 0 then
    redis.call('HSET', KEYS[8], 'busy_since', now)
  elseif now - since >= PATIENCE * interval then
    -- "not now" and nothing else for a while: the destination is down for us
    unreachable = pushback_why
    pushback = ''
  end
end
if pushback ~= '' or ARGV[4] ~= '[]' then slow_start() end
if pushback ~= '' then
  cut(pushback, pushback_why)
  -- a moment's pause before the next start (claim.lua), so a refusal is not retried at once
  redis.call('HSET', KEYS[8], 'pace_wait', now + math.floor(interval / 4))
elseif ARGV[4] ~= '[]' then
  count_success()
  round_climb()
  slow_or_climb()
end

local done = {}
for _, rcpt in ipairs(cjson.decode(ARGV[4])) do done[rcpt] = true end
local failed = cjson.decode((job_get(prefix, jid, 'failed')))
for _, entry in ipairs(cjson.decode(ARGV[5])) do
  done[entry[1]] = true
  failed[#failed + 1] = entry
end

-- a job with nothing owed ends, from location `from`: deleted, or kept in
-- <p>:failed for its DSN
local function finish(job, jobid, failures, from)
  if #failures > 0 then
    redis.call('HSET', job, 'owed', '[]', 'failed', cjson.encode(failures), 'finished', now)
    move(prefix, jobid, domain, from, 'failed', now)
    return 'failed'
  end
  local _, last = retire_job(prefix, jobid, domain, from)
  if last and jobid == jid then message_gone = '1' end
  return 'done'
end

-- whether a job has waited `limit` ms, time held not counted
local function older_than(job, limit)
  local created, base = job_get(prefix, string.sub(job, #prefix + 6), 'created', 'held_base')
  return tonumber(created) + limit + (held_now - tonumber(base or '0')) <= now
end

local function expired(job) return older_than(job, retention) end

-- a job waiting longer than the delay warning is due one warning
local warn_after = tonumber(ARGV[11] or '0')
local function warn(job, jobid)
  if warn_after > 0 and redis.call('HGET', job, 'warned') ~= '1' and older_than(job, warn_after) then
    redis.call('HSET', job, 'warned', 1)
    redis.call('ZADD', KEYS[11], now, jobid)
  end
end

-- what is still owed fails once the job has outlived its retention
local function expire(job, jobid, owed, failures, why, from)
  local expired_now = {}
  for _, rcpt in ipairs(owed) do
    local entry = {rcpt, 0, '4.4.7', 'retention expired; last error: ' .. why}
    failures[#failures + 1] = entry
    expired_now[#expired_now + 1] = entry
  end
  if #expired_now > 0 then event(job, jobid, 'failed', {'failures', cjson.encode(expired_now), 'mx', mx}) end
  return finish(job, jobid, failures, from)
end

local owed = {}
for _, rcpt in ipairs(cjson.decode((job_get(prefix, jid, 'owed')))) do
  if not done[rcpt] then owed[#owed + 1] = rcpt end
end
if #owed == 0 then
  if unreachable == '' then destination_up() end
  return answer(finish(KEYS[1], jid, failed, 'in_flight'))
end
redis.call('HSET', KEYS[1], 'owed', cjson.encode(owed))
if #failed > 0 then redis.call('HSET', KEYS[1], 'failed', cjson.encode(failed)) end

if pushback ~= '' then
  if tonumber(redis.call('HGET', KEYS[1], 'pushbacks') or '0') < PUSHBACKS then
    -- "not now": back to its place in the queue, for the next claim at the new pace
    if ARGV[7] == '' then destination_up() end
    redis.call('HINCRBY', KEYS[1], 'pushbacks', 1)
    redis.call('HSET', KEYS[1], 'error', pushback_why)
    remember('pushed back: ' .. pushback_why)
    move(prefix, jid, domain, 'in_flight', 'ready', redis.call('HGET', KEYS[1], 'seq'))
    return answer('ready')
  end
  -- pushed back often enough: this job takes the usual way
  unreachable = ARGV[7]
end

if unreachable ~= '' then
  -- the destination is down: the job keeps its place at the head and the
  -- whole domain waits, so acceptance order survives the outage
  local failures = redis.call('HINCRBY', KEYS[8], 'failures', 1)
  local until_ms = now + step(failures)
  redis.call('HSET', KEYS[8], 'paused_until', until_ms, 'last_error', unreachable)
  redis.call('ZADD', KEYS[10], until_ms, domain)
  redis.call('HSET', KEYS[1], 'error', unreachable)
  remember('unreachable: ' .. unreachable)
  if unreachable ~= last_error then
    event(KEYS[1], jid, 'deferred', {'rcpts', cjson.encode(owed), 'why', 'unreachable: ' .. unreachable, 'mx', mx})
  end
  move(prefix, jid, domain, 'in_flight', 'ready', redis.call('HGET', KEYS[1], 'seq'))
  -- jobs at the head of the queue that outlived their retention fail now
  local result = 'paused'
  for _, entry in ipairs(seqset_range(KEYS[6], 0, 100)) do
    local head = entry[1]
    local job = prefix .. ':job:' .. head
    if not expired(job) then break end
    local owed_, failed_ = job_get(prefix, head, 'owed', 'failed')
    local r = expire(job, head, cjson.decode(owed_), cjson.decode(failed_), unreachable, 'ready')
    if head == jid then result = r end
  end
  -- and those waiting past the delay warning get it (oldest first, a bounded batch)
  if warn_after > 0 then
    for _, entry in ipairs(seqset_range(KEYS[6], 0, 100)) do
      local head = entry[1]
      local job = prefix .. ':job:' .. head
      if not older_than(job, warn_after) then break end
      warn(job, head)
    end
  end
  return answer(result)
end

destination_up()
local deferred = cjson.decode(ARGV[6])
local why = 'deferred'
if #deferred > 0 then why = deferred[1][2] .. ' ' .. deferred[1][3] .. ' ' .. deferred[1][4] end
redis.call('HSET', KEYS[1], 'error', why)
remember(why)
if expired(KEYS[1]) then
  return answer(expire(KEYS[1], jid, owed, failed, why, 'in_flight'))
end
if why ~= last_error then event(KEYS[1], jid, 'deferred', {'rcpts', cjson.encode(owed), 'why', why, 'mx', mx}) end
local attempts = tonumber((job_get(prefix, jid, 'attempts')))
move(prefix, jid, domain, 'in_flight', 'deferred', now + step(attempts))
warn(KEYS[1], jid)
return answer('deferred')
