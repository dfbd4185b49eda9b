-- resume.lua: a probe found a failing destination up again: its domain's queue
-- goes at once instead of waiting out the backoff.
--
-- KEYS[1]  <p>:dom:<domain>
-- KEYS[2]  <p>:paused
-- ARGV[1]  now (ms)
-- ARGV[2]  domain
-- ARGV[3]  "1": the throttle has a ramp_up (the sessions climb back over it);
--          "0": none (a session more per delivery: pace_ss "round", settle.lua)
--
-- Invariant: a domain is in <p>:paused exactly while its paused_until is set;
-- the destination's pace starts at one session and climbs (settle.lua).
-- Cost bound: two keys.

if redis.call('HEXISTS', KEYS[1], 'paused_until') == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'paused_until', 'failures', 'last_error')
redis.call('HSET', KEYS[1], 'pace_c', 1, 'pace_at', ARGV[1], 'pace_event', 'cut', 'pace_kind', 'sessions',
  'pace_why', 'the destination came back')
if ARGV[3] == '0' then redis.call('HSET', KEYS[1], 'pace_ss', 'round') end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
