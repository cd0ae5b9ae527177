#!/usr/bin/env bash
# A day of a million devices through everything that works a day at a time, at a
# small VM's settings: `milepost push` of the day as a backlog (one reading per
# sensor per device, 16 MiB requests of ~28,000 devices each), `milepost compact`,
# `milepost dump` in both formats, retention (a server with --retention-days 1 dumps
# the day and deletes it, while one live request every 10 ms is timed), and `GET
# /api/v1/devices` after it. Prints time and peak RSS of each step. Not run by CI (~3 minutes; 540 MB of NDJSON in WORK).
#
#   benches/million-devices-day.sh BINARY [devices=1000000] [work=/var/tmp/mp-day]
# MEMORY_LIMIT (DuckDB's, default 64MB) and the other budgets through the
# environment; the defaults below are the README's small-VM settings.
set -euo pipefail
bin=$1 devices=${2:-1000000} work=${3:-/var/tmp/mp-day}
limit=${MEMORY_LIMIT:-64MB}
export MALLOC_ARENA_MAX=4 MILEPOST_MAX_DEVICES=0 MILEPOST_MAX_NEW_DEVICES_PER_KEY=0
export MILEPOST_SERIES_MEMORY=${MILEPOST_SERIES_MEMORY:-16MiB}
export MILEPOST_LIVE_SLOTS_MEMORY=${MILEPOST_LIVE_SLOTS_MEMORY:-16MiB}
export MILEPOST_KNOWN_KEYS_MEMORY=${MILEPOST_KNOWN_KEYS_MEMORY:-8MiB}
rm -rf "$work" && mkdir -p "$work"
data=$work/data port=18490
day=$(date -u -d '2 days ago' +%F)

# Six sensors per device at one random second of the day, shuffled in chunks of
# 10,000 devices (arrival order of a gateway's backlog).
python3 - "$devices" "$day" >"$work/day.ndjson" <<'PY'
import random, sys
n, day = int(sys.argv[1]), sys.argv[2]
random.seed(1)
sensors = ["speed", "fuel", "revolution", "engine_temperature", "location_latitude", "location_longitude"]
out = sys.stdout
for chunk in range(0, n, 10000):
    lines = []
    for d in range(chunk, min(n, chunk + 10000)):
        t = random.randrange(86400)
        for s in sensors:
            v = random.randrange(90)
            lines.append('{"sensor":"%s","value":%d.5,"timestamp":"%sT%02d:%02d:%02dZ","device":"car-%07d"}\n'
                         % (s, v, day, t // 3600, t // 60 % 60, t % 60, d))
    random.shuffle(lines)
    out.writelines(lines)
PY

serve() { # starts a server on $data with extra flags; sets $pid once it is ready
    "$bin" --log info serve --data-dir "$data" --memory-limit "$limit" --listen "127.0.0.1:$port" \
        --backend-addr "127.0.0.1:$((port + 1))" --api-key bench --compact-interval 0s "$@" \
        >>"$work/serve.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "server exited; see $work/serve.log"; exit 1; }
        sleep 0.2
    done
}
peak() { awk '/VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$pid/status"; }
stop() { kill -TERM "$pid"; wait "$pid" || true; }

serve --dump-schedule off
"$bin" push --url "http://127.0.0.1:$port" --api-key bench --no-gzip "$work/day.ndjson" 2>&1 |
    grep -E 'accepted' | sed 's/^/push: /'
echo "push: server peak $(peak)"
stop
/usr/bin/time -f "compact: %e s, peak %M KB" "$bin" --log warn compact --data-dir "$data" \
    --memory-limit "$limit" 2>&1 | tail -1
for format in json parquet; do
    /usr/bin/time -f "dump $day as $format: %e s, peak %M KB" "$bin" --log warn dump \
        --data-dir "$data" --memory-limit "$limit" --date "$day" --dump-format "$format" \
        2>&1 >/dev/null | tail -1
done
serve --retention-days 1
# Meanwhile one live request (six readings of one of 100 devices) every 10 ms, each
# timed: the writer must keep answering while the day is deleted.
python3 - "$port" "$work/probe.txt" <<'PY' &
import http.client, json, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
conn = http.client.HTTPConnection("127.0.0.1", port)
times, n, end = [], 0, time.time() + 30
while time.time() < end:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".%03dZ" % (n % 1000)
    body = "".join(json.dumps({"device": "probe-%d" % (n % 100), "sensor": s, "value": n % 90, "timestamp": ts}) + "\n"
                   for s in ["speed", "fuel", "revolution", "engine_temperature", "location_latitude", "location_longitude"])
    t = time.perf_counter()
    conn.request("POST", "/ingest", body, {"Authorization": "Bearer bench", "Content-Type": "application/x-ndjson"})
    r = conn.getresponse(); r.read()
    times.append((time.perf_counter() - t) * 1e3)
    assert r.status == 200, r.status
    n += 1
    time.sleep(0.01)
times.sort()
open(out, "w").write("%d live requests meanwhile: p50 %.1f ms, p99 %.1f ms, slowest %.0f ms\n"
                     % (len(times), times[len(times) // 2], times[len(times) * 99 // 100], times[-1]))
PY
probe=$!
until grep -qE 'retention done|retention failed' "$work/serve.log"; do
    kill -0 "$pid" 2>/dev/null || { echo "server exited; see $work/serve.log"; exit 1; }
    sleep 0.5
done
grep -oE '(deleted the readings of dumped days.*|retention failed.*)' "$work/serve.log" |
    tail -1 | sed 's/^/retention: writer held /'
grep -oE 'updated the series statistics of devices on disk.*' "$work/serve.log" |
    tail -1 | sed 's/^/retention: then, between commits, /'
wait "$probe"
sed 's/^/retention: /' "$work/probe.txt"
echo "retention: server peak $(peak)"
curl -s -o /dev/null -w "GET /api/v1/devices after it: %{time_total} s, %{size_download} bytes\n" \
    -H "Authorization: Bearer bench" "http://127.0.0.1:$port/api/v1/devices"
stop
