-- Extend the lease on an idempotency record, if the caller owns a live one.
--
-- KEYS[1]: the record (see claim.lua). ARGV: now in ms (or "r"), owner, lease_ms.
-- Returns 1 when extended, 0 when the caller no longer owns the record.

local now, given = now_ms(ARGV[1])
local margin = given and 60000 or 0
local key, lease = KEYS[1], tonumber(ARGV[3])

local record = redis.call('HMGET', key, 's', 'o', 'd')
local deadline = tonumber(record[3])
if record[1] ~= 'p' or record[2] ~= ARGV[2] or not deadline or deadline <= now then
  return 0
end
redis.call('HSET', key, 'd', string.format('%.0f', now + lease))
redis.call('PEXPIRE', key, lease + margin)
return 1
