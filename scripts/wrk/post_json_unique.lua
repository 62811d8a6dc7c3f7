-- wrk script for scripts/bench_overhead.py: POST a JSON body made unique per request, report as JSON.
--   wrk -s scripts/wrk/post_json_unique.lua URL -- BODY_FILE [HEADER:VALUE ...]
-- The body file holds the marker #NONCE once; each request replaces it with a run-unique counter,
-- so a cache in the path never sees the same request twice (every lookup is a miss).
-- done() prints one JSON line prefixed "WRK_JSON ", as post_json.lua.

local head, tail, headers = nil, nil, nil
local counter = 0
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))

function init(args)
  local file = assert(io.open(args[1], "rb"), "cannot open body file " .. tostring(args[1]))
  local body = file:read("*a")
  file:close()
  local at = assert(body:find("#NONCE", 1, true), "the body file has no #NONCE marker")
  head, tail = body:sub(1, at - 1), body:sub(at + 6)
  headers = { ["Content-Type"] = "application/json" }
  for i = 2, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name then headers[name] = value end
  end
end

function request()
  counter = counter + 1
  return wrk.format("POST", nil, headers, head .. run .. "-" .. counter .. tail)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
