-- recount.lua: a consistency check's repair: set one queue's counters (or the
-- totals) to a recount, only if nothing changed them while it was counted.
--
-- KEYS[1]  <p>:count:<q>, or <p>:totals
-- ARGV[1]  its change counter ("v") as read before the recount began
-- ARGV[2..] field, value pairs: the recount
-- Returns 1 if set, 0 if the queue changed meanwhile (count again).
--
-- Invariant: counters equal their recount once set; a queue that moved during
-- the recount is not touched, so a repair on a live queue never writes a stale count.
-- Cost bound: one key.

if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'v', 1)
return 1
