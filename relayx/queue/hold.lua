-- hold.lua: hold a domain (accept and queue, deliver nothing), now or for a scheduled window.
--
-- KEYS[1]  <p>:dom:<domain>
-- KEYS[2]  <p>:held          set of domains with a hold, current or scheduled
-- KEYS[3]  <p>:audit         operators' changes (see common.lua)
-- ARGV[1]  now (ms)
-- ARGV[2]  start (ms); 0 or <= now: at once
-- ARGV[3]  end (ms); 0: until released
-- ARGV[4]  domain
-- ARGV[5]  the audit record (JSON)
-- ARGV[6]  how many audit records to keep
--
-- Invariant: as in common.lua; a hold already in force keeps its held_since, so
-- the held time is counted once. Moves no job: held is read from the domain (common.lua).
-- Cost bound: three keys.

local now, start, stop = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = held_clock(KEYS[1], now)
if start <= now then
  if not held then redis.call('HSET', KEYS[1], 'held', 1, 'held_since', now) end
  redis.call('HDEL', KEYS[1], 'hold_start')
else
  redis.call('HSET', KEYS[1], 'hold_start', start)
end
if stop > 0 then redis.call('HSET', KEYS[1], 'hold_end', stop) else redis.call('HDEL', KEYS[1], 'hold_end') end
redis.call('SADD', KEYS[2], ARGV[4])
audit(KEYS[3], ARGV[5], ARGV[6])
return 1
