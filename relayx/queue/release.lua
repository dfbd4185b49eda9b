-- release.lua: end a domain's hold (and cancel a scheduled one), optionally at a rate.
--
-- KEYS[1]  <p>:dom:<domain>
-- KEYS[2]  <p>:held
-- KEYS[3]  <p>:audit
-- ARGV[1]  now (ms)
-- ARGV[2]  release rate, messages/s while the backlog drains (0: the domain's own)
-- ARGV[3]  domain
-- ARGV[4]  the audit record (JSON), to which the hold as it was is added ("previous")
-- ARGV[5]  how many audit records to keep
--
-- Returns {held before (1/0), its scheduled start (ms, 0: none), its end (ms, 0: none)}:
-- a scheduled start means a scheduled hold was cancelled.
--
-- Invariant: as in common.lua; the time held so far is added to held_ms once.
-- Moves no job: the ready jobs count as ready again (common.lua).
-- Cost bound: three keys.

local now, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local held, total = held_clock(KEYS[1], now)
local s = redis.call('HMGET', KEYS[1], 'hold_start', 'hold_end')
local was_start, was_end = tonumber(s[1] or '0'), tonumber(s[2] or '0')
redis.call('HSET', KEYS[1], 'held', 0, 'held_ms', total)
redis.call('HDEL', KEYS[1], 'held_since', 'hold_start', 'hold_end', 'tokens', 'tokens_at')
if rate > 0 then redis.call('HSET', KEYS[1], 'release_rate', rate) else redis.call('HDEL', KEYS[1], 'release_rate') end
redis.call('SREM', KEYS[2], ARGV[3])
audit(KEYS[3], with_previous(ARGV[4], cjson.encode({held = held, start = was_start, ['end'] = was_end})), ARGV[5])
return {held and 1 or 0, was_start, was_end}
