#!/usr/bin/env bash
# User SQL beside live ingest (issue 25: "queries never make the writer wait"):
# the fleet scenario of `milepost bench` while one client loops a heavy query over
# the fleet's whole table through `POST /api/v1/sql`. Prints the bench's figures
# (req/s, p99, apply lag) and the SQL answers' times. Not run by CI (a minute).
#
#   benches/sql-beside-fleet.sh BINARY [threads=2] [seconds=20] [out=/tmp/sql-fleet]
#   MILEPOST_BENCH_NO_SQL=1 benches/sql-beside-fleet.sh …   # the same without SQL
set -euo pipefail
bin=$(readlink -f "$1") threads=${2:-2} seconds=${3:-20} out=${4:-/tmp/sql-fleet}
rm -rf "$out" && mkdir -p "$out"
query="SELECT device, sensor, count(*), avg(value), min(ts), max(ts) FROM readings
GROUP BY ALL ORDER BY 3 DESC LIMIT 10"

# The server `bench` starts: the real one, plus (once it listens) the SQL client.
cat > "$out/server" <<EOF
#!/usr/bin/env bash
data=""; prev=""
for a in "\$@"; do [ "\$prev" = --data-dir ] && data=\$a; prev=\$a; done
mkdir -p "\$data"
token=\$(MILEPOST_DATA_DIR="\$data" "$bin" token create --role viewer 2>/dev/null | tail -1)
MILEPOST_THREADS=$threads "$bin" "\$@" 2> >(tee "$out/server.log" >&2) &
pid=\$!
trap 'kill -TERM \$pid' TERM INT
if [ -z "\${MILEPOST_BENCH_NO_SQL:-}" ]; then
  (
    until grep -q "public HTTP API listening" "$out/server.log" 2>/dev/null; do sleep 0.1; done
    addr=\$(grep -o '"addr":"[^"]*"' "$out/server.log" | tail -1 | cut -d'"' -f4)
    while kill -0 \$pid 2>/dev/null; do
      curl -s -o /dev/null -w '%{http_code} %{time_total}\n' \
        -H "Authorization: Bearer \$token" --data "$query" "http://\$addr/api/v1/sql" \
        >> "$out/sql-times" || true
    done
  ) &
fi
# A TERM interrupts the first wait (143); the second gets the server's own status.
wait \$pid; status=\$?
if [ \$status -gt 128 ]; then wait \$pid; status=\$?; fi
exit \$status
EOF
chmod +x "$out/server"

MILEPOST_BENCH_SERVER="$out/server" "$bin" --log warn bench --scenario fleet \
    --devices 2000 --connections 64 --duration "$seconds" --new-devices 0 \
    --big-readings 0 --victoria-metrics off --memory-limit "${MILEPOST_BENCH_MEMORY:-64MB}" \
    --json "$out/fleet.json" > "$out/fleet.txt" 2>&1 || { tail -20 "$out/fleet.txt"; exit 1; }
grep -iE "req/s|apply lag|p99" "$out/fleet.txt" | head -12
if [ -s "$out/sql-times" ]; then
  python3 - "$out/sql-times" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
times = sorted(float(t) for c, t in rows if c == "200")
codes = {}
for c, _ in rows:
    codes[c] = codes.get(c, 0) + 1
if times:
    print(f"SQL: {len(times)} answers, p50 {statistics.median(times) * 1e3:.0f} ms, "
          f"max {times[-1] * 1e3:.0f} ms; statuses {codes}")
PY
fi
