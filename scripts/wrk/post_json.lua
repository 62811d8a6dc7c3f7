-- wrk script for scripts/bench_overhead.py: POST a JSON body from a file, report as JSON.
--   wrk -s scripts/wrk/post_json.lua URL -- BODY_FILE [HEADER:VALUE ...]
-- If the body file holds the marker #NONCE, each request replaces it with a run-unique counter,
-- so a cache in the path never sees the same request twice (every lookup is a miss); without
-- it, the one request is formatted once per thread and sent throughout.
-- done() prints one JSON line prefixed "WRK_JSON ".

local head, tail, headers, same = nil, nil, nil, nil
local counter = 0
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))

function init(args)
  local file = assert(io.open(args[1], "rb"), "cannot open body file " .. tostring(args[1]))
  local body = file:read("*a")
  file:close()
  headers = { ["Content-Type"] = "application/json" }
  for i = 2, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name then headers[name] = value end
  end
  local at = body:find("#NONCE", 1, true)
  if at then
    head, tail = body:sub(1, at - 1), body:sub(at + 6)
  else
    same = wrk.format("POST", nil, headers, body)
  end
end

function request()
  if same then return same end
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
