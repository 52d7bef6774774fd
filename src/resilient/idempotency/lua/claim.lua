-- Claim an idempotency record: the Lua twin of MemoryIdempotencyStore.claim.
--
-- KEYS[1]: the record, a hash: s (state: p in progress, c completed), f (fingerprint),
--          o (owner, while in progress), d (the lease's end or the retention's end, in
--          ms), r (the stored payload, once completed).
-- KEYS[2] (optional): the marker, a key without TTL whose value, "<id> <lost_ms>", names
--          this store's data (id) and the moment its data was last found lost (lost_ms,
--          0 if never). A marker written before lost_ms existed holds the id alone.
-- ARGV: now in ms (or "r" to read Redis TIME), fingerprint, owner, lease_ms, then, with
--       the marker: the marker's value this caller last saw ("" if none), and the id to
--       give a missing marker.
-- Returns {"n", 0} claimed, {"p", ms_left} in progress, {"c", payload} completed,
-- {"m", 0} fingerprint mismatch; a third element, the marker's value, when it is not
-- the one the caller last saw.
--
-- A marker that vanished went with the data (Redis restarted empty, or was flushed).
-- The first caller that had seen the old one and finds the marker missing makes a new one
-- stamped with now: every caller then takes the loss's moment from the marker, so each
-- instance's quarantine ends at the same moment, and an instance that never saw the old
-- marker still learns of the loss. A caller that had seen none cannot tell a new server
-- from an emptied one: the marker it makes is unstamped, and the first caller that had
-- seen the old one stamps it when it finds another id there.
--
-- A caller that passes its own "now" gets 60 s of TTL margin, so that Redis expiry never
-- runs ahead of the caller's clock; with Redis TIME the key expires with its deadline.

local now, given = now_ms(ARGV[1])
local margin = given and 60000 or 0
local key, fingerprint, owner, lease = KEYS[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local function parse(value)
  local id, lost = string.match(value, '^(.-) (%d+)$')
  if id then
    return id, tonumber(lost)
  end
  return value, 0
end

local seen = nil
if KEYS[2] then
  local last = ARGV[5]
  local value = redis.call('GET', KEYS[2])
  local id, lost
  if value then
    id, lost = parse(value)
  else
    id, lost = ARGV[6], 0
  end
  local stamp = last ~= '' and lost == 0 and id ~= parse(last)
  if stamp or not value then
    value = id .. ' ' .. string.format('%.0f', stamp and now or 0)
    redis.call('SET', KEYS[2], value)
  end
  if value ~= last then
    seen = value
  end
end

local function reply(kind, value)
  if seen then
    return {kind, value, seen}
  end
  return {kind, value}
end

local record = redis.call('HMGET', key, 's', 'f', 'd')
local deadline = tonumber(record[3])
if record[1] and deadline and deadline > now then
  if record[2] ~= fingerprint then
    return reply('m', 0)
  end
  if record[1] == 'c' then
    return reply('c', redis.call('HGET', key, 'r'))
  end
  return reply('p', deadline - now)
end

redis.call('DEL', key)
redis.call('HSET', key, 's', 'p', 'f', fingerprint, 'o', owner,
  'd', string.format('%.0f', now + lease))
redis.call('PEXPIRE', key, lease + margin)
return reply('n', 0)
