#!/usr/bin/env bash
# Issue 23's "however many devices appear" figures for one build: a burst of DEVICES
# new devices (one request each, 64 connections) and the bench's clean restart, with
# the whole-life peak RSS (VmHWM) of every server; then, on the data directory it
# leaves: a restart after SIGKILL (recompute of the series, rollup recovery),
# `GET /api/v1/devices` and the console overview (time, bytes, peak), and `milepost
# dump` of the day in each format (time, peak). Not run by CI (~5 minutes for a
# million devices, ~8 for two).
#
#   benches/devices-at-scale.sh BINARY [devices=1000000] [work=/var/tmp/mp-devices]
# A small VM's settings through the environment, e.g. MEMORY_LIMIT=64MB (DuckDB's,
# default 128MB) MILEPOST_SERIES_MEMORY=16MiB MILEPOST_LIVE_SLOTS_MEMORY=16MiB.
set -euo pipefail
bin=$1 devices=${2:-1000000} work=${3:-/var/tmp/mp-devices} limit=${MEMORY_LIMIT:-128MB}
export MALLOC_ARENA_MAX=4 MILEPOST_MAX_DEVICES=0 MILEPOST_MAX_NEW_DEVICES_PER_KEY=0
rm -rf "$work" && mkdir -p "$work"
data=$work/fleet
port=18190

peaks() { # samples VmHWM of every `milepost … serve` into $1 until killed
    while true; do
        for p in $(pgrep -f 'milepost.* serve'); do
            awk -v p="$p" '/VmHWM/ {print p, $2}' "/proc/$p/status" 2>/dev/null || true
        done
        sleep 0.5
    done >"$1"
}
peaks "$work/hwm" &
sampler=$!
MILEPOST_BENCH_SERVER=$bin "$bin" --log warn bench --scenario fleet --devices 0 \
    --new-devices "$devices" --duration 5 --connections 64 --big-readings 0 \
    --victoria-metrics off --work-dir "$work" --memory-limit "$limit" 2>/dev/null | grep -E 'first contact|ready in'
kill "$sampler"
echo "whole-life peak per server (MiB):"
sort -k2 -n "$work/hwm" | awk '{m[$1] = $2} END {for (p in m) printf "  %.0f\n", m[p] / 1024}'

serve() { # starts a server on $data; sets $pid once it is ready
    "$bin" --log warn serve --data-dir "$data" --memory-limit "$limit" --listen "127.0.0.1:$port" \
        --backend-addr "127.0.0.1:$((port + 1))" >>"$work/serve.log" 2>&1 &
    pid=$!
    local started=$SECONDS
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "server exited; see $work/serve.log"; exit 1; }
        sleep 0.2
    done
    echo "ready in $((SECONDS - started)) s, peak $(awk '/VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$pid/status")"
}
serve
kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
echo -n "after SIGKILL: "; serve
for page in /api/v1/devices /; do
    curl -s -o /dev/null -w "GET $page: %{time_total} s, %{size_download} bytes, " \
        "http://127.0.0.1:$port$page"
    awk '/VmHWM/ {printf "server peak %.0f MiB\n", $2 / 1024}' "/proc/$pid/status"
done
kill -TERM "$pid"; wait "$pid" || true
day=$(date -u +%F)
for format in json parquet; do
    /usr/bin/time -f "dump $day as $format: %e s, peak %M KB" \
        "$bin" --log warn dump --data-dir "$data" --memory-limit "$limit" --date "$day" --dump-format "$format" \
        2>&1 >/dev/null | tail -1
done
