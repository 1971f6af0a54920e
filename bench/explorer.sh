#!/usr/bin/env bash
# What the explorer costs, against a release tallyd and a private ClickHouse (Debian's 18.16):
#   first render   bytes the page downloads for a grouped counter chart (gzip, as browsers ask)
#   30-day query   /api/series latency over 30 days of a metric written at 1 M raw rows a day
#                  (12 series at 1 s), and of a wide one of 1 M hour-rollup rows a day
#                  (41,667 series), each plain and grouped by a tag (top 5 + other)
#   live refresh   CPU of tallyd and of ClickHouse per minute while one page in live mode
#                  refreshes a 15-minute chart every flush (1 s), against an idle minute
# The rows are written into the tables with INSERT … SELECT (raw rows for the last 2 days,
# minute rollups for 2 days, hour rollups for 30), as tallyd and its rollups would have.
#
#   bench/explorer.sh [REPEAT]
#
# Env: TALLYD (default: target/release/tallyd of this project), CH (a ClickHouse HTTP URL;
# default: a private 18.16 server for the run). Needs curl, python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repeat=${1:-5}
TALLYD=$(realpath -m "${TALLYD:-$here/../target/release/tallyd}")
[ -x "$TALLYD" ] || { echo "no tallyd binary at $TALLYD (cargo build --release)" >&2; exit 1; }
d=$(mktemp -d) ch_pid="" pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [ -n "$ch_pid" ] && kill "$ch_pid" 2>/dev/null && wait "$ch_pid" 2>/dev/null
  rm -rf "$d"; true
}
trap cleanup EXIT
. "$here/clickhouse.sh"
[ -n "${CH:-}" ] || private_clickhouse "$d"
q() { curl -sf "$CH" --data-binary "$1"; }

admin=$(free) db=bench_explorer_$$
"$TALLYD" run --statsd-udp off --statsd-tcp off --proto-udp off --proto-tcp off --otlp-http off \
  --otlp-grpc off --admin "127.0.0.1:$admin" --clickhouse-url "$CH" --clickhouse-database "$db" \
  --data-dir "$d/data" --host-id bench --wal-size 64MiB --log-level warn &
pid=$!
A=http://127.0.0.1:$admin
for _ in $(seq 300); do curl -sf "$A/health" >/dev/null && q "EXISTS TABLE $db.tallyd_rollups" | grep -q 1 && break; sleep 0.1; done

now=$(date +%s)
hour=$((now - now % 3600))
echo "writing the rows (30 days of hours, 2 days of minutes and raw rows) ..."
# narrow: 12 series at 1 s, 1 M raw rows a day.
q "INSERT INTO $db.counters (ts, name, tags, host, flush_id, value, samples)
   SELECT toDateTime($now - 2 * 86400 + intDiv(number, 12)), 'narrow.requests', ['path:/p' || toString(number % 12)],
          'bench', intDiv(number, 12), 1 + number % 7, 1 + number % 7 FROM numbers(12 * 2 * 86400)"
q "INSERT INTO $db.counters_1m (ts, name, tags, host, writer, version, value, samples)
   SELECT toStartOfMinute(toDateTime($now - 2 * 86400)) + 60 * intDiv(number, 12), 'narrow.requests',
          ['path:/p' || toString(number % 12)], 'bench', 1, 1, 240, 240 FROM numbers(12 * 2 * 1440)"
q "INSERT INTO $db.counters_1h (ts, name, tags, host, writer, version, value, samples)
   SELECT toDateTime($hour - 30 * 86400 + 3600 * intDiv(number, 12)), 'narrow.requests',
          ['path:/p' || toString(number % 12)], 'bench', 1, 1, 14400, 14400 FROM numbers(12 * 30 * 24)"
# wide: 41,667 series, 1 M hour-rollup rows a day.
q "INSERT INTO $db.counters_1h (ts, name, tags, host, writer, version, value, samples)
   SELECT toDateTime($hour - 30 * 86400 + 3600 * intDiv(number, 41667)), 'wide.requests',
          ['path:/p' || toString(number % 41667), 'region:r' || toString(number % 9)], 'bench', 1, 1,
          1 + number % 5, 1 + number % 5 FROM numbers(41667 * 30 * 24)"
q "OPTIMIZE TABLE $db.counters_1h FINAL" >/dev/null || true

get() { curl -s -H 'Accept-Encoding: gzip' -o /dev/null -w '%{size_download} %{time_total}\n' "$A$1"; }
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

echo
echo "first render of /?name=narrow.requests&type=counter&range=15m&group=path&top=5 (bytes, gzip):"
total=0
for p in / /assets/app.js /assets/app.css /api/status \
  "/api/series?name=narrow.requests&type=counter&range=15m&group=path&top=5" \
  "/api/events?range=15m&limit=100"; do
  b=$(get "$p" | cut -d' ' -f1)
  printf '  %8d  %s\n' "$b" "$p"
  total=$((total + b))
done
printf '  %8d  in all\n' "$total"

echo
echo "/api/series over 30 days (hour rollups), median of $repeat, seconds (bytes):"
for p in "name=narrow.requests&range=30d" "name=narrow.requests&range=30d&group=path&top=5" \
  "name=wide.requests&range=30d" "name=wide.requests&range=30d&group=region&top=5"; do
  for _ in $(seq "$repeat"); do get "/api/series?$p"; done >"$d/t"
  printf '  %8s s  (%s B)  %s\n' "$(cut -d' ' -f2 "$d/t" | median)" "$(head -n1 "$d/t" | cut -d' ' -f1)" "$p"
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
ch_p=${ch_pid:-$(pgrep -f clickhouse-server | head -n1)}
minute() { # $1: refresh or idle
  local t0 c0 e
  t0=$(cpu "$pid") c0=$(cpu "$ch_p")
  for _ in $(seq 60); do
    if [ "$1" = refresh ]; then
      get "/api/series?name=narrow.requests&type=counter&range=15m&group=path&top=5" >/dev/null
      get "/api/events?range=15m&limit=100" >/dev/null
    fi
    sleep 1
  done
  e="$(( $(cpu "$pid") - t0 )) $(( $(cpu "$ch_p") - c0 ))"
  echo "$e"
}
echo
echo "a page in live mode, refreshing a grouped 15-minute chart every second (CPU s per minute):"
read -r ti ci <<<"$(minute idle)"
read -r tr cr <<<"$(minute refresh)"
awk -v ti="$ti" -v ci="$ci" -v tr="$tr" -v cr="$cr" -v hz="$tick" 'BEGIN {
  printf "  tallyd      %.2f refreshing, %.2f idle\n  ClickHouse  %.2f refreshing, %.2f idle\n", tr/hz, ti/hz, cr/hz, ci/hz }'
