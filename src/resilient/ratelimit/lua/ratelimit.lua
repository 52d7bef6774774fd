-- Rate-limit checks, several per call: the Lua twin of resilient/ratelimit/core.py.
--
-- KEYS: one key per policy, check after check.
-- ARGV: one string per check, comma-separated integers: now in milliseconds (or "r" to
-- read Redis TIME, one clock for every application server), consume (0/1), cost, the
-- number of policies n, and n times: kind (1 sliding window, 2 token bucket), limit,
-- capacity, period_ms, block_ms.
-- Returns, per policy of every check: allowed (0/1), remaining, reset_after_ms,
-- retry_after_ms; all integers.
--
-- State is stored as one string of four integers, "a b c blocked_until", with a TTL after
-- which it no longer matters. A block as long as a sliding window's period or longer
-- forgets the counts (see core.py: it then lasts exactly its length). Every number stays
-- an integer below 2^53, so these doubles compute exactly what Python's ints compute.

local function floordiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceildiv(a, b)
  return -floordiv(-a, b)
end

local function load(key)
  local raw = redis.call('GET', key)
  if not raw then
    return nil
  end
  local a, b, c, d = string.match(raw, '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+)$')
  if not a then
    return nil
  end
  return {tonumber(a), tonumber(b), tonumber(c), tonumber(d)}
end

-- Each algorithm returns allowed, remaining, reset, retry, new state, ttl.

local function sliding_window(limit, window, state, now, cost)
  local index = floordiv(now, window)
  local current, previous, blocked = 0, 0, 0
  if state then
    local stored = state[1]
    current, previous, blocked = state[2], state[3], state[4]
    if index < stored then
      index, now = stored, stored * window
    elseif index == stored + 1 then
      previous, current = current, 0
    elseif index > stored + 1 then
      previous, current = 0, 0
    end
  end
  local elapsed = now - index * window
  local weighted = previous * (window - elapsed) + current * window
  local fits = weighted + cost * window <= limit * window
  local allowed = fits and blocked <= now
  local taken = 0
  if allowed then
    taken = cost
  end
  local remaining = math.max(0, floordiv(limit * window - weighted - taken * window, window))
  local reset = 0
  if current + taken > 0 then
    reset = window - elapsed + window
  elseif previous > 0 then
    reset = window - elapsed
  end
  local retry = 0
  if not fits then
    if current + cost <= limit then
      local need = previous * (window - elapsed) - (limit - current - cost) * window
      retry = math.max(0, ceildiv(need, previous))
    else
      local later = 0
      if current > 0 then
        later = ceildiv((current + cost - limit) * window, current)
      end
      retry = window - elapsed + math.max(0, later)
    end
  end
  if blocked > now then
    retry = math.max(retry, blocked - now)
    remaining = 0
  end
  reset = math.max(reset, blocked - now)
  return allowed, remaining, reset, retry, {index, current + taken, previous, blocked}, reset
end

local function token_bucket(rate, capacity_tokens, unit, state, now, cost)
  local capacity = capacity_tokens * unit
  local debt, blocked = 0, 0
  if state then
    local updated = state[1]
    debt, blocked = state[2], state[4]
    if now < updated then
      now = updated
    end
    local elapsed = now - updated
    if elapsed >= ceildiv(debt, rate) then
      debt = 0
    else
      debt = debt - elapsed * rate
    end
  end
  local wanted = debt + cost * unit
  local allowed = blocked <= now and wanted <= capacity
  if allowed then
    debt = wanted
  end
  local remaining = math.max(0, floordiv(capacity - debt, unit))
  if blocked > now then
    remaining = 0
  end
  local reset = math.max(ceildiv(debt, rate), blocked - now)
  local retry = 0
  if not allowed then
    retry = math.max(ceildiv(wanted - capacity, rate), blocked - now, 0)
  end
  return allowed, remaining, reset, retry, {now, debt, 0, blocked}, reset
end

local function run(kind, limit, capacity, period, state, now, cost)
  if kind == 1 then
    return sliding_window(limit, period, state, now, cost)
  end
  return token_bucket(limit, capacity, period, state, now, cost)
end

local clock = nil
local function redis_now()
  if not clock then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end

local out = {}
local key = 1
for c = 1, #ARGV do
  local f = {}
  for field in string.gmatch(ARGV[c], '[^,]+') do
    f[#f + 1] = field
  end
  local now = tonumber(f[1])
  -- Keys expire on Redis's clock. When the caller brings its own clock the two may
  -- drift, so expiry gets a margin; state kept longer than it matters changes nothing.
  local margin = 60000
  if not now then
    now, margin = redis_now(), 0
  end
  local consume = f[2] == '1'
  local cost = tonumber(f[3])
  local n = tonumber(f[4])
  local specs, states, results = {}, {}, {}
  local admitted = true
  for i = 1, n do
    local at = 5 + (i - 1) * 5
    local spec = {
      tonumber(f[at]), tonumber(f[at + 1]), tonumber(f[at + 2]),
      tonumber(f[at + 3]), tonumber(f[at + 4]),
    }
    local state = load(KEYS[key + i - 1])
    local allowed, remaining, reset, retry, new_state, ttl =
      run(spec[1], spec[2], spec[3], spec[4], state, now, cost)
    specs[i], states[i] = spec, state
    results[i] = {allowed, remaining, reset, retry, new_state, ttl}
    admitted = admitted and allowed
  end
  for i = 1, n do
    local r = results[i]
    local allowed, remaining, reset, retry = r[1], r[2], r[3], r[4]
    local k = KEYS[key + i - 1]
    if admitted and consume then
      if cost > 0 then
        local s = r[5]
        redis.call('SET', k, string.format('%d %d %d %d', s[1], s[2], s[3], s[4]), 'PX', r[6] + margin)
      end
    elseif allowed then
      local spec = specs[i]
      local _
      allowed, remaining, reset, _ = run(spec[1], spec[2], spec[3], spec[4], states[i], now, 0)
      retry = 0
    elseif consume and specs[i][5] > 0 and r[5][4] <= now then
      local s, spec = r[5], specs[i]
      local block = spec[5]
      local b, c = s[2], s[3]
      if spec[1] == 1 and block >= spec[4] then
        -- The block outlives every unit counted: forget them, so that it lasts exactly
        -- its length, wherever in its fixed window the count fell.
        b, c, retry, reset = 0, 0, block, block
      else
        retry = math.max(retry, block)
        reset = math.max(reset, block)
      end
      remaining = 0
      redis.call('SET', k, string.format('%d %d %d %d', s[1], b, c, now + block), 'PX', reset + margin)
    end
    out[#out + 1] = allowed and 1 or 0
    out[#out + 1] = remaining
    out[#out + 1] = reset
    out[#out + 1] = retry
  end
  key = key + n
end
return out
