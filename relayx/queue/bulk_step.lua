-- bulk_step.lua: record the progress of one step of a bulk action, by the node
-- holding its lease, after the step's changes were made.
--
-- KEYS[1]  <p>:bulk:<id>
-- KEYS[2]  <p>:bulk:active
-- KEYS[3]  <p>:bulk:lease:<id>   the node running it (string, with an expiry)
-- ARGV[1]  the node (lease owner)
-- ARGV[2]  the cursor after this step
-- ARGV[3]  jobs examined in this step
-- ARGV[4]  jobs matched in this step
-- ARGV[5]  messages changed in this step
-- ARGV[6]  "1" when nothing past the cursor remains
-- ARGV[7]  now (ms)
-- Returns the action's state ("running", "done", "cancelled"), or an error
-- "STALE" when the node no longer holds the lease (then nothing is recorded).
--
-- Invariant: as in bulk_start.lua; the cursor only moves forward, and only by
-- the lease's holder. A step redone after a crash (before this ran) changes
-- nothing twice: deleting or bouncing a message is done once, requeueing again
-- is harmless. Cost: O(1).

if redis.call('GET', KEYS[3]) ~= ARGV[1] then return redis.error_reply('STALE bulk lease') end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' then
  redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id') or '')
  redis.call('DEL', KEYS[3])
  return state or 'cancelled'
end
redis.call('HSET', KEYS[1], 'cursor', ARGV[2], 'updated', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'examined', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'matched', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'acted', ARGV[5])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[7])
  redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
  redis.call('DEL', KEYS[3])
  return 'done'
end
return 'running'
