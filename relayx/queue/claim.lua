-- claim.lua: lease ready jobs to one node, in each domain's acceptance order.
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
-- ARGV[6]  default per-domain concurrency (cluster-wide)
-- ARGV[7]  JSON object domain -> concurrency, for domains configured otherwise
-- ARGV[8]  where to start in the domain list (random, for fairness)
-- ARGV[9]  most deferred jobs and expired leases to move per call
--
-- Invariant (with enqueue.lua): a job is in exactly one of ready, deferred, leased
-- or failed; a leased job has a token no earlier lease had, so settle.lua and
-- renew.lua refuse whoever held it before. A domain never has more leased jobs
-- than its concurrency, and a paused domain (<p>:dom:<d> paused_until) gets none.

local prefix, now, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local owner, limit, default_conc = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local conc = cjson.decode(ARGV[7])
local start, batch = tonumber(ARGV[8]), tonumber(ARGV[9])

local function requeue(jid)
  local job = prefix .. ':job:' .. jid
  local domain, seq = unpack(redis.call('HMGET', job, 'domain', 'seq'))
  if not domain then return end
  redis.call('ZADD', prefix .. ':ready:' .. domain, seq, jid)
  redis.call('SADD', KEYS[1], domain)
  return domain
end

-- retries that are due go back to their place in the domain's queue
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, batch)) do
  redis.call('ZREM', KEYS[2], jid)
  requeue(jid)
end

-- leases that ran out: the holder is dead or cut off; its token is void
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, batch)) do
  redis.call('ZREM', KEYS[3], jid)
  redis.call('HSET', prefix .. ':job:' .. jid, 'token', 0, 'owner', '')
  local domain = requeue(jid)
  if domain then redis.call('ZREM', prefix .. ':inflight:' .. domain, jid) end
end

local claimed = {}
local domains = redis.call('SMEMBERS', KEYS[1])
local n = #domains
for i = 0, n - 1 do
  if #claimed >= limit then break end
  local domain = domains[((start + i) % n) + 1]
  local ready = prefix .. ':ready:' .. domain
  local inflight = prefix .. ':inflight:' .. domain
  if redis.call('ZCARD', ready) == 0 then
    redis.call('SREM', KEYS[1], domain)
  else
    local paused = tonumber(redis.call('HGET', prefix .. ':dom:' .. domain, 'paused_until') or '0')
    local slots = (conc[domain] or default_conc) - redis.call('ZCARD', inflight)
    if paused <= now and slots > 0 then
      slots = math.min(slots, limit - #claimed)
      for _, jid in ipairs(redis.call('ZRANGE', ready, 0, slots - 1)) do
        local job = prefix .. ':job:' .. jid
        local token = redis.call('INCR', KEYS[4])
        local expires = now + lease_ms
        redis.call('ZREM', ready, jid)
        redis.call('HSET', job, 'token', token, 'owner', owner, 'expires', expires)
        local attempts = redis.call('HINCRBY', job, 'attempts', 1)
        redis.call('ZADD', KEYS[3], expires, jid)
        redis.call('ZADD', inflight, expires, jid)
        local qid, owed, created = unpack(redis.call('HMGET', job, 'qid', 'owed', 'created'))
        claimed[#claimed + 1] = {jid, token, expires, qid, domain, owed, attempts, created}
      end
      if redis.call('ZCARD', ready) == 0 then redis.call('SREM', KEYS[1], domain) end
    end
  end
end
return claimed
