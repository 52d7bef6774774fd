-- Read a circuit breaker's shared state; renew this instance's probe lease while one of
-- its probes is in flight. Never grants a lease: a call claims it (claim.lua).
--
-- KEYS[1]: the shared state (see publish.lua).
-- ARGV: now in ms (or "r" for Redis TIME), token, lease_ms, renew ("1": a probe of this
--       instance is in flight).
-- Returns {kind, generation, ms}: kind "c" closed (ms 0), "o" open (ms until it may be
-- probed), "p" this instance holds the lease (ms left on it), "w" another instance holds
-- it (ms left on it), "f" the open period is over and nobody holds the lease (ms 0).

local now = now_ms(ARGV[1])
local key, token, lease, renew = KEYS[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local state = redis.call('HMGET', key, 's', 'u', 'g', 'p', 'pu')
local generation = tonumber(state[3]) or 0
if state[1] ~= 'o' then
  return {'c', generation, 0}
end
local untl = tonumber(state[2]) or 0
if now < untl then
  return {'o', generation, untl - now}
end
local prober, prober_until = state[4], tonumber(state[5]) or 0
if prober == token then
  if renew == '1' then
    redis.call('HSET', key, 'pu', string.format('%.0f', now + lease))
    return {'p', generation, lease}
  end
  if prober_until > now then
    return {'p', generation, prober_until - now}
  end
  return {'f', generation, 0}
end
if prober and prober_until > now then
  return {'w', generation, prober_until - now}
end
return {'f', generation, 0}
