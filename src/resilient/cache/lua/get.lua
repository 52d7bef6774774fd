-- Read a cached value, unless one of its tags was invalidated since it was stored.
--
-- KEYS[1]: the value. ARGV[1]: the prefix of the tags' version keys, to check them here
-- (a standalone server: they live on it), or "" to leave them to the caller (a cluster:
-- they live in another slot, and the caller checks them with tags.lua).
-- The value is "v2|expires_ms|stale_ms|delta_ms|stamps|data", stamps "tag:version,..." (the
-- tags' digests and the versions it was stored with).
-- Returns the value, or false when there is none or a tag moved on (or expired).

local value = redis.call('GET', KEYS[1])
if value and ARGV[1] ~= '' then
  local stamps = string.match(value, '^v2|%d+|%d+|%d+|([^|]*)|')
  if stamps then
    for tag, version in string.gmatch(stamps, '(%x+):(%x+)') do
      if redis.call('GET', ARGV[1] .. tag) ~= version then
        return false
      end
    end
  end
end
return value
