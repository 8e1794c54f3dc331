"""The Lua scripts of the Redis fast path (`redis_source.py`, `unacked.py`, `registry.py`):
each runs atomically in Redis, so a worker killed at any moment loses nothing, and every time
in them is Redis `TIME`, the one clock all workers share.

An unacknowledged message is kept as kombu keeps it (`layout.py`: the `unacked` hash: tag ->
`[message, exchange, routing key]`, the `unacked_index` sorted set: tag -> when it was taken
or last refreshed), plus hashes of our own: its owner (tag -> the held set of the worker that
took it, so whoever moves it takes it out of the right worker's held set; its field "" counts
the tags given to messages whose producer reused the tag of one in flight) and, for an item
too large to read, the list it came from and the item itself (kept in Redis, never sent to a
worker). tests/service/test_kombu_layout.py checks these against kombu.
"""

from __future__ import annotations

# KEYS: the queue's lists, most urgent first; then the unacked hash, its index, the owners
# hash, the oversized origins hash, the oversized items hash, the aging hash, this worker's
# held set and its unrouted set (emptied, then given the tags taken, where ARGV[5] is 1: only
# peers' routing reads it). ARGV: how many to take, the largest item read whole, the head kept
# of a larger one, the aging seconds, whether the take is routed. Returns
# quadruples: the item (or its head), its tag
# ("" when the item is no envelope), its list's index, and "<size> <sha1>" for an item too
# large (else "").
#
# Priority aging: a list that has waited `aging` seconds with no message taken from it goes
# first, for up to a quarter of the take (at least one message); its wait then starts again.
TAKE = """
local n = #KEYS - 8
local hkey, zkey, owners, origins, items, aging, held, unrouted = unpack(KEYS, n + 1)
local limit, max_item = tonumber(ARGV[1]), tonumber(ARGV[2])
local head, age = tonumber(ARGV[3]), tonumber(ARGV[4])
local routed = ARGV[5] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out, taken, served = {}, 0, {}
if routed then redis.call('DEL', unrouted) end

local function envelope(item)
  local ok, msg = pcall(cjson.decode, item)
  if not (ok and type(msg) == 'table' and type(msg.properties) == 'table') then return '' end
  local p = msg.properties
  if type(p.delivery_tag) ~= 'string' or type(p.delivery_info) ~= 'table' then return '' end
  return p.delivery_tag, '[' .. item .. ',' .. cjson.encode(p.delivery_info.exchange or '') ..
    ',' .. cjson.encode(p.delivery_info.routing_key or '') .. ']'
end

local function take(i)
  local item = redis.call('RPOP', KEYS[i])
  if not item then return false end
  local tag, entry, size = '', nil, ''
  if #item > max_item then  -- never decoded, never sent whole: its head, size and hash
    local sum = redis.sha1hex(item)
    tag = 'inferq-oversized:' .. sum
    while redis.call('HEXISTS', hkey, tag) == 1 do tag = tag .. '+' end
    entry, size = '[null,"",' .. cjson.encode(KEYS[i]) .. ']', #item .. ' ' .. sum
    redis.call('HSET', origins, tag, KEYS[i])
    redis.call('HSET', items, tag, item)
    item = string.sub(item, 1, head)
  else
    tag, entry = envelope(item)
    if tag ~= '' and redis.call('HEXISTS', hkey, tag) == 1 then  -- a producer reused a tag
      tag = tag .. '+' .. redis.call('HINCRBY', owners, '', 1)  -- in flight: one of our own
    end
    if tag ~= '' then redis.call('HDEL', origins, tag) end
  end
  if tag ~= '' then
    local before = redis.call('HGET', owners, tag)
    if before and before ~= held then redis.call('SREM', before, tag) end
    redis.call('HSET', hkey, tag, entry)
    redis.call('ZADD', zkey, now, tag)
    redis.call('SADD', held, tag)
    if routed then redis.call('SADD', unrouted, tag) end
    redis.call('HSET', owners, tag, held)
  end
  out[#out + 1] = item
  out[#out + 1] = tag
  out[#out + 1] = i
  out[#out + 1] = size
  taken, served[i] = taken + 1, true
  return true
end

local since = redis.call('HMGET', aging, unpack(KEYS, 1, n))
local share = math.max(1, math.floor(limit / 4))
for i = 1, n do
  local s = tonumber(since[i])
  if s and now - s >= age then
    local k = 0
    while k < share and taken < limit and take(i) do k = k + 1 end
  end
end
for i = 1, n do
  while taken < limit and take(i) do end
end
for i = 1, n do  -- an empty list waits for nothing; a served one starts waiting again
  if redis.call('LLEN', KEYS[i]) == 0 then
    if since[i] then redis.call('HDEL', aging, KEYS[i]) end
  elseif served[i] or not since[i] then
    redis.call('HSET', aging, KEYS[i], now)
  end
end
return out
"""

# KEYS: unacked hash, index, owners hash, oversized origins, oversized items, the caller's
# held set, the target list. ARGV: tag, payload, "front" (going back: taken next), "back"
# (handed to another worker's queue) or "drop"; the latest index score it may have ("": any;
# a message refreshed since is left alone); the held set its owner must have ("": any).
# Moves an unacknowledged message in one step: never lost, never in two places, only one mover
# wins a tag, and it leaves its owner's held set. A message too large to read goes back,
# unread, to the list it came from.
MOVE = """
local tag, payload, where, cutoff, expect = unpack(ARGV)
local score = redis.call('ZSCORE', KEYS[2], tag)
if not score and where ~= 'drop' then return 0 end
local held = redis.call('HGET', KEYS[3], tag)
if expect ~= '' and held and held ~= expect then return 0 end
if score and cutoff ~= '' and tonumber(score) > tonumber(cutoff) then return 0 end
local target = redis.call('HGET', KEYS[4], tag) or KEYS[7]
local item = redis.call('HGET', KEYS[5], tag)
if item then payload = item end
redis.call('ZREM', KEYS[2], tag)
redis.call('HDEL', KEYS[1], tag)
for k = 3, 5 do redis.call('HDEL', KEYS[k], tag) end
if held then redis.call('SREM', held, tag) end
redis.call('SREM', KEYS[6], tag)
if where == 'drop' or not score then return 0 end
if where == 'front' then
  redis.call('RPUSH', target, payload)
else
  redis.call('LPUSH', target, payload)
end
return 1
"""

# KEYS: unacked hash, index, owners hash, oversized origins, oversized items, this worker's
# held set. ARGV: the tags. Forgets acknowledged messages (and takes them out of their
# owner's held set).
ACK = """
for _, tag in ipairs(ARGV) do
  local held = redis.call('HGET', KEYS[3], tag)
  if held then redis.call('SREM', held, tag) end
  redis.call('SREM', KEYS[6], tag)
  redis.call('ZREM', KEYS[2], tag)
  redis.call('HDEL', KEYS[1], tag)
  for k = 3, 5 do redis.call('HDEL', KEYS[k], tag) end
end
return #ARGV
"""

# KEYS: the unacked index, the owners hash. ARGV: this worker's held set, then the tags of
# the messages it still has in hand. Marks those it still owns as taken now (Redis TIME), so
# only a dead worker's messages (or those its intake let go of) reach the visibility timeout;
# how many were refreshed.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = 0
for k = 2, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[k]) == ARGV[1] then
    n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[k])
  end
end
return n
"""

# KEYS: per worker, its held set, its unrouted set and its affinity lists (ARGV[1] of them).
# Returns each worker's load: the messages it has taken and kept (held, less those of a take
# it is still routing) plus those waiting in its affinity lists.
LOADS = """
local lists, out = tonumber(ARGV[1]), {}
for w = 1, #KEYS, lists + 2 do
  local load = redis.call('SCARD', KEYS[w])
  for _, tag in ipairs(redis.call('SMEMBERS', KEYS[w + 1])) do
    load = load - redis.call('SISMEMBER', KEYS[w], tag)
  end
  for k = w + 2, w + 1 + lists do load = load + redis.call('LLEN', KEYS[k]) end
  out[#out + 1] = load
end
return out
"""

# KEYS: source lists, then as many target lists. Moves every item, keeping their order.
DRAIN = """
local half, n = #KEYS / 2, 0
for i = 1, half do
  while true do
    local item = redis.call('LPOP', KEYS[i])
    if not item then break end
    redis.call('RPUSH', KEYS[half + i], item)
    n = n + 1
  end
end
return n
"""
