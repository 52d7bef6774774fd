-- Release an idempotency record: delete it, if the caller owns a live lease.
--
-- KEYS[1]: the record (see claim.lua). ARGV: now in ms (or "r"), owner.
-- Returns 1 when deleted, 0 when the caller no longer owns the record.

local now = now_ms(ARGV[1])
local key = KEYS[1]

local record = redis.call('HMGET', key, 's', 'o', 'd')
local deadline = tonumber(record[3])
if record[1] ~= 'p' or record[2] ~= ARGV[2] or not deadline or deadline <= now then
  return 0
end
redis.call('DEL', key)
return 1
