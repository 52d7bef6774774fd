-- Complete an idempotency record: store the payload, if the caller owns a live lease.
--
-- KEYS[1]: the record (see claim.lua). ARGV: now in ms (or "r"), owner, ttl_ms, payload.
-- Returns 1 when stored, 0 when the caller no longer owns the record. The owner stays on
-- the completed record, so that the owner repeating its call (its first reply was lost)
-- gets 1 again, without a change.

local now, given = now_ms(ARGV[1])
local margin = given and 60000 or 0
local key, owner, ttl = KEYS[1], ARGV[2], tonumber(ARGV[3])

local record = redis.call('HMGET', key, 's', 'o', 'd')
local deadline = tonumber(record[3])
if record[1] == 'c' and record[2] == owner and deadline and deadline > now then
  return 1
end
if record[1] ~= 'p' or record[2] ~= owner or not deadline or deadline <= now then
  return 0
end
redis.call('HSET', key, 's', 'c', 'r', ARGV[4], 'd', string.format('%.0f', now + ttl))
redis.call('PEXPIRE', key, ttl + margin)
return 1
