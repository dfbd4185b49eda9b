-- summary.lua: what each delivery queue holds, from its counters (reads only).
--
-- KEYS[1]  <p>:totals
-- ARGV[1]  key prefix <p>
-- ARGV[2]  JSON array of delivery queues (example.org, example.org#1, ...)
-- ARGV[3]  now (ms)
-- Returns JSON {"queues": [[ready, deferred, in_flight, failed, bytes, oldest
-- arrival (ms, 0: none), held (0/1)], ...] in the order asked, "totals":
-- [messages, bytes, jobs]}. States as defined at the top of common.lua: while a
-- domain is held, its ready jobs are counted as held (the caller reads them so).
--
-- Invariant: none changed.
-- Cost bound: per queue one HMGET of <p>:count:<q>, the head of <p>:q:<q>
-- (O(log n)) and its job's arrival, and the domain's hold: O(queues) keys,
-- whatever the depth.

local prefix, queues, now = ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3])
local out = {}
for _, q in ipairs(queues) do
  local c = redis.call('HMGET', prefix .. ':count:' .. q, 'ready', 'deferred', 'in_flight', 'failed', 'bytes')
  local oldest = 0
  local head = redis.call('ZRANGE', prefix .. ':q:' .. q, 0, 0)
  if head[1] then oldest = tonumber(job_get(prefix, head[1], 'created') or '0') end
  local held = 0
  if held_at(prefix .. ':dom:' .. base_domain(q), now) then held = 1 end
  out[#out + 1] = {tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(c[3] or '0'), tonumber(c[4] or '0'),
    tonumber(c[5] or '0'), oldest, held}
end
local t = redis.call('HMGET', KEYS[1], 'messages', 'bytes', 'jobs')
return cjson.encode({queues = out, totals = {tonumber(t[1] or '0'), tonumber(t[2] or '0'), tonumber(t[3] or '0')}})
