"""The Lua scripts that change a lease, each one atomic on the server.

A lease's value is its holder's token, one space, then a JSON object that
describes the holder::

    3f9c...e1 {"host":"web-3","pid":4121,"fence":17,"since":1764748800123}

``since`` is the acquisition time in milliseconds by the Redis server's clock,
``fence`` the fencing token.  Every script that changes a lease first checks
that the value starts with the caller's token, so a host never extends or
deletes a lease it does not own.  Keys and values reach the scripts only
through KEYS and ARGV.

The scripts are sent with EVAL rather than EVALSHA: a cold server (a restart,
a failover, SCRIPT FLUSH) then costs no extra NOSCRIPT round trip, and every
operation stays exactly one command.  The bodies are a few hundred bytes.
"""

from __future__ import annotations

# Shared prelude: does the lease value belong to the token in ARGV[1]?
_OWNS = """
local function owns(value)
  return value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ' '
end
"""

ACQUIRE = (
    _OWNS
    + """
-- KEYS[1] lease key, KEYS[2] fencing counter
-- ARGV[1] token, ARGV[2] TTL in ms, ARGV[3] holder JSON ({"host":..,"pid":..})
-- Returns {1, fence, since_ms} when the caller holds the lease, or
-- {0, current value, PTTL in ms} when somebody else does.
-- A retried request whose first attempt won finds its own token and wins
-- again with the same fence, so retries never burn a fencing token.
local current = redis.call('GET', KEYS[1])
if current then
  if owns(current) then
    local holder = cjson.decode(string.sub(current, #ARGV[1] + 2))
    return {1, holder.fence, holder.since}
  end
  return {0, current, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local since = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local holder = cjson.decode(ARGV[3])
holder.fence = fence
holder.since = since
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. cjson.encode(holder), 'PX', ARGV[2])
return {1, fence, since}
"""
)

RENEW = (
    _OWNS
    + """
-- KEYS[1] lease key
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
    _OWNS
    + """
-- KEYS[1] lease key
-- ARGV[1] token
-- Returns 1 when the lease was deleted, 0 when the caller did not hold it.
if owns(redis.call('GET', KEYS[1])) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
)

HOLD = (
    _OWNS
    + """
-- KEYS[1] lease key
-- ARGV[1] token, ARGV[2] minimum hold in ms, counted from acquisition
-- Shortens a renewed lease so that it ends ARGV[2] ms after it was acquired,
-- or deletes it when that moment has passed.
-- Returns the ms the lease is still held (0 when it was deleted), or -1 when
-- the caller did not hold it.
local current = redis.call('GET', KEYS[1])
if not owns(current) then
  return -1
end
local holder = cjson.decode(string.sub(current, #ARGV[1] + 2))
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local left = holder.since + tonumber(ARGV[2]) - now_ms
if left <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], left)
return left
"""
)
