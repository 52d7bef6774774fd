-- Store a loaded value (or, with an empty value, give up the load), free the lock if the
-- caller holds it, and wake every counted waiter.
--
-- KEYS: the value, the lock, the waiter count, the notify list (one hash tag).
-- ARGV: token, value ("" to store nothing), px (the value's lifetime in ms).
-- Returns the number of waiters woken.

if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local waiters = tonumber(redis.call('GET', KEYS[3]) or '0')
redis.call('DEL', KEYS[3])
for _ = 1, waiters do
  redis.call('RPUSH', KEYS[4], '1')
end
if waiters > 0 then
  redis.call('PEXPIRE', KEYS[4], 10000)
end
return waiters
