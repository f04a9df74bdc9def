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
-- to end exactly then.  A shortened lease is marked released: its token
-- becomes ARGV[1] .. '-', so that a renewal still on its way from the holder
-- is refused instead of stretching the hold again, and a retried release
-- finds it and answers as the first attempt did.  The event is recorded
-- whether or not the caller still held the lease: a run that lost its lease
-- still finished.
-- Returns {ms still held (0 when deleted, -1 when not the caller's), recorded}.
local current = redis.call('GET', KEYS[1])
local released = ARGV[1] .. '- '
local left = -1
if owns(current) then
  local details = string.sub(current, #ARGV[1] + 2)
  local holder = cjson.decode(details)
  left = holder.since + tonumber(ARGV[2]) - now_ms()
  if left > 0 then
    redis.call('SET', KEYS[1], released .. details, 'PX', left)
  else
    left = 0
    redis.call('DEL', KEYS[1])
  end
elseif current and string.sub(current, 1, #released) == released then
  left = math.max(redis.call('PTTL', KEYS[1]), 1)
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

# Slot mode.  A job's slot record (KEYS[1] below) is a hash describing the last
# slot claimed: slot and end (ms of server time), state (running, done or
# failed), holder (host:pid), token and fence of the current holder, started
# and finished (ms), takeover (1 when a standby took the slot over), status
# (the command's exit status) and skipped (the last slot skipped because the
# previous slot's run was still going).  ms() renders a millisecond count
# without the exponent that tostring() gives large numbers; keep() makes the
# record live at least until server time ``at``.
_SLOT_PRELUDE = """
local function ms(n) return string.format('%.0f', n) end
local function keep(now, at)
  local left = at - now
  if redis.call('PTTL', KEYS[1]) < left then
    redis.call('PEXPIRE', KEYS[1], ms(left))
  end
end
"""

SLOT_CLAIM = (
    _PRELUDE
    + _SLOT_PRELUDE
    + """
-- KEYS[1] slot record, KEYS[2] lease, KEYS[3] fencing counter, KEYS[4] run
-- stream, KEYS[5] skips hash
-- ARGV[1] token, ARGV[2] lease TTL in ms, ARGV[3] holder JSON, ARGV[4] stream
-- length cap, ARGV[5] slot length in ms for fixed slots from the epoch, or 0 to
-- pick from ARGV[6], a JSON array of consecutive slot boundaries in ms,
-- ARGV[7] tolerance in ms, ARGV[8] overlap rule ('skip' or 'allow'), ARGV[9]
-- ms to keep the record after its slot ends, ARGV[10] what a caller does when
-- an earlier slot's run holds the lease: '' gives up (the slot is recorded as
-- skipped, so no host runs it late), 'wait' stands by to claim it once that
-- run ends (nothing is recorded), 'again' is such a standby asking again
-- (nor is its skip counted), ARGV[11..] "started" fields
-- The slot is the one that server time + tolerance falls in.  With 'allow'
-- each slot's run has a lease of its own, KEYS[2] .. ':' .. slot start.
-- Returns {1, fence, since_ms, slot, end, recorded} when the caller claimed
-- the slot, else {0, reason, slot, end, detail, lease PTTL, recorded}: reason
-- is the slot's state when it was claimed already (running, done, failed),
-- 'past' when a later slot was, 'overlap' when a run of an earlier slot holds
-- the lease (detail: its value), or 'clock' when the boundaries do not cover
-- the server's time (detail: that time; nothing was changed or counted).
-- A retried request whose first attempt claimed the slot finds its own token
-- in the record and its lease, and claims it again with the same fence.
local now = now_ms()
local at = now + tonumber(ARGV[7])
local start, finish
local length = tonumber(ARGV[5])
if length > 0 then
  start = math.floor(at / length) * length
  finish = start + length
else
  local edges = cjson.decode(ARGV[6])
  for i = 1, #edges - 1 do
    if edges[i] <= at and at < edges[i + 1] then
      start, finish = edges[i], edges[i + 1]
      break
    end
  end
  if not start then return {0, 'clock', 0, 0, ms(now), -2, 1} end
end

local lease = KEYS[2]
if ARGV[8] == 'allow' then lease = lease .. ':' .. ms(start) end
local holder = cjson.decode(ARGV[3])
local function lose(reason, detail, pttl)
  local recorded = 1
  if ARGV[10] ~= 'again' then
    local counted = redis.pcall('HINCRBY', KEYS[5], holder.host, 1)
    recorded = (type(counted) == 'table' and counted.err) and 0 or 1
  end
  return {0, reason, start, finish, detail, pttl, recorded}
end

local rec = redis.call('HMGET', KEYS[1], 'slot', 'state', 'holder', 'skipped',
  'token', 'fence', 'started')
local last = tonumber(rec[1]) or -1
if last > start then return lose('past', rec[3] or '', -2) end
if last == start then
  if rec[5] == ARGV[1] and rec[2] == 'running' and owns(redis.call('GET', lease)) then
    return {1, tonumber(rec[6]), tonumber(rec[7]), start, finish, 1}
  end
  return lose(rec[2] or 'running', rec[3] or '', redis.call('PTTL', lease))
end
if (tonumber(rec[4]) or -1) >= start then return lose('overlap', '', -2) end
if ARGV[8] ~= 'allow' then
  local current = redis.call('GET', lease)
  if current then
    if ARGV[10] == '' then
      -- Recorded by the first host to find the overlap, so once per slot.
      redis.call('HSET', KEYS[1], 'skipped', ms(start))
      keep(now, finish + tonumber(ARGV[9]))
      redis.pcall('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'event',
        'skipped', 'reason', 'overlap', 'slot_ms', ms(start), 'host',
        holder.host, 'pid', tostring(holder.pid))
    end
    return lose('overlap', current, redis.call('PTTL', lease))
  end
end

local fence = redis.call('INCR', KEYS[3])
holder.fence = fence
holder.since = now
holder.slot = start
redis.call('SET', lease, ARGV[1] .. ' ' .. cjson.encode(holder), 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'slot', ms(start), 'end', ms(finish),
  'state', 'running', 'holder', holder.host .. ':' .. tostring(holder.pid),
  'token', ARGV[1], 'fence', tostring(fence), 'started', ms(now), 'takeover', '0')
redis.call('HDEL', KEYS[1], 'status', 'finished')
keep(now, finish + tonumber(ARGV[9]))
local recorded = record(KEYS[4], ARGV[4], 11,
  {'fence', tostring(fence), 'slot_ms', ms(start)})
return {1, fence, now, start, finish, recorded}
"""
)

SLOT_TAKEOVER = (
    _PRELUDE
    + _SLOT_PRELUDE
    + """
-- KEYS[1] slot record, KEYS[2] the slot's lease, KEYS[3] fencing counter,
-- KEYS[4] run stream
-- ARGV[1] token, ARGV[2] lease TTL in ms, ARGV[3] holder JSON, ARGV[4] stream
-- length cap, ARGV[5] slot start in ms, ARGV[6] ms to keep the record after
-- its slot ends, ARGV[7..] "takeover" fields
-- Takes the slot over when it is still recorded as running and nobody holds
-- its lease: the holder died or lost the lease before it recorded the end.
-- Returns {1, fence, since_ms, recorded} when taken over, else {0, state,
-- lease PTTL, 0}: state 'running' while the lease is held; the recorded state
-- (done, failed) or 'gone' (a later slot was claimed) when there is no more
-- to wait for.  A retried request whose first attempt took the slot over
-- finds its own token and takes it again with the same fence.
local now = now_ms()
local rec = redis.call('HMGET', KEYS[1], 'slot', 'state', 'holder', 'fence', 'end',
  'token', 'taken')
if rec[1] ~= ARGV[5] then return {0, 'gone', -2, 0} end
if rec[2] ~= 'running' then return {0, rec[2] or 'gone', -2, 0} end
if rec[6] == ARGV[1] and owns(redis.call('GET', KEYS[2])) then
  return {1, tonumber(rec[4]), tonumber(rec[7]), 1}
end
local pttl = redis.call('PTTL', KEYS[2])
if pttl ~= -2 then return {0, 'running', pttl, 0} end

local fence = redis.call('INCR', KEYS[3])
local holder = cjson.decode(ARGV[3])
holder.fence = fence
holder.since = now
holder.slot = tonumber(ARGV[5])
holder.takeover = 1
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. cjson.encode(holder), 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'holder', holder.host .. ':' .. tostring(holder.pid),
  'token', ARGV[1], 'fence', tostring(fence), 'takeover', '1', 'taken', ms(now))
keep(now, (tonumber(rec[5]) or now) + tonumber(ARGV[6]))
local recorded = record(KEYS[4], ARGV[4], 7, {'fence', tostring(fence),
  'slot_ms', ARGV[5], 'previous', rec[3] or '', 'previous_fence', rec[4] or ''})
return {1, fence, now, recorded}
"""
)

SLOT_FINISH = (
    _PRELUDE
    + _SLOT_PRELUDE
    + """
-- KEYS[1] slot record, KEYS[2] the slot's lease, KEYS[3] run stream
-- ARGV[1] token, ARGV[2] slot start in ms, ARGV[3] state to record ('done',
-- 'failed', or '' to leave the slot running so that a standby takes it over),
-- ARGV[4] the command's exit status, ARGV[5] stream length cap, ARGV[6] ms to
-- keep the record from now, ARGV[7..] fields of an event to record
-- The record changes only while it still names the caller as the slot's
-- holder; the lease is deleted only when it is the caller's; the event is
-- recorded in any case, since the run did end.
-- Returns {record updated (0/1), lease released (0/1), recorded}.
local now = now_ms()
local updated = 0
if ARGV[3] ~= '' then
  local rec = redis.call('HMGET', KEYS[1], 'slot', 'token')
  if rec[1] == ARGV[2] and rec[2] == ARGV[1] then
    redis.call('HSET', KEYS[1], 'state', ARGV[3], 'status', ARGV[4],
      'finished', ms(now))
    keep(now, now + tonumber(ARGV[6]))
    updated = 1
  end
end
local released = 0
if owns(redis.call('GET', KEYS[2])) then
  redis.call('DEL', KEYS[2])
  released = 1
end
return {updated, released, record(KEYS[3], ARGV[5], 7, {})}
"""
)

SLOT_RENEW = (
    _PRELUDE
    + _SLOT_PRELUDE
    + """
-- KEYS[1] slot record, KEYS[2] the slot's lease
-- ARGV[1] token, ARGV[2] new lease TTL in ms, ARGV[3] ms to keep the record
-- from now
-- Extends the lease, and keeps the record at least as long, so that a run
-- outlasting its slot's record can still be taken over if its holder dies.
-- Returns 1 when the lease was extended, 0 when the caller no longer holds it.
if not owns(redis.call('GET', KEYS[2])) then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local now = now_ms()
  keep(now, now + tonumber(ARGV[3]))
end
return 1
"""
)
