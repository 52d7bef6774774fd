-- Claim an idempotency record: the Lua twin of MemoryIdempotencyStore.claim.
--
-- KEYS[1]: the record, a hash: s (state: p in progress, c completed), f (fingerprint),
--          o (owner, while in progress), d (the lease's end or the retention's end, in
--          ms), r (the stored payload, once completed).
-- ARGV: now in ms (or "r" to read Redis TIME), fingerprint, owner, lease_ms.
-- Returns {"n"} claimed, {"p", ms_left} in progress, {"c", payload} completed,
-- {"m"} fingerprint mismatch.
--
-- A caller that passes its own "now" gets 60 s of TTL margin, so that Redis expiry never
-- runs ahead of the caller's clock; with Redis TIME the key expires with its deadline.

local now, given = now_ms(ARGV[1])
local margin = given and 60000 or 0
local key, fingerprint, owner, lease = KEYS[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local record = redis.call('HMGET', key, 's', 'f', 'd')
local deadline = tonumber(record[3])
if record[1] and deadline and deadline > now then
  if record[2] ~= fingerprint then
    return {'m'}
  end
  if record[1] == 'c' then
    return {'c', redis.call('HGET', key, 'r')}
  end
  return {'p', deadline - now}
end

redis.call('DEL', key)
redis.call('HSET', key, 's', 'p', 'f', fingerprint, 'o', owner,
  'd', string.format('%.0f', now + lease))
redis.call('PEXPIRE', key, lease + margin)
return {'n'}
