#!/usr/bin/env bash
# tallyd side by side with brubeck and a null receiver (lines counted, nothing else: the
# machine's floor), same load generator, same machine, interleaved runs (A B C A B C ...), so
# the noise of a shared host hits all alike. Compare only figures from one run of this script.
#
#   bench/compare.sh KEYS MIX RATES REPEAT [PEERS] [-- extra `tallyd run` args]
#   e.g. bench/compare.sh 100000 counters 1M,2M,3M 2
#        bench/compare.sh 10000 mixed 2M,4M 2 null,brubeck,tallyd -- --config tuned.toml
#
# MIX: counters (c=100), mixed (c=60,cs=10,g=10,ms=20), mixed_sets, or a blast -m string.
# PEERS may name tallyd-edge: tallyd as an edge of the fleet tier, forwarding to an aggregator
# tallyd this script starts once (its CPU is not the edge's), which writes the same ClickHouse.
# PEERS may name tallyd-rules and tallyd-mapped: tallyd with the 20 mapping rules of
# bench/rules-20.toml (none matches the load's names) and bench/rules-20-mapped.toml (the last
# one adds a tag to every name).
# Env: TALLYD (default: target/release/tallyd of this project), CH (a ClickHouse HTTP URL;
# default: a private 18.16 server is started for the run and stopped after), PEERS_DIR (default
# $TMPDIR/peers), BRUBECK_BIN (default $PEERS_DIR/src/brubeck/brubeck).
# Needs brubeck built first (bench/README.md says how). Prints a markdown table: the highest offered
# rate with < 0.1 % loss per daemon, CPU µs per line there, and peak RSS; per-run lines go to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
keys=$1 mix=$2 rates=$3 repeat=$4
peers=${5:-null,brubeck,tallyd}
shift 4; [ $# -gt 0 ] && [ "$1" != "--" ] && shift; [ "${1:-}" = "--" ] && shift
extra="$*"
export PEERS_DIR=${PEERS_DIR:-${TMPDIR:-/tmp}/peers}
TALLYD=$(realpath -m "${TALLYD:-$here/../target/release/tallyd}")
[ -x "$TALLYD" ] || { echo "no tallyd binary at $TALLYD (cargo build --release)" >&2; exit 1; }
ch_pid="" d=""
agg_pid="" agg_dir=""
cleanup() {
  [ -n "$agg_pid" ] && kill "$agg_pid" 2>/dev/null && wait "$agg_pid" 2>/dev/null
  [ -n "$agg_dir" ] && rm -rf "$agg_dir"
  [ -n "$ch_pid" ] && kill "$ch_pid" 2>/dev/null && wait "$ch_pid" 2>/dev/null; [ -n "$d" ] && rm -rf "$d"; true
}
trap cleanup EXIT
. "$here/clickhouse.sh"
if [ -z "${CH:-}" ]; then
  d=$(mktemp -d)
  private_clickhouse "$d"
fi
out=${OUT:-$PEERS_DIR/results/tallyd-$(date +%Y%m%d%H%M%S).jsonl}
mkdir -p "$(dirname "$out")"
curl -sf "$CH" --data-binary "CREATE DATABASE IF NOT EXISTS bench" >/dev/null
cmd="$TALLYD run --statsd-udp 127.0.0.1:{port} --statsd-tcp off --proto-tcp off --proto-udp off --admin off \
 --clickhouse-url $CH --clickhouse-database bench --data-dir {rundir}/data --host-id bench --flush-interval 1s $extra"
verify="curl -s '$CH' --data-binary \"SELECT sum(value) FROM bench.counters FINAL WHERE name LIKE '\${PREFIX}.c.%'\""
more=()  # --peer-cmd NAME=CMD of the peers beyond tallyd
if [[ ",$peers," == *,tallyd-edge,* ]]; then
  agg_dir=$(mktemp -d)
  agg_port=$(free) agg_admin=$(free)
  "$TALLYD" run --statsd-udp off --statsd-tcp off --proto-udp off --admin "127.0.0.1:$agg_admin" --proto-tcp "127.0.0.1:$agg_port" \
    --clickhouse-url "$CH" --clickhouse-database bench --data-dir "$agg_dir/data" --host-id aggregator \
    --flush-interval 1s --log-level warn $extra & agg_pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$agg_port") 2>/dev/null && break; sleep 0.1; done
  more+=(--peer-cmd "tallyd-edge=$cmd --forward-upstreams 127.0.0.1:$agg_port")
fi
for variant in rules mapped; do
  file=$here/rules-20.toml; [ "$variant" = mapped ] && file=$here/rules-20-mapped.toml
  if [[ ",$peers," == *,tallyd-$variant,* ]]; then
    more+=(--peer-cmd "tallyd-$variant=$cmd --config $file")
  fi
done
# A run ends when the stored total stops changing for --settle seconds. tallyd's total moves
# one INSERT at a time, and at 1M keys one INSERT of 1M rows into ClickHouse 18.16 took up to
# 3.5 s on the 2-core machine of the README's tables: the driver's default of 3 s ended runs
# while rows were still being written and counted them lost. 10 s waits out one INSERT; data
# really lost still shows, the run just ends 10 s later. --max-wait caps the wait after the load.
python3 "$here/measure.py" compare --bindir "$PEERS_DIR/bin" --workdir "$PEERS_DIR/runs" --peers "$peers" \
  --settle 10 --max-wait 90 \
  --cmd "$cmd" --verify-cmd "$verify" --peer-version tallyd --port 18725 --flush 1 --unique-prefix \
  --keys "$keys" --mix "$mix" --rates "$rates" --repeat "$repeat" --out "$out" "${more[@]}" >&2
# Each tallyd run preallocates a WAL in its run dir: free the disk.
find "$PEERS_DIR/runs" -mindepth 2 -maxdepth 2 -type d -name data -exec rm -rf {} + 2>/dev/null || true
python3 "$here/measure.py" table --summary "$out"
if [ -n "$agg_pid" ]; then
  # The aggregator's CPU (all of this script's runs) per row it took from the edges.
  ticks=$(awk '{print $14 + $15}' "/proc/$agg_pid/stat")
  rows=$(curl -fsS "127.0.0.1:$agg_admin/metrics" | awk '/^tallyd_received_lines_total\{listener="proto"\}/ {print $2}')
  awk -v t="$ticks" -v r="${rows:-0}" -v hz="$(getconf CLK_TCK)" 'BEGIN {
    if (r > 0) printf "aggregator: %.2f µs of CPU per forwarded row (%d rows, %.1f s)\n", t / hz * 1e6 / r, r, t / hz }'
fi
echo "per-run results: $out"
