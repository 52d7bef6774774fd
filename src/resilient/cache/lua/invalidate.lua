-- Invalidate tags, all at once: give each tag that has a version a new one.
--
-- KEYS: the tags' version keys (one hash tag). ARGV: a new version per tag.
-- Every value stored with an old version is gone for every reader from this moment (they
-- compare the versions on read). A tag with no version has no value stored with it.
-- Returns how many tags had a version.

local changed = 0
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i], 'XX', 'KEEPTTL') then
    changed = changed + 1
  end
end
return changed
