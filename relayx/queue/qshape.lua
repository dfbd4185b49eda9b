-- qshape.lua: how many of a delivery queue's jobs fall in each age bucket (like
-- Postfix's qshape), one bounded slice of the queue per call (reads only).
--
-- KEYS[1]  the queue's acceptance-ordered seqset (common.lua): <p>:aq:<queue>
--          (every job) or <p>:rq:<queue> (jobs waiting their turn: ready or held)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  now (ms)
-- ARGV[3]  cursor: the start of the last chunk already counted (-1: from the start)
-- ARGV[4]  most chunks to count in this call
-- ARGV[5], ARGV[6], ...  bucket edges: ages in ms, ascending
-- Returns {cursor, n0, n1, ..., nk} for this slice: the start of the last chunk
-- counted (-1: none left, done), n0 jobs at most the first edge old, n_i older
-- than edge i and at most edge i+1, nk older than the last edge. The caller adds
-- the slices up.
--
-- A seqset is ordered by acceptance sequence, not time, but acceptance order is
-- time order (give or take the nodes' clock skew): within a chunk the jobs older
-- than an edge are a prefix, found from the chunk's first and last job and, for
-- a chunk an edge falls in, by bisection over each job's "created". A job within
-- the skew of an edge may be counted in the bucket beside its own.
-- Cost bound: per chunk a ZCARD, its first and last job (two ZRANGEs, two HGETs)
-- and, per edge that falls inside it, at most 8 probes (a ZRANGE and an HGET);
-- ARGV[4] chunks per call (the caller passes 200: ~1,000 keys, plus the few
-- chunks an edge falls in), whatever the depth. A queue of 1,000,000 jobs has
-- about 7,800 chunks when appends filled them (a split leaves two of 64): ~40 calls.
-- Invariant: none changed.

local base, prefix, now = KEYS[1], ARGV[1], tonumber(ARGV[2])
local cursor, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local edges = {}
for i = 5, #ARGV do edges[#edges + 1] = now - tonumber(ARGV[i]) end

local counts = {}
for i = 1, #edges + 1 do counts[i] = 0 end

local function created_at(chunk, rank)
  local entry = redis.call('ZRANGE', chunk, rank, rank)
  if not entry[1] then return now end
  return tonumber(job_get(prefix, entry[1], 'created') or now)
end

local chunks = redis.call('ZRANGEBYSCORE', base, '(' .. string.format('%d', cursor), '+inf', 'LIMIT', 0, most)
for _, n in ipairs(chunks) do
  local chunk = base .. ':' .. n
  local total = redis.call('ZCARD', chunk)
  if total > 0 then
    local first, last = created_at(chunk, 0), created_at(chunk, total - 1)
    -- older[i]: how many of the chunk's jobs are older than edge i (non-increasing in i)
    local older = {}
    for i, t in ipairs(edges) do
      if first >= t then
        older[i] = 0
      elseif last < t then
        older[i] = total
      else
        local low, high = 1, total - 1
        while low < high do
          local mid = math.floor((low + high) / 2)
          if created_at(chunk, mid) < t then low = mid + 1 else high = mid end
        end
        older[i] = low
      end
    end
    counts[1] = counts[1] + total - (older[1] or 0)
    for i = 1, #edges do
      counts[i + 1] = counts[i + 1] + older[i] - (older[i + 1] or 0)
    end
  end
end

local result = {-1}
if #chunks == most then result[1] = tonumber(chunks[#chunks]) end
for i = 1, #counts do result[#result + 1] = counts[i] end
return result
