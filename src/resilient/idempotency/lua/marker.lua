-- Read the idempotency marker (see claim.lua), making it if it is missing: how a store
-- learns the marker before its first claim, so that it notices a loss on that claim.
--
-- KEYS[1]: the marker. ARGV[1]: the id to give a missing marker.
-- Returns the marker's value, "<id> <lost_ms>" (or, if written before lost_ms existed,
-- the id alone). A missing marker is made unstamped (lost_ms 0): a reader that had seen
-- none cannot tell a new server from an emptied one.

local value = redis.call('GET', KEYS[1])
if not value then
  value = ARGV[1] .. ' 0'
  redis.call('SET', KEYS[1], value)
end
return value
