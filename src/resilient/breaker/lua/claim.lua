-- Claim the probe lease of an open circuit for this instance, which has a call to probe
-- with: granted when the open period is over and no other instance holds a live lease.
--
-- KEYS[1]: the shared state (see publish.lua).
-- ARGV: now in ms (or "r" for Redis TIME), token, lease_ms, seen (the newest generation
--       this instance has read), ttl_ms (how long the state is kept once nobody writes it).
-- Returns {kind, generation, ms}, as sync.lua: "p" granted (ms of the lease), "w" another
-- instance holds it (ms left on it), "o" still open (ms until it may be probed), "c"
-- closed by another instance since this one last read the state (ms 0).
-- An instance claims only when its own circuit is open. If the shared state is closed but
-- no newer than what it last read, Redis has forgotten the opening (restarted empty,
-- flushed, expired, or the opening never reached it): the state is opened again, ending
-- now, with this instance as the prober, so the others wait for its probes.

local now = now_ms(ARGV[1])
local key, token, lease = KEYS[1], ARGV[2], tonumber(ARGV[3])
local seen, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease_end = string.format('%.0f', now + lease)

local state = redis.call('HMGET', key, 's', 'u', 'g', 'p', 'pu')
local generation = tonumber(state[3]) or 0
if state[1] ~= 'o' then
  if generation > seen then
    return {'c', generation, 0}
  end
  generation = math.max(generation, seen) + 1
  redis.call('HSET', key, 's', 'o', 'u', string.format('%.0f', now), 'g', generation,
    'p', token, 'pu', lease_end)
  redis.call('PEXPIRE', key, lease + ttl)
  return {'p', generation, lease}
end
local untl = tonumber(state[2]) or 0
if now < untl then
  return {'o', generation, untl - now}
end
local prober, prober_until = state[4], tonumber(state[5]) or 0
if prober and prober ~= token and prober_until > now then
  return {'w', generation, prober_until - now}
end
redis.call('HSET', key, 'p', token, 'pu', lease_end)
return {'p', generation, lease}
