-- claim.lua: lease ready jobs to one node, in acceptance order for each
-- recipient, within each domain's cluster-wide concurrency and rate.
--
-- KEYS[1]  <p>:domains    set of domains that have ready jobs
-- KEYS[2]  <p>:deferred   zset jid -> due time (ms) of jobs waiting for a retry
-- KEYS[3]  <p>:leased     zset jid -> lease expiry (ms)
-- KEYS[4]  <p>:fence      fencing token counter (INCR, never reused)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  now (ms)
-- ARGV[3]  lease duration (ms)
-- ARGV[4]  owner (node id)
-- ARGV[5]  most jobs to lease
-- ARGV[6]  JSON default throttle {"c": concurrency, "r": messages/s (0: no limit), "u": ramp-up ms};
--          a domain's adaptive pace (pace_c, pace_r: settle.lua) may hold it lower
-- ARGV[7]  JSON object domain -> throttle, for domains configured otherwise
-- ARGV[8]  where to start in the domain list (random, for fairness)
-- ARGV[9]  most deferred jobs and expired leases to move per call
-- Returns {leases, wake, taken_over}: each lease {jid, token, expires, qid, domain, owed,
-- attempts, created, sender, body, dsn}, the earliest time (ms) a rate-limited domain
-- gets its next token (0: none), and how many expired leases this call took back. The
-- message's sender, body and DSN fields come with the lease (saving the delivery a
-- round trip) when the body is at most PREFETCH_MAX bytes (a body store's stub always
-- is); else body is nil and the delivery reads them itself.
--
-- Invariant (with enqueue.lua): a job is in exactly one location (common.lua),
-- changed only through move(), which keeps the counters; a leased job has a
-- token no earlier lease had, so settle.lua and renew.lua refuse whoever held
-- it before. A domain never has more leased jobs than its concurrency, never
-- takes more than its token bucket allows, and a paused or held domain gets none.
-- Order per mailbox: a job is leased only when none of its recipients is busy
-- (<p>:busy:<q>: a job of the queue for them in flight or deferred) and no
-- earlier ready job of the queue is for one of them; so a mailbox receives in
-- acceptance order while other mailboxes of the domain are delivered in
-- parallel, a job for several recipients keeps its place for each, and a
-- deferred job (a 4xx for one recipient) holds that recipient's later mail
-- back until its retry. A job whose recipients are all busy is passed over,
-- not waited on: the domain's other mailboxes go ahead.
--
-- Cost bound, whatever the queue's depth: 2 * ARGV[9] jobs moved back (each O(1)
-- keys, O(log n) writes), SMEMBERS of <p>:domains and O(1) reads per domain,
-- at most SCAN_BUDGET (400) jobs of the ready heads looked at (each two reads;
-- the window is one seqset_range of the queue's ready seqset <p>:rq:<q>, at most
-- window + 1 chunks, common.lua) and at most ARGV[5] of them leased (each: its job
-- and message hashes, a reply of at most PREFETCH_MAX bytes of body); never a walk
-- of a queue. With ARGV[5], ARGV[9] <= 100 it touches about a thousand keys.

local prefix, now, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local owner, limit = ARGV[4], tonumber(ARGV[5])
local default, throttles = cjson.decode(ARGV[6]), cjson.decode(ARGV[7])
local start, batch = tonumber(ARGV[8]), tonumber(ARGV[9])

-- a job goes back to its place in its queue (a stale entry without a job is dropped)
local function requeue(jid, from, key)
  local domain, seq = unpack(redis.call('HMGET', prefix .. ':job:' .. jid, 'domain', 'seq'))
  if not domain then
    redis.call('ZREM', key, jid)
    return
  end
  move(prefix, jid, domain, from, 'ready', seq)
end

-- retries that are due go back to their place in the domain's queue
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, batch)) do
  requeue(jid, 'deferred', KEYS[2])
end

-- leases that ran out: the holder is dead or cut off; its token is void
local taken_over = 0
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, batch)) do
  taken_over = taken_over + 1
  redis.call('HDEL', prefix .. ':job:' .. jid, 'token', 'owner', 'expires')
  requeue(jid, 'in_flight', KEYS[3])
end

-- how many jobs the domain may start now (at most `room`), and when it may
-- start the next if its rate is what stops it (0: not the rate)
local function allowance(dom, domain, inflight, room)
  local t = throttles[domain] or default
  local s = redis.call('HMGET', dom, 'pace_c', 'release_rate', 'tokens', 'tokens_at', 'pace_r', 'pace_wait')
  local cap, rate = t.c, t.r
  -- the adaptive pace (settle.lua) runs at or below the configured ceiling, and
  -- nothing starts for a moment after a pushback
  local wait = tonumber(s[6] or '0')
  if wait > now then return 0, wait end
  local pace_c, pace_r = tonumber(s[1]), tonumber(s[5])
  if pace_c and pace_c < cap then cap = pace_c end
  if pace_r and (rate == 0 or pace_r < rate) then rate = pace_r end
  local release = tonumber(s[2] or '0')
  if release > 0 and (rate == 0 or release < rate) then rate = release end
  local slots = math.min(cap - inflight, room)
  if slots <= 0 then return 0, 0 end
  if rate <= 0 then return slots, 0 end
  local burst = math.max(1, rate / 20)
  local tokens = tonumber(s[3] or tostring(burst))
  local at = tonumber(s[4] or tostring(now))
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
  local take = math.min(slots, math.floor(tokens))
  tokens = tokens - take
  redis.call('HSET', dom, 'tokens', tostring(tokens), 'tokens_at', now)
  local wake = 0
  if take < slots then wake = now + math.ceil((1 - tokens) * 1000 / rate) end
  return take, wake
end

-- How far down a domain's ready queue a claim looks for jobs whose recipients
-- are free: WINDOW_PER_SLOT jobs per job it may start, at least WINDOW_MIN, and
-- SCAN_BUDGET jobs in all per call (each: two reads).
local WINDOW_PER_SLOT, WINDOW_MIN, SCAN_BUDGET = 4, 32, 400
-- the largest body sent with its lease (larger ones are read by the delivery)
local PREFETCH_MAX = 65536

local claimed, wake, scanned = {}, 0, 0
local domains = redis.call('SMEMBERS', KEYS[1])
local n = #domains
for i = 0, n - 1 do
  if #claimed >= limit then break end
  local domain = domains[((start + i) % n) + 1]
  local ready = prefix .. ':rq:' .. domain
  local inflight = prefix .. ':inflight:' .. domain
  local dom = prefix .. ':dom:' .. domain
  if seqset_empty(ready) then
    redis.call('SREM', KEYS[1], domain)
    redis.call('HDEL', dom, 'release_rate')
  else
    local held = held_clock(prefix .. ':dom:' .. base_domain(domain), now)
    local paused = tonumber(redis.call('HGET', dom, 'paused_until') or '0')
    if not held and paused <= now and scanned < SCAN_BUDGET then
      local take, next_token = allowance(dom, domain, redis.call('ZCARD', inflight), limit - #claimed)
      if next_token > 0 and (wake == 0 or next_token < wake) then wake = next_token end
      if take > 0 then
        -- the head of the queue, in acceptance order: a job is leased only if
        -- none of its recipients is busy (in flight or deferred, common.lua)
        -- nor wanted by an earlier ready job passed over in this window
        local window = math.min(math.max(take * WINDOW_PER_SLOT, WINDOW_MIN), SCAN_BUDGET - scanned)
        local busy = prefix .. ':busy:' .. domain
        local seen, taken = {}, 0
        for _, head in ipairs(seqset_range(ready, 0, window)) do
          local jid = head[1]
          scanned = scanned + 1
          local job = prefix .. ':job:' .. jid
          local rcpts = {}
          for _, rcpt in ipairs(cjson.decode(redis.call('HGET', job, 'rcpts') or '[]')) do
            rcpts[#rcpts + 1] = string.lower(rcpt)
          end
          local free = true
          for _, rcpt in ipairs(rcpts) do
            if seen[rcpt] then free = false end
            seen[rcpt] = true
          end
          if free and #rcpts > 0 then
            for _, n in ipairs(redis.call('HMGET', busy, unpack(rcpts))) do
              if n then free = false end
            end
          end
          if free then
            local token = redis.call('INCR', KEYS[4])
            local expires = now + lease_ms
            move(prefix, jid, domain, 'ready', 'in_flight', expires)
            redis.call('HSET', job, 'token', token, 'owner', owner, 'expires', expires)
            local attempts = redis.call('HINCRBY', job, 'attempts', 1)
            local qid, owed, created = job_get(prefix, jid, 'qid', 'owed', 'created')
            local msg = msg_key(prefix, qid)
            local sender, dsn = unpack(redis.call('HMGET', msg, 'sender', 'dsn'))
            local body = false
            if redis.call('HSTRLEN', msg, 'body') <= PREFETCH_MAX then body = redis.call('HGET', msg, 'body') end
            claimed[#claimed + 1] = {jid, token, expires, qid, domain, owed, attempts, created, sender or false,
              body or false, dsn or false}
            taken = taken + 1
            if taken >= take then break end
          end
        end
        if taken < take and tonumber(redis.call('HGET', dom, 'tokens_at') or '0') == now then
          -- the rate's tokens not used because their recipients were busy go back
          redis.call('HINCRBYFLOAT', dom, 'tokens', take - taken)
        end
        if seqset_empty(ready) then redis.call('SREM', KEYS[1], domain) end
      end
    end
  end
end
return {claimed, wake, taken_over}
