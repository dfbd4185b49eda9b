-- bulk_start.lua: record an operator's bulk action (delete, bounce or requeue
-- every message matching a filter) for the nodes to run in bounded steps.
--
-- KEYS[1]  <p>:bulk:<id>      the action: action, queues, filter, who, created, state,
--                             cursor, examined, matched, acted, updated, finished
-- KEYS[2]  <p>:bulks          zset id -> created, the actions kept for operators to read
-- KEYS[3]  <p>:bulk:active    set of the ids still running (read by every node)
-- KEYS[4]  <p>:audit
-- ARGV[1]  id
-- ARGV[2]  action: delete, bounce or requeue
-- ARGV[3]  JSON array of delivery queues
-- ARGV[4]  JSON filter (as page.lua takes it)
-- ARGV[5]  who
-- ARGV[6]  now (ms)
-- ARGV[7]  the audit record (JSON), written once here for the whole action
-- ARGV[8]  how many audit records to keep
-- ARGV[9]  how many finished actions to keep
-- Returns 1, or an error if the id is taken.
--
-- Invariant: an action is in <p>:bulk:active exactly while its state is
-- "running". Cost: O(1), plus the removal of at most one old finished action.

if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('DUPLICATE bulk action ' .. ARGV[1]) end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'action', ARGV[2], 'queues', ARGV[3], 'filter', ARGV[4],
  'who', ARGV[5], 'created', ARGV[6], 'updated', ARGV[6], 'state', 'running', 'cursor', 0,
  'examined', 0, 'matched', 0, 'acted', 0)
redis.call('ZADD', KEYS[2], tonumber(ARGV[6]), ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
audit(KEYS[4], ARGV[7], ARGV[8])
if redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[9]) then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  local key = string.gsub(KEYS[1], '[^:]*$', '') .. oldest
  if redis.call('SISMEMBER', KEYS[3], oldest) == 0 then
    redis.call('ZREM', KEYS[2], oldest)
    redis.call('DEL', key)
  end
end
return 1
