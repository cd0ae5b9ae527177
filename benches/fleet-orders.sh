#!/usr/bin/env bash
# Issue 23's fleet figures: the same bench client (`NEW`'s `bench --scenario fleet`)
# drives the server of each build in turn (MILEPOST_BENCH_SERVER), alternating, for
#   - each --order (retry, backlog, mix) at 2,000 and 20,000 devices: every run
#     measures the live phase and then the order's phase at 64 connections;
#   - 20 browsers (the seed dashboard's poll plus v1 statistics and a readings page,
#     every second each) beside the live fleet at 64 connections.
# Prints the tables of every run into OUT. Not run by CI (~15 minutes).
#
#   benches/fleet-orders.sh /tmp/milepost-old /tmp/milepost-new [out=/tmp/fleet-orders] [seconds=20]
set -euo pipefail
old=$1 new=$2 out=${3:-/tmp/fleet-orders} secs=${4:-20}
mkdir -p "$out"
common=(--log warn bench --scenario fleet --connections 64 --duration "$secs"
        --new-devices 0 --big-readings 0)
for devices in 2000 20000; do
    for order in retry backlog mix; do
        for v in old new; do
            bin=$old; [ "$v" = new ] && bin=$new
            echo "$order, $devices devices: $v" >&2
            MILEPOST_BENCH_SERVER=$bin "$new" "${common[@]}" --devices "$devices" \
                --order "$order" --json "$out/$order-$devices-$v.json" \
                2>/dev/null | tee "$out/$order-$devices-$v.txt" | grep -E '^fleet'
        done
    done
done
for v in old new; do
    bin=$old; [ "$v" = new ] && bin=$new
    echo "readers beside the live fleet: $v" >&2
    MILEPOST_BENCH_SERVER=$bin "$new" "${common[@]}" --readers 20 --reader-interval 1 \
        --json "$out/readers-$v.json" 2>/dev/null | tee "$out/readers-$v.txt" | grep -vE '^(milepost|phase|restart)'
done
