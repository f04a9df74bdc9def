"""The Lua scripts that change a lease, each one atomic on the server.

A lease's value is its holder's token, one space, then a JSON object that
describes the holder::

    3f9c...e1 {"host":"web-3","pid":4121,"fence":17,"since":1764748800123}

``since`` is the acquisition time in milliseconds by the Redis server's clock,
``fence`` the fencing token.  Every script that changes a lease first checks
that the value starts with the caller's token, so a host never extends or
deletes a lease it does not own.  Keys and values reach the scripts only
through KEYS and ARGV.

The scripts also append the run's events to the job's capped stream and count
skips per host, so that recording costs no round trip of its own.  They
record with ``redis.pcall``: a failed write is reported in the reply and
never undoes or blocks the change to the lease itself.

The scripts are sent with EVAL rather than EVALSHA: a cold server (a restart,
a failover, SCRIPT FLUSH) then costs no extra NOSCRIPT round trip, and every
operation stays exactly one command.  The bodies are a few hundred bytes.
"""

from __future__ import annotations

# Shared prelude.  owns(): does a lease value belong to the token in ARGV[1]?
# record(): XADD the field/value pairs ARGV[first..] to a capped stream;
# returns 1 when written, 0 when the write failed or there was nothing to write.
_PRELUDE = """
local function owns(value)
  return value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ' '
end
local function record(stream, maxlen, first, extra)
  if #ARGV < first then return 0 end
  local call = {'XADD', stream, 'MAXLEN', '~', maxlen, '*'}
  for i = first, #ARGV do call[#call + 1] = ARGV[i] end
  for i = 1, #extra do call[#call + 1] = extra[i] end
  local reply = redis.pcall(unpack(call))
  if type(reply) == 'table' and reply.err then return 0 end
  return 1
end
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
"""

ACQUIRE = (
    _PRELUDE
    + """
-- KEYS[1] lease, KEYS[2] fencing counter, KEYS[3] run stream, KEYS[4] skips hash
-- ARGV[1] token, ARGV[2] TTL in ms, ARGV[3] holder JSON ({"host":..,"pid":..}),
-- ARGV[4] stream length cap, ARGV[5..] fields of the "started" event
-- Returns {1, fence, since_ms, recorded} when the caller holds the lease, or
-- {0, current value, PTTL in ms, recorded} when somebody else does; then the
-- skip is counted under the holder JSON's host in KEYS[4].
-- A retried request whose first attempt won finds its own token and wins
-- again with the same fence, so retries never burn a fencing token.
local current = redis.call('GET', KEYS[1])
local holder = cjson.decode(ARGV[3])
if current then
  if owns(current) then
    local mine = cjson.decode(string.sub(current, #ARGV[1] + 2))
    return {1, mine.fence, mine.since, 1}
  end
  local counted = redis.pcall('HINCRBY', KEYS[4], holder.host, 1)
  local recorded = (type(counted) == 'table' and counted.err) and 0 or 1
  return {0, current, redis.call('PTTL', KEYS[1]), recorded}
end
local fence = redis.call('INCR', KEYS[2])
local since = now_ms()
holder.fence = fence
holder.since = since
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. cjson.encode(holder), 'PX', ARGV[2])
local recorded = record(KEYS[3], ARGV[4], 5, {'fence', tostring(fence)})
return {1, fence, since, recorded}
"""
)

RENEW = (
    _PRELUDE
    + """
-- KEYS[1] lease
-- ARGV[1] token, ARGV[2] new TTL in ms
-- Returns 1 when the lease was extended, 0 when the caller no longer holds it.
if owns(redis.call('GET', KEYS[1])) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)

RELEASE = (
    _PRELUDE
    + """
-- KEYS[1] lease, KEYS[2] run stream
-- ARGV[1] token, ARGV[2] minimum hold in ms counted from acquisition (0: none),
-- ARGV[3] stream length cap, ARGV[4..] fields of an event to record (optional)
-- Deletes the lease, or when the minimum hold has not passed yet, shortens it
-- to end exactly then.  The event is recorded whether or not the caller
-- still held the lease: a run that lost its lease still finished.
-- Returns {ms still held (0 when deleted, -1 when not the caller's), recorded}.
local current = redis.call('GET', KEYS[1])
local left = -1
if owns(current) then
  local holder = cjson.decode(string.sub(current, #ARGV[1] + 2))
  left = holder.since + tonumber(ARGV[2]) - now_ms()
  if left > 0 then
    redis.call('PEXPIRE', KEYS[1], left)
  else
    left = 0
    redis.call('DEL', KEYS[1])
  end
end
return {left, record(KEYS[2], ARGV[3], 4, {})}
"""
)

QUORUM_CONFIRM = (
    _PRELUDE
    + """
-- Second step of a quorum acquisition, sent once a majority granted the lease.
-- KEYS[1] lease, KEYS[2] fencing counter, KEYS[3] run stream
-- ARGV[1] token, ARGV[2] the fence chosen (the highest the granting nodes
-- gave), ARGV[3] stream length cap, ARGV[4..] fields of the "started" event
-- Where the caller still holds the lease: raises the counter to the fence if
-- it is lower, writes the fence into the holder details (the TTL is kept) and
-- records the event.  Returns {1, recorded}; {0, 0} where it does not hold it.
local current = redis.call('GET', KEYS[1])
if not owns(current) then return {0, 0} end
local fence = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') < fence then
  redis.call('SET', KEYS[2], ARGV[2])
end
local holder = cjson.decode(string.sub(current, #ARGV[1] + 2))
holder.fence = fence
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. cjson.encode(holder), 'KEEPTTL')
return {1, record(KEYS[3], ARGV[3], 4, {'fence', ARGV[2]})}
"""
)

FORCE_RELEASE = (
    _PRELUDE
    + """
-- KEYS[1] lease, KEYS[2] run stream
-- ARGV[1] fence the operator expects, or '' for whichever holder there is,
-- ARGV[2] stream length cap, ARGV[3..] fields of the "released" event
-- Deletes the lease whatever its token: an operator removes a stuck lease.
-- With a fence given, only a lease of that fence is removed, so a release
-- typed after reading `cronguard status` cannot remove the lease of a newer
-- run that acquired it in between.  The event gains the removed holder's
-- JSON as "holder" and its fence.
-- Returns {1, removed value, PTTL it had, recorded}, {0, current value or
-- false, PTTL, 0} when the fence did not match, or {0, false, -2, 0} when no
-- lease existed.
local current = redis.call('GET', KEYS[1])
if not current then return {0, false, -2, 0} end
local pttl = redis.call('PTTL', KEYS[1])
local space = string.find(current, ' ', 1, true)
local details = space and string.sub(current, space + 1) or '{}'
local ok, holder = pcall(cjson.decode, details)
if not ok or type(holder) ~= 'table' then holder = {} end
local fence = holder.fence and tostring(holder.fence) or ''
if ARGV[1] ~= '' and ARGV[1] ~= fence then return {0, current, pttl, 0} end
redis.call('DEL', KEYS[1])
local recorded = record(KEYS[2], ARGV[2], 3, {'fence', fence, 'holder', details})
return {1, current, pttl, recorded}
"""
)

TOUCH = (
    _PRELUDE
    + """
-- KEYS[1] lease
-- ARGV[1] token
-- A write that changes nothing: rewrites the lease's TTL as it stands, so that
-- a WAIT sent after it on the same connection counts the replicas that have
-- everything up to it, the lease included (replication is in order).
-- Returns 1 when the caller holds the lease, 0 when it does not.
if not owns(redis.call('GET', KEYS[1])) then return 0 end
local left = redis.call('PTTL', KEYS[1])
if left > 0 then redis.call('PEXPIRE', KEYS[1], left) end
return 1
"""
)
