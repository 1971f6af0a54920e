#!/usr/bin/env bash
# tallyd's ingest paths side by side, in one interleaved run of one release tallyd (A B C D A B
# C D ...), its CPU (user + system, all threads) per unit of each:
#   statsd-udp  StatsD datagrams of one counter line each, blast at RATE datagrams/s
#   proto-udp   protobuf Batches of one counter event each (blast -F proto), at RATE
#   statsd-tcp  StatsD counter lines over TCP, the same samples as the OTLP points below
#   statsd-tls  the same lines over TCP with TLS (Python's ssl, TLS 1.3), to a second tallyd
#               whose StatsD TCP listener speaks TLS (tls.listeners; a certificate made here)
#   otlp-http   OTLP/HTTP export requests of POINTS delta Sum points each (bench/otlp_corpus.py)
# and, for the UDP paths, how many of the datagrams sent arrived. Compare only figures of one run.
#
#   bench/ingest.sh RATE SECONDS REPEAT [REQUESTS POINTS KEYS]
#   e.g. bench/ingest.sh 300000 5 3 200 1000 10000
#
# Env: TALLYD (default: target/release/tallyd of this project), CH (a ClickHouse HTTP URL;
# default: a private 18.16 server for the run), PEERS_DIR (where blast is built, as for
# compare.sh; default $TMPDIR/peers). Needs python3 with opentelemetry-proto (the OpenTelemetry
# SDK's), gcc, curl, openssl.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rate=$1 secs=$2 repeat=$3 requests=${4:-200} points=${5:-1000} keys=${6:-10000}
export PEERS_DIR=${PEERS_DIR:-${TMPDIR:-/tmp}/peers}
TALLYD=$(realpath -m "${TALLYD:-$here/../target/release/tallyd}")
[ -x "$TALLYD" ] || { echo "no tallyd binary at $TALLYD (cargo build --release)" >&2; exit 1; }
d=$(mktemp -d) ch_pid="" pid="" tls_pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [ -n "$tls_pid" ] && kill "$tls_pid" 2>/dev/null && wait "$tls_pid" 2>/dev/null
  [ -n "$ch_pid" ] && kill "$ch_pid" 2>/dev/null && wait "$ch_pid" 2>/dev/null
  rm -rf "$d"; true
}
trap cleanup EXIT
. "$here/clickhouse.sh"
[ -n "${CH:-}" ] || private_clickhouse "$d"
mkdir -p "$PEERS_DIR/bin"
blast=$PEERS_DIR/bin/blast
if [ ! -x "$blast" ] || [ "$here/blast.c" -nt "$blast" ]; then gcc -O2 -o "$blast" "$here/blast.c" -lm; fi

udp=$(free) pudp=$(free) tcp=$(free) otlp=$(free) admin=$(free) db=bench_ingest_$$
"$TALLYD" run --statsd-udp "127.0.0.1:$udp" --statsd-tcp "127.0.0.1:$tcp" --proto-udp "127.0.0.1:$pudp" \
  --proto-tcp off --otlp-http "127.0.0.1:$otlp" --otlp-grpc off --admin "127.0.0.1:$admin" \
  --clickhouse-url "$CH" --clickhouse-database "$db" --data-dir "$d/data" --host-id bench \
  --log-level warn & pid=$!
# The TLS peer: the same binary, its StatsD TCP listener over TLS.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/tls.key" -out "$d/tls.crt" -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null
printf '[tls]\nlisteners = ["statsd_tcp"]\ncert_file = "%s"\nkey_file = "%s"\n' "$d/tls.crt" "$d/tls.key" >"$d/tls.toml"
tls_tcp=$(free) tls_admin=$(free)
"$TALLYD" run --config "$d/tls.toml" --statsd-udp off --statsd-tcp "127.0.0.1:$tls_tcp" --proto-udp off \
  --proto-tcp off --otlp-http off --otlp-grpc off --admin "127.0.0.1:$tls_admin" \
  --clickhouse-url "$CH" --clickhouse-database "$db" --data-dir "$d/data-tls" --host-id bench-tls \
  --log-level warn & tls_pid=$!
for a in "$admin" "$tls_admin"; do
  for _ in $(seq 300); do curl -fsS "127.0.0.1:$a/health" >/dev/null 2>&1 && break; sleep 0.1; done
done
ticks() { awk '{ print $14 + $15 }' "/proc/${1:-$pid}/stat"; }
metric() { curl -fsS "127.0.0.1:$admin/metrics" | awk -v m="$1" 'index($0, m " ") == 1 { print $2 }'; }
hz=$(getconf CLK_TCK)
# Every protobuf datagram that arrived, by its answer (ok, duplicate, rejected, overloaded).
proto_answered() {
  curl -fsS "127.0.0.1:$admin/metrics" | awk '/^tallyd_proto_batches_total/ { n += $2 } END { print n + 0 }'
}
n=$((rate * secs))

# One phase: its load, then 2 s for the flush; prints "path units cpu_us_per_unit arrived%".
# The TCP and OTLP phases of run R send the samples of $d/corpus-R.
phase() {
  local path=$1 t0 t1 before after arrived="" corpus=$d/corpus-$2 of=$pid
  [ "$path" = statsd-tls ] && of=$tls_pid
  t0=$(ticks "$of")
  case $path in
    statsd-udp)
      before=$(metric 'tallyd_received_blocks_total{listener="udp"}')
      "$blast" -p "$udp" -n "$n" -r "$rate" -s 30 -k "$keys" -q >/dev/null ;;
    proto-udp)
      before=$(proto_answered)
      # A client id of its own each run (blast-R): its sequences start at 1.
      "$blast" -F proto -S "$2" -p "$pudp" -n "$n" -r "$rate" -k "$keys" -q >/dev/null ;;
    statsd-tcp)
      python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1",int(sys.argv[1]))); s.sendall(open(sys.argv[2],"rb").read()); s.close()' \
        "$tcp" "$corpus/statsd.txt" ;;
    statsd-tls)
      python3 - "$tls_tcp" "$corpus/statsd.txt" "$d/tls.crt" <<'PY'
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="127.0.0.1")
s.sendall(open(sys.argv[2], "rb").read())
s.settimeout(5)
try:
    s.unwrap()  # close_notify: the stream ends as TLS says
except (ssl.SSLError, OSError):
    pass
s.close()
PY
      ;;
    otlp-http)
      python3 - "$otlp" "$corpus" "$requests" <<'PY'
import concurrent.futures, http.client, struct, sys, time
port, corpus, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
TIME, START, now = 0x1122334455000000, 0x0A0B0C0D0E000000, time.time_ns()
bodies = []
for i in range(n):
    # Request i's points are at now + i µs (a series' points in order), as
    # an exporter's are at the time it sends them.
    b = open("%s/otlp-%d.pb" % (corpus, i), "rb").read()
    b = b.replace(struct.pack("<Q", TIME + i), struct.pack("<Q", now + i * 1000))
    b = b.replace(struct.pack("<Q", START + i), struct.pack("<Q", now + i * 1000 - 10**9))
    bodies.append(b)
def post(i):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", "/v1/metrics", bodies[i], {"Content-Type": "application/x-protobuf"})
    r = c.getresponse()
    assert r.status == 200 and not r.read(), "refused points"
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    list(ex.map(post, range(n)))
PY
      ;;
  esac
  sleep 2
  t1=$(ticks "$of")
  local units=$n
  case $path in
    statsd-udp) after=$(metric 'tallyd_received_blocks_total{listener="udp"}') ;;
    proto-udp) after=$(proto_answered) ;;
    *) units=$((requests * points)) ;;
  esac
  [ -n "${before:-}" ] && arrived=$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN { printf "%.2f", (a - b) * 100 / n }')
  # The 2 s wait's idle CPU is counted too, alike for every path.
  awk -v p="$path" -v u="$units" -v t=$((t1 - t0)) -v hz="$hz" -v a="$arrived" \
    'BEGIN { printf "%s %d %.3f %s\n", p, u, t / hz * 1e6 / u, a }'
}

results=$d/results
for r in $(seq "$repeat"); do
  mkdir -p "$d/corpus-$r"
  python3 "$here/otlp_corpus.py" "$d/corpus-$r" "$requests" "$points" "$keys" "$r"
  for path in statsd-udp proto-udp statsd-tcp statsd-tls otlp-http; do
    phase "$path" "$r" | tee -a "$results" >&2
  done
done
# Every line and point is in ClickHouse, once (the UDP paths' arrivals are counted above).
want=$((3 * repeat * requests * points))
for _ in $(seq 60); do
  got=$(curl -fsS "$CH" --data-binary "SELECT sum(value) FROM $db.counters FINAL WHERE name LIKE 'otlp.bench.%'")
  [ "$got" = "$want" ] && break; sleep 1
done
[ "$got" = "$want" ] || { echo "stored $got of $want StatsD TCP (plain and TLS) lines and OTLP points" >&2; exit 1; }
curl -fsS "$CH" --data-binary "DROP DATABASE $db" >/dev/null
python3 - "$results" "$rate" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    p, units, us, *arrived = line.split()
    rows.setdefault(p, []).append((float(us), float(arrived[0]) if arrived else None))
med = {p: statistics.median(u for u, _ in v) for p, v in rows.items()}
print("| path | CPU µs per unit (median) | units per core-second | arrived (min) |")
print("|---|---|---|---|")
for p, v in rows.items():
    arr = [a for _, a in v if a is not None]
    print("| %s | %.3f | %.0f | %s |" % (p, med[p], 1e6 / med[p], "%.2f %%" % min(arr) if arr else "all (acked or TCP)"))
print()
print("proto-udp / statsd-udp CPU per datagram: %.2fx; otlp-http point / statsd-tcp line: %.2fx; statsd-tls / statsd-tcp line: %.2fx (offered %s datagrams/s)"
      % (med["proto-udp"] / med["statsd-udp"], med["otlp-http"] / med["statsd-tcp"], med["statsd-tls"] / med["statsd-tcp"], sys.argv[2]))
PY
