-- Claim the right to load a key, unless a fresh value is there already.
--
-- KEYS: the value, the lock, the waiter count, the notify list (one hash tag).
-- ARGV: now (ms, the caller's clock, as the values' deadlines are), token, lease_ms,
-- "1" to claim over whatever value is there (the caller found it unreadable, or a tag of it
-- invalidated), and the prefix of the tags' version keys to check a value's tags here, or
-- "" to leave them to the caller (see get.lua).
-- The value is "v2|expires_ms|stale_ms|delta_ms|stamps|data".
-- Returns {"v", value} when a fresh value is there, {"o"} when the caller now holds the
-- lock, {"w", lock_ttl_ms} when another holds it (the caller is counted as a waiter).

local value = ARGV[4] ~= '1' and redis.call('GET', KEYS[1])
if value then
  local expires, stamps = string.match(value, '^v2|(%d+)|%d+|%d+|([^|]*)|')
  local fresh = expires and tonumber(expires) > tonumber(ARGV[1])
  if fresh and ARGV[5] ~= '' then
    for tag, version in string.gmatch(stamps, '(%x+):(%x+)') do
      if redis.call('GET', ARGV[5] .. tag) ~= version then
        fresh = false
        break
      end
    end
  end
  if fresh then
    return {'v', value}
  end
end
local lease = tonumber(ARGV[3])
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', lease) then
  return {'o'}
end
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], lease * 2)
return {'w', redis.call('PTTL', KEYS[2])}
