-- A retry budget shared by every instance: add this instance's pending tokens, read the
-- live balance of all of them.
--
-- KEYS[1]: a hash from time-slice number to the tokens (in millionths) deposited minus
--          withdrawn in that slice, by every instance.
-- ARGV: now in ms (or "r" for Redis TIME), slice_ms, slices, delta (millionths).
-- Returns the sum over the last `slices` slices, the current one included.

local now = now_ms(ARGV[1])
local key, slice, slices, delta = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = math.floor(now / slice)

if delta ~= 0 then
  redis.call('HINCRBY', key, string.format('%d', epoch), delta)
end
local total = 0
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local at = tonumber(fields[i])
  if at and at > epoch - slices then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', key, fields[i])
  end
end
redis.call('PEXPIRE', key, slice * slices * 2)
return total
