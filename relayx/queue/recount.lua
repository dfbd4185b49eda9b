-- recount.lua: a consistency check's repair: set one queue's counters and busy
-- recipients (or the totals) to a recount, only if nothing changed them while
-- it was counted.
--
-- KEYS[1]  <p>:count:<q>, or <p>:totals
-- KEYS[2]  <p>:busy:<q> (common.lua), or <p>:totals again for the totals
-- ARGV[1]  its change counter ("v") as read before the recount began
-- ARGV[2]  JSON object recipient -> n: the busy recount, or "" to leave KEYS[2] alone
-- ARGV[3..] field, value pairs: the recount
-- Returns 1 if set, 0 if the queue changed meanwhile (count again).
--
-- Invariant: counters equal their recount once set; a queue that moved during
-- the recount is not touched (every move changes its "v"), so a repair on a
-- live queue never writes a stale count.
-- Cost bound: two keys (the busy hash rewritten: one field per recipient of
-- the queue's jobs in flight or deferred).

if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] ~= '' then
  redis.call('DEL', KEYS[2])
  for rcpt, n in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[2], rcpt, n) end
end
redis.call('HINCRBY', KEYS[1], 'v', 1)
return 1
