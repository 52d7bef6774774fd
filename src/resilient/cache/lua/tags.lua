-- Whether the tags of a value still have the versions it was stored with (on a cluster,
-- where a value and its tags' versions live in different slots: see get.lua).
--
-- KEYS: the tags' version keys (one hash tag). ARGV: the versions, in the order of KEYS.
-- Returns 1 when each is still current, else 0.

for i, key in ipairs(KEYS) do
  if redis.call('GET', key) ~= ARGV[i] then
    return 0
  end
end
return 1
