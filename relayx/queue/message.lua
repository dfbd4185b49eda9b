-- message.lua: one message for an operator: envelope, header section and each
-- delivery job with its state and history (reads only).
--
-- KEYS[1]  <p>:job:<qid>.1  the message's hash (msg_key, common.lua: or <p>:msg:<qid>)
-- KEYS[2]  <p>:deferred
-- KEYS[3]  <p>:failed
-- KEYS[4]  <p>:leased
-- ARGV[1]  key prefix <p>
-- ARGV[2]  queue id
-- ARGV[3]  now (ms)
-- Returns JSON {sender, received, size, header, jobs: [{jid, domain, state, rcpts, owed,
-- failed, attempts, error, history, owner}]}, or "" when there is no such message.
--
-- Invariant: none changed.
-- Cost bound: O(1) keys per job of the one message.

local prefix, qid, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local msg = msg_key(prefix, qid)
if redis.call('EXISTS', msg) == 0 then return '' end
local sender, received, body = unpack(redis.call('HMGET', msg, 'sender', 'received', 'body'))
local cut = string.find(body, '\r\n\r\n', 1, true)
local header = cut and string.sub(body, 1, cut + 1) or body
if #header > 65536 then header = string.sub(header, 1, 65536) end
local jobs = {}
for _, jid in ipairs(message_jobs(prefix, qid)) do
  local domain, rcpts, owed, failed, attempts, err, history, owner = job_get(prefix, jid,
    'domain', 'rcpts', 'owed', 'failed', 'attempts', 'error', 'history', 'owner')
  local state = job_state(prefix, jid, domain, now)
  jobs[#jobs + 1] = {jid = jid, domain = domain, state = state, rcpts = cjson.decode(rcpts),
    owed = cjson.decode(owed), failed = cjson.decode(failed), attempts = tonumber(attempts or '0'),
    error = err or '', history = cjson.decode(history or '[]'), owner = owner or ''}
end
return cjson.encode({sender = sender, received = tonumber(received), size = message_size(msg), header = header,
  jobs = jobs})
