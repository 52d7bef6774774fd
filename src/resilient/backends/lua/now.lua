-- Prepended to the scripts that read the time: "now" from the caller in ms, or, for "r",
-- Redis's own TIME, one clock for every application server. Returns the time and
-- whether the caller gave it.
local function now_ms(given)
  if given == 'r' then
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), false
  end
  return tonumber(given), true
end

