-- Publish a circuit breaker's transition to every instance.
--
-- KEYS[1]: the shared state, a hash: s (state: "o" open, "c" closed), u (open until, ms),
--          g (generation: +1 per published transition), p (the token of the instance
--          holding the probe lease), pu (the lease's end, ms).
-- ARGV: now in ms (or "r" for Redis TIME), kind ("open" or "close"), open_for_ms, token,
--       ttl_ms (how long the state is kept once nobody writes it).
-- "open" always wins: any instance that trips opens the circuit for everyone. "close"
-- counts only from the instance holding the probe lease (claim.lua), whose probes succeeded.
-- Returns {generation, ms until the circuit may be probed (0 when closed)}.

local now = now_ms(ARGV[1])
local key, kind, open_for, token, ttl = KEYS[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])

local state = redis.call('HMGET', key, 's', 'u', 'g', 'p')
local generation = tonumber(state[3]) or 0

if kind == 'open' then
  local untl = now + open_for
  local current = tonumber(state[2])
  if state[1] == 'o' and current and current > untl and state[4] ~= token then
    return {generation, current - now}  -- already open for longer: keep it
  end
  generation = generation + 1
  redis.call('HSET', key, 's', 'o', 'u', string.format('%.0f', untl), 'g', generation)
  redis.call('HDEL', key, 'p', 'pu')
  redis.call('PEXPIRE', key, open_for + ttl)
  return {generation, open_for}
end

if state[1] == 'o' and state[4] == token then
  generation = generation + 1
  redis.call('HSET', key, 's', 'c', 'g', generation)
  redis.call('HDEL', key, 'p', 'pu', 'u')
  redis.call('PEXPIRE', key, ttl)
end
return {generation, 0}
