-- Return the current version of each tag, to store a value with, making the missing ones.
--
-- KEYS: the tags' version keys (one hash tag: every tag's version lives in one slot).
-- ARGV[1]: the least lifetime in ms each version key is given (the value's, so that the
-- version outlives it); ARGV[2..]: a new version per tag, for a tag that has none.
-- A version key that expires takes every value stored with it along (a missing version
-- matches no stamp), so the lifetime is only a matter of keeping values, never of serving
-- a stale one.
-- Returns the versions, in the order of KEYS.

local lifetime = tonumber(ARGV[1])
local versions = {}
for i, key in ipairs(KEYS) do
  local version = redis.call('GET', key)
  if version then
    if redis.call('PTTL', key) < lifetime then
      redis.call('PEXPIRE', key, lifetime)
    end
  else
    version = ARGV[i + 1]
    redis.call('SET', key, version, 'PX', lifetime)
  end
  versions[i] = version
end
return versions
