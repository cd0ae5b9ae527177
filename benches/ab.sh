#!/usr/bin/env bash
# A/B of two milepost release binaries on this machine, in alternating pairs (old, new),
# as issue 22 asks for changes that must not move the figures: bulk ingest of 10 M
# readings (`bench`) and the fleet scenario (`bench --scenario fleet`). Prints medians
# and the new/old ratio of each pair. Not run by CI (tens of minutes).
#
#   git worktree add /tmp/old <rev> && (cd /tmp/old && cargo build --release)
#   cp "$CARGO_TARGET_DIR/release/milepost" /tmp/milepost-old   # likewise -new
#   benches/ab.sh /tmp/milepost-old /tmp/milepost-new [pairs=3] [out=/tmp/ab]
set -euo pipefail
old=$1 new=$2 pairs=${3:-3} out=${4:-/tmp/ab}
mkdir -p "$out"
for kind in bulk fleet; do
    args=(); [ "$kind" = fleet ] && args=(--scenario fleet)
    for i in $(seq "$pairs"); do
        for v in old new; do
            bin=$old; [ "$v" = new ] && bin=$new
            echo "$kind pair $i: $v" >&2
            "$bin" --log warn bench "${args[@]}" --json "$out/$kind-$v-$i.json" \
                > "$out/$kind-$v-$i.txt" 2>&1
        done
    done
done
python3 - "$out" "$pairs" <<'PY'
import json, statistics, sys
out, pairs = sys.argv[1], int(sys.argv[2])
def runs(kind, v):
    return [json.load(open(f"{out}/{kind}-{v}-{i}.json")) for i in range(1, pairs + 1)]
def table(kind, pick):
    for name, f in pick:
        o = [f(r) for r in runs(kind, "old")]
        n = [f(r) for r in runs(kind, "new")]
        print(f"{name:40s} old {statistics.median(o):>12,.2f}  new {statistics.median(n):>12,.2f}"
              f"  new/old {statistics.median(n) / statistics.median(o):.3f}"
              f"  pairs {[round(b / a, 3) for a, b in zip(o, n)]}")
def phase(name, field="readings_per_sec"):
    return lambda r: next(p[field] for p in r["phases"] if p["name"] == name)
table("bulk", [(n, phase(n)) for n in (
    "http ingest (plain NDJSON)", "http ingest (gzip NDJSON)",
    "http replay (all duplicates)", "native DuckDB read_json (limit)")])
def fleet(conns, field):
    return lambda r: next(p[field] for p in r["phases"]
                          if p["name"] == "fleet" and p["connections"] == conns)
table("fleet", [(f"fleet {c} connections, {f}", fleet(c, f))
                for c in (8, 64, 256) for f in ("requests_per_sec", "p99_ms")])
PY
