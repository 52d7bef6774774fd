-- Return the current version of each tag ("" for a tag that has none), on a cluster, where
-- a value and its tags' versions live in different slots (see get.lua): the caller
-- compares them with the value's stamps.
--
-- KEYS: the tags' version keys (one hash tag). Returns the versions, in the order of KEYS.

local versions = {}
for i, key in ipairs(KEYS) do
  versions[i] = redis.call('GET', key) or ''
end
return versions
