-- settle.lua: record a delivery attempt's outcome and end its lease.
--
-- KEYS[1]  <p>:job:<jid>
-- KEYS[2]  <p>:leased
-- KEYS[3]  <p>:inflight:<domain>
-- KEYS[4]  <p>:deferred
-- KEYS[5]  <p>:failed        zset jid -> time, jobs with failed recipients (for the DSN)
-- KEYS[6]  <p>:ready:<domain>
-- KEYS[7]  <p>:domains
-- KEYS[8]  <p>:dom:<domain>  domain state (see common.lua)
-- KEYS[9]  <p>:msg:<qid>
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
-- Returns "done", "failed", "deferred" or "paused".
--
-- Invariant: as in enqueue.lua. Only the current token's holder settles; recipients
-- once accepted or failed are never owed again, so a retry resends only to the rest.
-- A domain is in <p>:paused exactly while its paused_until is set. Every change
-- of a job's location goes through move() (common.lua), keeping the counters.
--
-- Cost bound, whatever the queue's depth: O(1) keys for the job itself; when the
-- destination is unreachable, the queue's first 100 jobs are looked at twice
-- (retention, delay warning), each O(1) keys: at most ~1,000 keys, O(log n) writes.

local jid, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HGET', KEYS[1], 'token') ~= token then
  return redis.error_reply('STALE lease token')
end
local retention, prefix = tonumber(ARGV[8]), ARGV[10]
local domain = redis.call('HGET', KEYS[1], 'domain')
local schedule = {}
for step in string.gmatch(ARGV[9], '[^,]+') do schedule[#schedule + 1] = tonumber(step) end
local function step(n) return schedule[math.max(1, math.min(n, #schedule))] end
local _, held_now = held_clock(prefix .. ':dom:' .. base_domain(domain), now)

-- the job is still in flight until one of the moves below takes it elsewhere
redis.call('HSET', KEYS[1], 'token', 0, 'owner', '')

-- the job's last attempts that did not end it, for an operator's message view
local function remember(what)
  local history = cjson.decode(redis.call('HGET', KEYS[1], 'history') or '[]')
  history[#history + 1] = {now, what}
  if #history > 10 then table.remove(history, 1) end
  redis.call('HSET', KEYS[1], 'history', cjson.encode(history))
end

-- the destination answered: it is up, whatever it said about these recipients
local function destination_up()
  if redis.call('HEXISTS', KEYS[8], 'failures') == 1 then
    redis.call('HSET', KEYS[8], 'recovered_at', now)
  end
  redis.call('HDEL', KEYS[8], 'paused_until', 'failures', 'last_error')
  redis.call('ZREM', KEYS[10], domain)
end

local done = {}
for _, rcpt in ipairs(cjson.decode(ARGV[4])) do done[rcpt] = true end
local failed = cjson.decode(redis.call('HGET', KEYS[1], 'failed'))
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
  retire_job(prefix, jobid, domain, from)
  return 'done'
end

-- whether a job has waited `limit` ms, time held not counted
local function older_than(job, limit)
  local created, base = unpack(redis.call('HMGET', job, 'created', 'held_base'))
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
  for _, rcpt in ipairs(owed) do
    failures[#failures + 1] = {rcpt, 0, '4.4.7', 'retention expired; last error: ' .. why}
  end
  return finish(job, jobid, failures, from)
end

local owed = {}
for _, rcpt in ipairs(cjson.decode(redis.call('HGET', KEYS[1], 'owed'))) do
  if not done[rcpt] then owed[#owed + 1] = rcpt end
end
if #owed == 0 then
  if ARGV[7] == '' then destination_up() end
  return finish(KEYS[1], jid, failed, 'in_flight')
end
redis.call('HSET', KEYS[1], 'owed', cjson.encode(owed), 'failed', cjson.encode(failed))

local unreachable = ARGV[7]
if unreachable ~= '' then
  -- the destination is down: the job keeps its place at the head and the
  -- whole domain waits, so acceptance order survives the outage
  local failures = redis.call('HINCRBY', KEYS[8], 'failures', 1)
  local until_ms = now + step(failures)
  redis.call('HSET', KEYS[8], 'paused_until', until_ms, 'last_error', unreachable)
  redis.call('HDEL', KEYS[8], 'recovered_at')
  redis.call('ZADD', KEYS[10], until_ms, domain)
  redis.call('HSET', KEYS[1], 'error', unreachable)
  remember('unreachable: ' .. unreachable)
  move(prefix, jid, domain, 'in_flight', 'ready', redis.call('HGET', KEYS[1], 'seq'))
  -- jobs at the head of the queue that outlived their retention fail now
  local result = 'paused'
  for _, head in ipairs(redis.call('ZRANGE', KEYS[6], 0, 99)) do
    local job = prefix .. ':job:' .. head
    if not expired(job) then break end
    local r = expire(job, head, cjson.decode(redis.call('HGET', job, 'owed')),
      cjson.decode(redis.call('HGET', job, 'failed')), unreachable, 'ready')
    if head == jid then result = r end
  end
  -- and those waiting past the delay warning get it (oldest first, a bounded batch)
  if warn_after > 0 then
    for _, head in ipairs(redis.call('ZRANGE', KEYS[6], 0, 99)) do
      local job = prefix .. ':job:' .. head
      if not older_than(job, warn_after) then break end
      warn(job, head)
    end
  end
  return result
end

destination_up()
local deferred = cjson.decode(ARGV[6])
local why = 'deferred'
if #deferred > 0 then why = deferred[1][2] .. ' ' .. deferred[1][3] .. ' ' .. deferred[1][4] end
redis.call('HSET', KEYS[1], 'error', why)
remember(why)
if expired(KEYS[1]) then
  return expire(KEYS[1], jid, owed, failed, why, 'in_flight')
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
move(prefix, jid, domain, 'in_flight', 'deferred', now + step(attempts))
warn(KEYS[1], jid)
return 'deferred'
