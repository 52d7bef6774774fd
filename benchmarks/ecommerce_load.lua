-- The example shop's load, for wrk: benchmarks/ecommerce_load.py runs it as
--
--   wrk -s benchmarks/ecommerce_load.lua URL -- MODE PRODUCTS CLIENTS OUT TOKENS SEED REPLAYS
--
-- MODE is "healthz" (GET /healthz: the ceiling), "read" (the catalog: listings with varied
-- filters and pages, product pages, a few other GETs, from CLIENTS client addresses sent
-- in X-Forwarded-For) or "order" (POST /api/orders: each thread is one signed-in customer,
-- the token on line N of the file TOKENS, over one connection; a share REPLAYS of the
-- requests resend an earlier key with its body). In "order" mode each thread logs to
-- OUT/thread-N.log what it sent ("S", key, body) and, after it, what came back ("R",
-- status, replayed, order id): with one connection per thread a response always belongs
-- to the request logged last, which is what makes the audit exact.
-- done() prints one line, "RESULT {json}": requests, duration, p50/p99 latency (µs),
-- socket errors and the count of every status code.

local threads = {}
local started = 0

function setup(thread)
  started = started + 1
  thread:set("id", started)
  table.insert(threads, thread)
end

counts = {} -- status -> responses (a global: done() reads it from every thread)

local mode, products, clients, token, log, tag, replays
local sent, pending, sequence, verified = {}, nil, 0, false

local CATEGORIES = { "audio", "books", "cameras", "games", "home", "laptops", "outdoor", "phones" }
local BRANDS = { "Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay" }
local PRICES = { {}, { nil, "5000" }, { "5000", "50000" }, { "50000", nil }, { "10000", "100000" } }
local WORDS = { "Pro", "Lite", "Kettle", "Drone", "Novel", "Tent", "Max", "Lamp" }

function init(args)
  mode, products, clients = args[1], tonumber(args[2]), tonumber(args[3])
  math.randomseed(tonumber(args[6]) * 1000 + id)
  if mode == "order" then
    local tokens = {}
    for line in io.lines(args[5]) do
      tokens[#tokens + 1] = line
    end
    token = tokens[(id - 1) % #tokens + 1]
    log = assert(io.open(string.format("%s/thread-%03d.log", args[4], id), "w"))
    log:setvbuf("line")
    tag, replays = "k" .. args[6], tonumber(args[7])
  end
end

local function client()
  local n = math.random(clients)
  return string.format("10.%d.%d.%d", math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
end

local function listing()
  local query = {}
  if math.random() < 0.6 then
    query[#query + 1] = "category=" .. CATEGORIES[math.random(#CATEGORIES)]
  end
  if math.random() < 0.3 then
    query[#query + 1] = "brand=" .. BRANDS[math.random(#BRANDS)]
  end
  local price = PRICES[math.random(#PRICES)]
  if price[1] then
    query[#query + 1] = "min_price=" .. price[1]
  end
  if price[2] then
    query[#query + 1] = "max_price=" .. price[2]
  end
  if math.random() < 0.1 then
    query[#query + 1] = "q=" .. WORDS[math.random(#WORDS)]
  end
  -- First pages far more often than later ones, as people browse.
  query[#query + 1] = "page=" .. math.min(math.random(5), math.random(5))
  return "/api/products?" .. table.concat(query, "&")
end

local function product()
  local x = math.random() -- popular products more often: id ~ products * x^2
  return "/api/products/" .. (math.floor(products * x * x) + 1)
end

local function order()
  local key, body
  if #sent > 0 and math.random() < replays then
    local old = sent[math.random(#sent)]
    key, body = old[1], old[2]
  else
    sequence = sequence + 1
    key = string.format("%s-%d-%d", tag, id, sequence)
    local items = {}
    for i = 1, math.random(2) do
      items[i] = string.format('{"product_id":%d,"quantity":%d}', math.random(products), math.random(2))
    end
    body = '{"items":[' .. table.concat(items, ",") .. "]}"
  end
  pending = { key, body }
  log:write("S\t", key, "\t", body, "\n")
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key,
  }
  return wrk.format("POST", "/api/orders", headers, body)
end

function request()
  -- wrk calls request() once on the first thread before the run, to check it: that call
  -- sends nothing, so it must not use a key.
  if mode == "healthz" or (id == 1 and not verified) then
    verified = true
    return wrk.format("GET", "/healthz")
  end
  if mode == "order" then
    return order()
  end
  local r, path = math.random(), nil
  if r < 0.55 then
    path = listing()
  elseif r < 0.95 then
    path = product()
  elseif r < 0.98 then
    path = "/.well-known/jwks.json"
  else
    path = "/readyz"
  end
  return wrk.format("GET", path, { ["X-Forwarded-For"] = client() })
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if log then
    local replayed = headers["idempotent-replayed"] or headers["Idempotent-Replayed"]
    local order_id = "-"
    if status == 201 then
      order_id = string.match(body, '^{"id":(%d+)') or "?"
    end
    log:write("R\t", status, "\t", replayed and "1" or "0", "\t", order_id, "\n")
    if pending then
      sent[#sent + 1] = pending
      pending = nil
    end
  end
end

function done(summary, latency, requests)
  local statuses = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      statuses[status] = (statuses[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(statuses) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ",")
  ))
end
