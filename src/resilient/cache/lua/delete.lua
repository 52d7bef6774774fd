-- Forget a value. KEYS[1]: the value. Returns how many keys were deleted (0 or 1).

return redis.call('DEL', KEYS[1])
