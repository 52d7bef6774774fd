-- Read a circuit breaker's shared state, electing this instance as the prober when the
-- open period is over and no other instance holds the prober's lease.
--
-- KEYS[1]: the shared state (see publish.lua).
-- ARGV: now in ms (or "r" for Redis TIME), token, lease_ms.
-- Returns {kind, generation, ms}: kind "c" closed (ms 0), "o" open (ms until it may be
-- probed), "p" this instance is the prober (ms of its lease), "w" another instance
-- probes (ms left on its lease).

local now = now_ms(ARGV[1])
local key, token, lease = KEYS[1], ARGV[2], tonumber(ARGV[3])

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
if prober and prober ~= token and prober_until > now then
  return {'w', generation, prober_until - now}
end
redis.call('HSET', key, 'p', token, 'pu', string.format('%.0f', now + lease))
return {'p', generation, lease}
