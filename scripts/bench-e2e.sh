#!/usr/bin/env bash
# End-to-end throughput: a release tallyd, the project's StatsD load generator
# (bench/blast.c), and ClickHouse; reports lines/s, loss
# (against ClickHouse totals and the kernel's drop counter) and tallyd's CPU
# time per line; and the flush's CPU per row written: the CPU of every thread
# but the UDP receive threads (closing intervals, encoding, the spool, the
# WAL's syncs, sending to ClickHouse) over the rows written; and the peak
# anonymous memory apart from the peak of mapped file pages (the WAL),
# sampled every 0.2 s.
#
#   scripts/bench-e2e.sh CLICKHOUSE_URL BLAST_BINARY [blast options...]
#   e.g. gcc -O2 -o blast bench/blast.c -lm
#        scripts/bench-e2e.sh http://127.0.0.1:8123 ./blast -k 100000 -r 2000000 -d 10
#
# Only loopback. Each run writes to a fresh database named bench_<pid>.
set -euo pipefail
cd "$(dirname "$0")/.."
url=$1; blast=$2; shift 2
db=bench_$$
port=$((20000 + $$ % 10000))
admin=$((port + 1))
dir=$(mktemp -d)
q() { curl -fsS "$url" --data-binary "$1"; }

cargo build --release --locked -q
./target/release/tallyd run --clickhouse-url "$url" --clickhouse-database "$db" \
    --statsd-udp "127.0.0.1:$port" --statsd-tcp "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
    --proto-tcp off --proto-udp off \
    --data-dir "$dir" --log-level warn ${TALLYD_ARGS:-} &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 300); do curl -fsS "127.0.0.1:$admin/health" >/dev/null 2>&1 && break; sleep 0.1; done
# The WAL's segments were just preallocated: write them back before measuring.
sync

cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
udp_cpu() { cat /proc/$pid/task/*/stat 2>/dev/null | awk '/\(tallyd-udp-/ {s += $14 + $15} END {print s + 0}'; }
rows() { curl -fsS "127.0.0.1:$admin/metrics" | awk '/^tallyd_rows_written_total/ {s += $2} END {print s + 0}'; }
cpu0=$(cpu); udp0=$(udp_cpu); rows0=$(rows); mem=$(mktemp)
while kill -0 $pid 2>/dev/null; do
    awk '/^RssAnon|^RssFile/ {print $1, $2}' "/proc/$pid/status" 2>/dev/null; sleep 0.2
done >"$mem" &
sampler=$!
out=$("$blast" -p "$port" -q "$@")
# Until the last interval is written.
last=-1; while [ "$(rows)" != "$last" ]; do last=$(rows); sleep 2; done
cpu1=$(cpu); udp1=$(udp_cpu); rows1=$(rows)
drops=$(curl -fsS "127.0.0.1:$admin/metrics" | awk '/^tallyd_dropped_total\{reason="udp_kernel"\}/ {print $2}')
received=$(curl -fsS "127.0.0.1:$admin/metrics" | awk '/^tallyd_received_lines_total/ {s += $2} END {print s}')
kill $sampler 2>/dev/null || true
peaks=$(awk '{if ($2 > m[$1]) m[$1] = $2} END {printf "peak RssAnon %.0f MiB, peak RssFile (WAL pages) %.0f MiB", m["RssAnon:"]/1024, m["RssFile:"]/1024}' "$mem"); rm -f "$mem"
kill -TERM $pid; wait $pid || true
trap 'rm -rf "$dir"' EXIT

echo "$out"
sent=$(sed -n 's/.* metrics=\([0-9]*\).*/\1/p' <<<"$out")
secs=$(sed -n 's/.* elapsed=\([0-9.]*\).*/\1/p' <<<"$out")
csum=$(sed -n 's/.* counter_sum=\([0-9.]*\).*/\1/p' <<<"$out")
stored=$(q "SELECT sum(value) FROM $db.counters FINAL")
hz=$(getconf CLK_TCK)
awk -v s="$sent" -v r="$received" -v t="$secs" -v c0="$cpu0" -v c1="$cpu1" -v hz="$hz" -v d="$drops" -v cs="$csum" -v st="$stored" \
    -v u="$((udp1 - udp0))" -v rows="$((rows1 - rows0))" 'BEGIN {
  printf "sent=%d lines in %.2fs (%.0f lines/s); received=%d (loss %.4f%%); kernel drops=%d datagrams\n", s, t, s/t, r, 100*(s-r)/s, d;
  printf "counter_sum sent=%s stored=%s; tallyd CPU %.2fs = %.0f ns per line\n", cs, st, (c1-c0)/hz, 1e9*(c1-c0)/hz/s;
  if (rows > 0) printf "rows written=%d; CPU of the threads other than UDP receive %.2fs = %.0f ns per row\n", rows, (c1-c0-u)/hz, 1e9*(c1-c0-u)/hz/rows }'
echo "$peaks"
q "DROP DATABASE $db" >/dev/null
