-- counts.lua: how many jobs each delivery queue holds, by state, and its oldest
-- job's arrival, for summaries and metrics (reads only).
--
-- KEYS[1]  <p>:failed   zset of jobs waiting for their DSN (usually few)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  JSON array of delivery queues
-- ARGV[3]  now (ms)
-- ARGV[4]  most entries of <p>:failed to look at
-- Returns JSON {"total": n, "states": {state: n}, "oldest": ms (0: none), "exact": bool}
-- over all the queues named.
--
-- Cost bound: O(1) reads per queue (ZCARD of <p>:q:<queue>, its ready and
-- in-flight zsets, its head), plus ARGV[4] entries of <p>:failed. Deferred is
-- what is left: total - ready/held - in flight - failed; "exact" is false when
-- <p>:failed held more entries than were looked at (then failed ones past the
-- bound count as deferred).
-- Invariant: none changed.

local prefix, queues, now, most = ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local wanted = {}
for _, q in ipairs(queues) do wanted[q] = true end

local failed = {}
local sample = redis.call('ZRANGE', KEYS[1], 0, most - 1)
for _, jid in ipairs(sample) do
  local domain = redis.call('HGET', prefix .. ':job:' .. jid, 'domain')
  if domain and wanted[domain] then failed[domain] = (failed[domain] or 0) + 1 end
end

local total, states, oldest = 0, {}, 0
local function add(state, n)
  if n > 0 then states[state] = (states[state] or 0) + n end
end
for _, q in ipairs(queues) do
  local all = redis.call('ZCARD', prefix .. ':q:' .. q)
  local ready = redis.call('ZCARD', prefix .. ':ready:' .. q)
  local inflight = redis.call('ZCARD', prefix .. ':inflight:' .. q)
  local f = failed[q] or 0
  total = total + all
  add(held_at(prefix .. ':dom:' .. base_domain(q), now) and 'held' or 'ready', ready)
  add('in_flight', inflight)
  add('failed', f)
  add('deferred', math.max(0, all - ready - inflight - f))
  local head = redis.call('ZRANGE', prefix .. ':q:' .. q, 0, 0)
  if head[1] then
    local created = tonumber(redis.call('HGET', prefix .. ':job:' .. head[1], 'created') or '0')
    if created > 0 and (oldest == 0 or created < oldest) then oldest = created end
  end
end
return cjson.encode({total = total, states = states, oldest = oldest,
  exact = redis.call('ZCARD', KEYS[1]) <= most})
