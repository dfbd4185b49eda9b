-- history.lua: record one sample of the queue's history, an entry at the
-- sample's time in each domain's stream and in the cluster's.
--
-- KEYS[1..n]  the streams: <p>:history:d:<domain> for domains, <p>:history:cluster
-- ARGV[1]  the sample's time (ms); each entry's id is <ms>-0
-- ARGV[2]  entries kept per stream: older ones are trimmed (XADD MAXLEN)
-- ARGV[3]  JSON array, one per key: the entry's [field, value, ...], values as strings
-- Returns how many streams took the entry.
--
-- Cost bound: per key, one XREVRANGE of one entry and one XADD that trims the
-- oldest entry once the stream is full: O(1). The caller passes at
-- most 500 keys a call.
-- Invariant: a stream's ids grow with time and it has at most one entry per
-- sample time: a stream whose newest entry is not older than ARGV[1] (another
-- node's sample, or this node's clock behind) is left as it is.

local at, kept = tonumber(ARGV[1]), ARGV[2]
local rows = cjson.decode(ARGV[3])
local written = 0
for i, key in ipairs(KEYS) do
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if not last or tonumber(string.match(last[1], '^(%d+)')) < at then
    redis.call('XADD', key, 'MAXLEN', kept, ARGV[1] .. '-0', unpack(rows[i]))
    written = written + 1
  end
end
return written
