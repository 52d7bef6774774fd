-- Store a value, whatever is there (no lock involved).
-- KEYS[1]: the value. ARGV: the value, its lifetime in ms. Returns 1.

redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
