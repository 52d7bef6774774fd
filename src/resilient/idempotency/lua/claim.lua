-- Claim an idempotency record: the Lua twin of MemoryIdempotencyStore.claim.
--
-- KEYS[1]: the record, a hash: s (state: p in progress, c completed), f (fingerprint),
--          o (owner, while in progress), d (the lease's end or the retention's end, in
--          ms), r (the stored payload, once completed).
-- KEYS[2] (optional): the marker, a key without TTL whose value names this store's data.
-- ARGV: now in ms (or "r" to read Redis TIME), fingerprint, owner, lease_ms, then, with
--       the marker: the marker's value this caller last saw ("" if none), and the value
--       to give a missing marker.
-- Returns {"n", 0} claimed, {"p", ms_left} in progress, {"c", payload} completed,
-- {"m", 0} fingerprint mismatch; a third element, the marker's value, when it is not
-- the one the caller last saw. A marker that vanished went with the data (Redis
-- restarted empty, or was flushed): the caller that had seen it learns its records are
-- lost.
--
-- A caller that passes its own "now" gets 60 s of TTL margin, so that Redis expiry never
-- runs ahead of the caller's clock; with Redis TIME the key expires with its deadline.

local now, given = now_ms(ARGV[1])
local margin = given and 60000 or 0
local key, fingerprint, owner, lease = KEYS[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local seen = nil
if KEYS[2] then
  local marker = redis.call('GET', KEYS[2])
  if not marker then
    marker = ARGV[6]
    redis.call('SET', KEYS[2], marker)
  end
  if marker ~= ARGV[5] then
    seen = marker
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
