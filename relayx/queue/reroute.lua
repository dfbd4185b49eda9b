-- reroute.lua: change where a domain's mail goes, with an audit record, in one step.
--
-- KEYS[1]  <p>:routes   hash domain -> JSON array of routes, overriding the configuration
-- KEYS[2]  <p>:audit    list of JSON audit records, newest first
-- ARGV[1]  domain
-- ARGV[2]  JSON array of routes, or "" to go back to the configured routes
-- ARGV[3]  the audit record (JSON), to which the previous override is added as
--          "previous" (a JSON array of routes, or null: the configured ones)
-- ARGV[4]  how many audit records to keep
--
-- Invariant: every change of a domain's routes has its audit record, and the
-- record names what the routes were before. Returns the previous override or "".
-- Moves no job: queued jobs stay in their queue and go to the new routes.
-- Cost bound: two keys.

local previous = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local before = previous
if before == '' then before = 'null' end
redis.call('LPUSH', KEYS[2], string.sub(ARGV[3], 1, -2) .. ',"previous":' .. before .. '}')
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
return previous
