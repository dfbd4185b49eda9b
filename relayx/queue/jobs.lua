-- jobs.lua: list and search the queue for an operator (reads only).
--
-- KEYS[1]  <p>:deferred
-- KEYS[2]  <p>:failed
-- ARGV[1]  key prefix <p>
-- ARGV[2]  JSON array of delivery queues to look in (example.org, example.org#1, ...)
-- ARGV[3]  JSON filter {"sender": substring, "recipient": substring, "state": one of
--          ready held deferred in_flight failed, "before": ms, "after": ms}; each optional
-- ARGV[4]  how many matches to skip (the page's offset)
-- ARGV[5]  most matches to return
-- ARGV[6]  now (ms)
-- Returns JSON {"total": matches, "states": {state: matches}, "oldest": ms (0: none),
-- "jobs": [{jid, qid, domain, state, sender, rcpts, owed, created, attempts, error},
-- ...]}, each queue's jobs in acceptance order.
--
-- Invariant: none changed. The scan is bounded by the queues named; an operator
-- searching a queue of a million jobs waits for it, the queue does not change.

local prefix = ARGV[1]
local queues, filter = cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local skip, limit, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function lower(s) return string.lower(s or '') end
local want_sender, want_rcpt = lower(filter.sender), lower(filter.recipient)

local total, found, states, oldest = 0, {}, {}, 0
local function consider(jid, domain, state)
  local job = prefix .. ':job:' .. jid
  local qid, rcpts, owed, created, attempts, err = unpack(redis.call('HMGET', job,
    'qid', 'rcpts', 'owed', 'created', 'attempts', 'error'))
  if not qid then return end
  created = tonumber(created)
  if filter.state and filter.state ~= state then return end
  if filter.before and created >= filter.before then return end
  if filter.after and created < filter.after then return end
  if want_rcpt ~= '' and not string.find(lower(rcpts), want_rcpt, 1, true) then return end
  local sender = redis.call('HGET', prefix .. ':msg:' .. qid, 'sender') or ''
  if want_sender ~= '' and not string.find(lower(sender), want_sender, 1, true) then return end
  total = total + 1
  states[state] = (states[state] or 0) + 1
  if oldest == 0 or created < oldest then oldest = created end
  if total > skip and #found < limit then
    found[#found + 1] = {jid = jid, qid = qid, domain = domain, state = state, sender = sender,
      rcpts = cjson.decode(rcpts), owed = cjson.decode(owed), created = created,
      attempts = tonumber(attempts or '0'), error = err or ''}
  end
end

local elsewhere = {}
for _, jid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do elsewhere[jid] = 'deferred' end
for _, jid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do elsewhere[jid] = 'failed' end

for _, domain in ipairs(queues) do
  local held = held_at(prefix .. ':dom:' .. base_domain(domain), now)
  for _, jid in ipairs(redis.call('ZRANGE', prefix .. ':inflight:' .. domain, 0, -1)) do
    consider(jid, domain, 'in_flight')
  end
  for _, jid in ipairs(redis.call('ZRANGE', prefix .. ':ready:' .. domain, 0, -1)) do
    consider(jid, domain, held and 'held' or 'ready')
  end
  for jid, state in pairs(elsewhere) do
    if redis.call('HGET', prefix .. ':job:' .. jid, 'domain') == domain then consider(jid, domain, state) end
  end
end
return cjson.encode({total = total, states = states, oldest = oldest, jobs = found})
