-- bulk_cancel.lua: stop a running bulk action (what it already changed stays changed).
--
-- KEYS[1]  <p>:bulk:<id>
-- KEYS[2]  <p>:bulk:active
-- KEYS[3]  <p>:audit
-- ARGV[1]  id
-- ARGV[2]  now (ms)
-- ARGV[3]  the audit record (JSON)
-- ARGV[4]  how many audit records to keep
-- Returns 1, or 0 when it was not running.
--
-- Invariant: as in bulk_start.lua. Cost: O(1).

if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished', ARGV[2], 'updated', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
audit(KEYS[3], ARGV[3], ARGV[4])
return 1
