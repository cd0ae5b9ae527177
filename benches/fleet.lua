-- wrk script of issue 13's method: each request is one second of one device, six
-- readings (one per sensor), devices round-robin per wrk thread, unique timestamps.
-- Not a project dependency; for comparing Milepost with other systems the same way:
--
--   milepost serve --api-key benchkey0123456789 --listen 127.0.0.1:8080 --data-dir /tmp/fleet
--   BASE=$(( $(date +%s) - 60 )) wrk -t2 -c64 -d15s -s benches/fleet.lua http://127.0.0.1:8080
--
-- BASE is the epoch second of every device's first reading; each request advances
-- its device by a second. A later run on the same server needs a BASE past the
-- previous run's last second (requests / devices), or its readings are duplicates.
-- DEVICES (2000), THREADS (2, as wrk's -t) and PREFIX ("car") are optional.
local threads = {}
local counter = 1
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  n = 0
  devices = tonumber(os.getenv("DEVICES") or "2000")
  nthreads = tonumber(os.getenv("THREADS") or "2")
  base = tonumber(os.getenv("BASE") or os.time() - 7200)
  prefix = os.getenv("PREFIX") or "car"
end
local sensors = {"speed","revolution","engine_temperature","fuel","location_latitude","location_longitude"}
function request()
  local per = math.floor(devices / nthreads)
  local d = (n % per) * nthreads + (tid - 1)
  local sec = base + math.floor(n / per)
  n = n + 1
  local body = {}
  local ts = os.date("!%Y-%m-%dT%H:%M:%S", sec)
  for i, s in ipairs(sensors) do
    body[i] = string.format('{"device":"%s-%d","sensor":"%s","value":%d.5,"timestamp":"%s.%03dZ"}', prefix, d, s, (n + i) % 90, ts, i * 100)
  end
  return wrk.format("POST", "/ingest", {["Authorization"]="Bearer benchkey0123456789", ["Content-Type"]="application/x-ndjson"}, table.concat(body, "\n") .. "\n")
end
function done(summary, latency, requests)
  io.write(string.format("req/s %.0f p50 %.1fms p99 %.1fms p999 %.1fms errors %d non2xx %d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50)/1000, latency:percentile(99)/1000, latency:percentile(99.9)/1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
