-- Renew the load lock's lease, if the caller still holds it.
-- KEYS[1]: the lock. ARGV: token, lease_ms. Returns 1 when renewed, else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
