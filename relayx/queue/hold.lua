-- hold.lua: hold a domain (accept and queue, deliver nothing), now or for a scheduled window.
--
-- KEYS[1]  <p>:dom:<domain>
-- KEYS[2]  <p>:held          set of domains with a hold, current or scheduled
-- KEYS[3]  <p>:audit         operators' changes (see common.lua)
-- ARGV[1]  now (ms)
-- ARGV[2]  start (ms); 0 or <= now: at once
-- ARGV[3]  end (ms); 0: until released
-- ARGV[4]  domain
-- ARGV[5]  the audit record (JSON), to which the hold as it was is added ("previous")
-- ARGV[6]  how many audit records to keep
-- ARGV[7]  "1": replace a scheduled hold, or a hold in force by a scheduled one
--
-- Returns {applied (1/0), held before (1/0), its scheduled start (ms, 0: none), its end (ms, 0: none)}.
-- Without ARGV[7] nothing changes (applied 0, no audit record) when a hold is
-- scheduled and not begun, or when one is in force and the new one starts later:
-- an operator's hold never silently replaces another's window.
--
-- Invariant: as in common.lua; a hold already in force keeps its held_since, so
-- the held time is counted once. Every change has its audit record naming the
-- hold before it. Moves no job: held is read from the domain (common.lua).
-- Cost bound: three keys.

local now, start, stop = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = held_clock(KEYS[1], now)
local s = redis.call('HMGET', KEYS[1], 'hold_start', 'hold_end')
local was_start, was_end = tonumber(s[1] or '0'), tonumber(s[2] or '0')
local before = {held and 1 or 0, was_start, was_end}
if ARGV[7] ~= '1' and ((was_start > now) or (held and start > now)) then
  return {0, before[1], before[2], before[3]}
end
if start <= now then
  if not held then redis.call('HSET', KEYS[1], 'held', 1, 'held_since', now) end
  redis.call('HDEL', KEYS[1], 'hold_start')
else
  if held then
    -- replaced by a later window: the hold in force ends now
    local _, total = held_clock(KEYS[1], now)
    redis.call('HSET', KEYS[1], 'held', 0, 'held_ms', total)
    redis.call('HDEL', KEYS[1], 'held_since')
  end
  redis.call('HSET', KEYS[1], 'hold_start', start)
end
if stop > 0 then redis.call('HSET', KEYS[1], 'hold_end', stop) else redis.call('HDEL', KEYS[1], 'hold_end') end
redis.call('SADD', KEYS[2], ARGV[4])
audit(KEYS[3], with_previous(ARGV[5], cjson.encode({held = held, start = was_start, ['end'] = was_end})), ARGV[6])
return {1, before[1], before[2], before[3]}
