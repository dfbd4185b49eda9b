-- common.lua: helpers shared by the queue scripts; prepended to each script
-- that uses them when it is loaded (Redis 6 has no shared script functions).
--
-- Domain state lives in the hash <p>:dom:<domain>:
--   paused_until, failures, last_error   destination failing (settle.lua, resume.lua)
--   recovered_at                          when it last came back (ramp-up)
--   held, held_since, held_ms             an operator's hold and the time held so far
--   hold_start, hold_end                  a scheduled hold (ms; 0 or absent: none)
--   release_rate                          messages/s while a released backlog drains
--   tokens, tokens_at                     the domain's token bucket
-- Invariant: held_ms only grows; a job's age for retention is its time in the
-- queue minus the time its domain was held since the job was accepted.

-- The domain a queue belongs to: "example.org#1", the first copy destination of
-- example.org (dual delivery), is held with example.org and ages with it.
local function base_domain(queue)
  return string.match(queue, '^([^#]+)')
end

-- The one definition of "held" for a reader (changes nothing): an operator's
-- hold not yet past its end, or a scheduled hold whose start has come and
-- whose end has not. held_clock below applies the same rule and records it.
-- Mirrored once in Python (relayx/queue/states.py).
local function held_at(dom, now)
  local s = redis.call('HMGET', dom, 'held', 'hold_start', 'hold_end')
  local start, stop = tonumber(s[2] or '0'), tonumber(s[3] or '0')
  if stop > 0 and stop <= now then return false end
  return s[1] == '1' or (start > 0 and start <= now)
end

-- The one definition of a job's state (for views and counts): in_flight,
-- deferred, failed, held or ready. Mirrored by relayx.queue.states.JobState.
local function job_state(prefix, jid, queue, now)
  if redis.call('ZSCORE', prefix .. ':leased', jid) then return 'in_flight' end
  if redis.call('ZSCORE', prefix .. ':deferred', jid) then return 'deferred' end
  if redis.call('ZSCORE', prefix .. ':failed', jid) then return 'failed' end
  if held_at(prefix .. ':dom:' .. base_domain(queue), now) then return 'held' end
  return 'ready'
end

-- Whether the domain is held at `now`, and its total held time (ms) up to `now`.
-- A scheduled hold whose start or end has come is applied here, by whichever
-- script looks first.
local function held_clock(dom, now)
  local s = redis.call('HMGET', dom, 'held', 'held_since', 'held_ms', 'hold_start', 'hold_end')
  local held, since, total = s[1] == '1', tonumber(s[2] or '0'), tonumber(s[3] or '0')
  local start, stop = tonumber(s[4] or '0'), tonumber(s[5] or '0')
  if not held and start > 0 and start <= now then
    if stop > 0 and stop <= now then
      -- the whole window passed while no node looked
      total = total + (stop - start)
      redis.call('HSET', dom, 'held_ms', total)
      redis.call('HDEL', dom, 'hold_start', 'hold_end')
      return false, total
    end
    held, since = true, start
    redis.call('HSET', dom, 'held', 1, 'held_since', start)
    redis.call('HDEL', dom, 'hold_start')
  end
  if held and stop > 0 and stop <= now then
    total = total + (stop - since)
    redis.call('HSET', dom, 'held', 0, 'held_ms', total)
    redis.call('HDEL', dom, 'held_since', 'hold_end')
    return false, total
  end
  if held then return true, total + (now - since) end
  return false, total
end

-- Search indexes, kept for every job while its hash exists (all zsets jid -> seq):
--   <p>:q:<queue>          every job of a delivery queue, in acceptance order
--   <p>:ix:from:<sender>   jobs by their message's sender (lower case; "" for <>)
--   <p>:ix:rcpt:<address>  jobs by each of their recipients (lower case)
--   <p>:ix:mid:<id>        jobs by their message's Message-ID (lower case, no <>)
-- index_job adds a job (enqueue); unindex_job removes it and must be called
-- just before its hash is deleted (it reads the job and its message).
-- Cost: one ZADD/ZREM per recipient of the job, plus three.
local function index_job(prefix, jid, seq, queue, sender, mid, rcpts)
  redis.call('ZADD', prefix .. ':q:' .. queue, seq, jid)
  redis.call('ZADD', prefix .. ':ix:from:' .. string.lower(sender), seq, jid)
  if mid and mid ~= '' then redis.call('ZADD', prefix .. ':ix:mid:' .. mid, seq, jid) end
  for _, rcpt in ipairs(cjson.decode(rcpts)) do
    redis.call('ZADD', prefix .. ':ix:rcpt:' .. string.lower(rcpt), seq, jid)
  end
end

local function unindex_job(prefix, jid)
  local job = redis.call('HMGET', prefix .. ':job:' .. jid, 'domain', 'rcpts', 'qid')
  if not job[1] then return end
  local msg = redis.call('HMGET', prefix .. ':msg:' .. job[3], 'sender', 'mid')
  redis.call('ZREM', prefix .. ':q:' .. job[1], jid)
  redis.call('ZREM', prefix .. ':ix:from:' .. string.lower(msg[1] or ''), jid)
  if msg[2] and msg[2] ~= '' then redis.call('ZREM', prefix .. ':ix:mid:' .. msg[2], jid) end
  for _, rcpt in ipairs(cjson.decode(job[2])) do
    redis.call('ZREM', prefix .. ':ix:rcpt:' .. string.lower(rcpt), jid)
  end
end

-- Store a message and one delivery job per destination domain (pairs: domain,
-- JSON array of recipients, ...). Each job records its domain's held time at
-- acceptance (held_base), so that time held later does not count against its
-- retention. `mid` and `subject` (optional) are the header's Message-ID (lower
-- case, no <>) and Subject, for search. Returns the number of jobs, or an
-- error if the queue id is taken.
local function enqueue_message(prefix, seq_key, domains_key, msg_key, qid, now, sender, body, pairs, mid, subject)
  if redis.call('EXISTS', msg_key) == 1 then
    return redis.error_reply('DUPLICATE queue id ' .. qid)
  end
  local njobs = #pairs / 2
  redis.call('HSET', msg_key, 'sender', sender, 'body', body, 'received', now, 'jobs', njobs, 'njobs', njobs)
  if mid and mid ~= '' then redis.call('HSET', msg_key, 'mid', mid) end
  if subject and subject ~= '' then redis.call('HSET', msg_key, 'subject', subject) end
  for i = 1, njobs do
    local domain, rcpts = pairs[2 * i - 1], pairs[2 * i]
    local jid = qid .. '.' .. i
    local seq = redis.call('INCR', seq_key)
    local _, held_base = held_clock(prefix .. ':dom:' .. base_domain(domain), now)
    redis.call('HSET', prefix .. ':job:' .. jid,
      'qid', qid, 'domain', domain, 'rcpts', rcpts, 'owed', rcpts, 'failed', '[]',
      'seq', seq, 'created', now, 'held_base', held_base, 'attempts', 0, 'token', 0)
    redis.call('ZADD', prefix .. ':ready:' .. domain, seq, jid)
    redis.call('SADD', domains_key, domain)
    index_job(prefix, jid, seq, domain, sender, mid, rcpts)
  end
  return njobs
end

-- Record an operator's change (a JSON object) in the audit log, newest first,
-- keeping the newest `keep`. Every script that changes what an operator can
-- change calls this in the same step, so no change goes unrecorded; a bulk
-- action's steps pass "" (its one record is written when it starts).
-- An audit record (a JSON object's text) with "previous": what the change
-- replaced (JSON text), spliced in so that the rest stays as Python wrote it.
local function with_previous(record, previous)
  return string.sub(record, 1, -2) .. ',"previous":' .. previous .. '}'
end

local function audit(key, record, keep)
  if record == '' then return end  -- one step of a bulk action, audited once at its start
  redis.call('LPUSH', key, record)
  redis.call('LTRIM', key, 0, tonumber(keep) - 1)
end

-- The job hashes of a message: <qid>.1 to <qid>.<n> as enqueue_message numbered
-- them; those already done are gone.
local function message_jobs(prefix, qid)
  local jobs = {}
  local total = tonumber(redis.call('HGET', prefix .. ':msg:' .. qid, 'njobs') or '100')
  for i = 1, total do
    local jid = qid .. '.' .. i
    if redis.call('EXISTS', prefix .. ':job:' .. jid) == 1 then jobs[#jobs + 1] = jid end
  end
  return jobs
end
