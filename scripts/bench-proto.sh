#!/usr/bin/env bash
# End-to-end protobuf throughput: acknowledged events per second through a
# release tallyd into ClickHouse, over C parallel TCP connections (one
# `tallyd send` process each), with a given WAL sync mode, and the daemon's
# CPU time per event (user + system, all threads, over the load). Checks the
# total in ClickHouse.
#
#   scripts/bench-proto.sh CLICKHOUSE_URL SYNC CONNECTIONS EVENTS_PER_CONNECTION [BATCH]
#   e.g. scripts/bench-proto.sh http://127.0.0.1:8123 interval 16 200000 5000
set -euo pipefail
cd "$(dirname "$0")/.."
url=$1; sync_mode=$2; conns=$3; per=$4; batch=${5:-5000}
db=benchproto_$$
port=$((30000 + $$ % 10000))
dir=$(mktemp -d)
q() { curl -fsS "$url" --data-binary "$1"; }

cargo build --release --locked -q
./target/release/tallyd run --clickhouse-url "$url" --clickhouse-database "$db" \
    --statsd-udp off --statsd-tcp off --proto-udp off --proto-tcp "127.0.0.1:$port" \
    --admin "127.0.0.1:$((port + 1))" --data-dir "$dir/data" --wal-sync "$sync_mode" --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 300); do curl -fsS "127.0.0.1:$((port + 1))/health" >/dev/null 2>&1 && break; sleep 0.1; done
sync
cpu() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }

# 1,000 keys, one counter increment per line.
awk -v n="$per" 'BEGIN { for (i = 0; i < n; i++) printf "proto.bench.k%03d:1|c|#env:bench\n", i % 1000 }' >"$dir/lines"
start=$(date +%s.%N)
cpu0=$(cpu)
for c in $(seq "$conns"); do
    ./target/release/tallyd send --proto "127.0.0.1:$port" --client-id "bench-$c" --batch-size "$batch" <"$dir/lines" 2>/dev/null &
done
wait $(jobs -p | grep -v "^$pid\$")
end=$(date +%s.%N)
cpu1=$(cpu)
kill -TERM $pid; wait $pid || true
trap 'rm -rf "$dir"' EXIT
total=$((conns * per))
stored=$(q "SELECT sum(value) FROM $db.counters FINAL")
awk -v t="$total" -v s="$start" -v e="$end" -v st="$stored" -v c="$conns" -v m="$sync_mode" -v b="$batch" \
    -v cpu=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {
  printf "sync=%s connections=%d batch=%d: %d events acknowledged in %.2fs = %.0f events/s, tallyd CPU %.3f us/event; stored %s\n",
    m, c, b, t, e - s, t / (e - s), cpu / hz / t * 1e6, st }'
q "DROP DATABASE $db" >/dev/null
