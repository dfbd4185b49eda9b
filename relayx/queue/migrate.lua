-- migrate.lua: move one bounded batch of a queue written by an earlier relayx
-- (its orders as two plain zsets jid -> seq) into the seqsets of common.lua.
--
-- KEYS[1]  <p>:ready:<q>   the old ready zset (the claim order)
-- KEYS[2]  <p>:q:<q>       the old zset of every job of the queue (the listing order)
-- ARGV[1]  key prefix <p>
-- ARGV[2]  the queue
-- ARGV[3]  most old entries to move in this call (the caller passes 500)
-- Returns the entries left in both old zsets after this call (0: done).
--
-- Each old entry goes to the seqset <p>:rq:<q> or <p>:aq:<q> at its job's "seq"
-- (the zset's score if the hash has none) and leaves the old zset in the same
-- step; an entry whose job is gone is dropped, and a ready entry of a job now
-- in another location (leased, deferred, failed) is only dropped. The counters
-- do not change: they counted these jobs already. Idempotent: a call after an
-- interruption, or two nodes at once, move each entry once (adding to a seqset
-- twice is adding once), and a queue with no old zsets costs two ZCARDs.
-- Invariant: as in common.lua, once a queue's old zsets are gone.
-- Cost bound: ARGV[3] entries, each at most 7 O(1) or O(log n) calls: at most
-- ~3,500 calls for 500, whatever the depth; the node calls again until done.

local prefix, queue, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local targets = {prefix .. ':rq:' .. queue, prefix .. ':aq:' .. queue}
for k = 1, 2 do
  if most <= 0 then break end
  local old = redis.call('ZRANGE', KEYS[k], 0, most - 1, 'WITHSCORES')
  for i = 1, #old, 2 do
    local jid, score = old[i], old[i + 1]
    local seq = redis.call('HGET', prefix .. ':job:' .. jid, 'seq')
    if seq then
      local elsewhere = k == 1 and (redis.call('ZSCORE', prefix .. ':leased', jid)
        or redis.call('ZSCORE', prefix .. ':deferred', jid) or redis.call('ZSCORE', prefix .. ':failed', jid))
      if not elsewhere then seqset_add(targets[k], seq, jid) end
    end
    redis.call('ZREM', KEYS[k], jid)
  end
  most = most - #old / 2
end
return redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
