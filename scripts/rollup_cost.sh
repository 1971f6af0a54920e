#!/bin/bash
# What rollups cost and save, with a real tallyd and a private ClickHouse:
#   - bytes on disk per key per day, raw and per minute (merged parts);
#   - rows a series query reads per day of range, raw and per hour
#     (system.query_log's read_rows, one series among KEYS);
#   - the CPU of the rollup statements in ClickHouse (query_log's
#     OSCPUVirtualTimeMicroseconds) against that of tallyd's inserts, and
#     tallyd's own CPU per minute (and a BASELINE tallyd's, without rollups,
#     under the same load, when given).
#
#   PEERS_DIR=DIR scripts/rollup_cost.sh [KEYS] [SECONDS] [RATE]
#   e.g. PEERS_DIR=/tmp/peers scripts/rollup_cost.sh 100000 240 300000
#   BASELINE=path/to/an/older/tallyd to compare tallyd's CPU.
#
# PEERS_DIR holds bin/blast (see bench/README.md). Needs clickhouse-server
# (Debian's 18.16 or newer), python3 and a release build (built here).
set -euo pipefail
keys=${1:-100000}
secs=${2:-240}
rate=${3:-300000}
peers=${PEERS_DIR:?set PEERS_DIR (see bench/README.md)}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/tallyd-rollup-cost.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ch_port=$(port)
cat >"$work/ch.xml" <<XML
<yandex><logger><console>1</console><level>warning</level></logger><listen_host>127.0.0.1</listen_host>
<http_port>$ch_port</http_port><tcp_port>0</tcp_port><path>$work/ch/</path><mark_cache_size>536870912</mark_cache_size>
<query_log><database>system</database><table>query_log</table><flush_interval_milliseconds>1000</flush_interval_milliseconds></query_log>
<users_config>$work/ch.xml</users_config><profiles><default><log_queries>1</log_queries></default></profiles>
<users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
<quotas><default/></quotas></yandex>
XML
clickhouse-server --config-file="$work/ch.xml" >"$work/ch.log" 2>&1 &
q() {
    local out
    out=$(curl -s -w '\n%{http_code}' "http://127.0.0.1:$ch_port/" --data-binary "$1")
    [ "${out##*$'\n'}" = 200 ] || { echo "rollup_cost.sh: $1: ${out%$'\n'*}" >&2; return 1; }
    printf '%s' "${out%$'\n'*}"
}
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$ch_port/ping" >/dev/null && break; sleep 0.1; done
(cd "$here" && cargo build --release -q)

# One life of a tallyd binary under the load: prints its CPU seconds.
life() {
    local bin=$1 db=$2 udp admin pid
    udp=$(port); admin=$(port)
    "$bin" run --data-dir "$work/data-$db" --host-id cost-host \
        --clickhouse-url "http://127.0.0.1:$ch_port" --clickhouse-database "$db" \
        --statsd-udp "127.0.0.1:$udp" --statsd-tcp off --proto-tcp off --proto-udp off \
        --admin "127.0.0.1:$admin" >"$work/$db.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/health" >/dev/null && break; sleep 0.1; done
    "$peers/bin/blast" -q -p "$udp" -k "$keys" -r "$rate" -d "$secs" >/dev/null
    # A minute more: the last minute's rollup.
    sleep 80
    local ticks
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$ticks $(getconf CLK_TCK)" | awk '{printf "%.1f", $1 / $2}'
}

cpu=$(life "$here/target/release/tallyd" cost)
echo "tallyd: $cpu s of CPU for ${secs} s of load and 80 s after (keys $keys, $rate lines/s)"
if [ -n "${BASELINE:-}" ]; then
    base=$(life "$BASELINE" base)
    echo "baseline tallyd ($BASELINE): $base s of CPU under the same load"
fi
q "SYSTEM FLUSH LOGS" >/dev/null
q "OPTIMIZE TABLE cost.counters FINAL" >/dev/null
q "OPTIMIZE TABLE cost.counters_1m FINAL" >/dev/null
python3 - "$ch_port" "$keys" <<'PY'
import sys, urllib.request
port, keys = sys.argv[1], int(sys.argv[2])
def q(sql):
    return urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", data=sql.encode())).read().decode().strip()
def size(table):
    b, r = q(f"SELECT sum(bytes_on_disk), sum(rows) FROM system.parts WHERE database = 'cost' AND table = '{table}' AND active").split()
    return int(b), int(r)
raw_b, raw_r = size("counters")
m_b, m_r = size("counters_1m")
secs = int(q("SELECT uniqExact(ts) FROM cost.counters"))
mins = int(q("SELECT uniqExact(ts) FROM cost.counters_1m"))
series = int(q("SELECT uniqExact(name) FROM cost.counters"))
print(f"raw: {raw_r} rows, {raw_b / raw_r:.2f} B/row; {raw_b / series / secs * 86400:,.0f} B per key per day")
print(f"minute: {m_r} rows, {m_b / m_r:.2f} B/row; {m_b / series / mins * 1440:,.0f} B per key per day")
print(f"hour (24 rows of the minute's size a day): {m_b / m_r * 24:,.0f} B per key per day")
cpu = "ProfileEvents.Values[indexOf(ProfileEvents.Names, 'OSCPUVirtualTimeMicroseconds')]"
roll = q(f"SELECT count(), sum({cpu}) / 1e6, sum(query_duration_ms) / 1e3, sum(read_rows) FROM system.query_log WHERE type = 2 AND query LIKE 'INSERT INTO `cost`.%\\_1m%' ")
ins = q(f"SELECT count(), sum({cpu}) / 1e6, sum(query_duration_ms) / 1e3 FROM system.query_log WHERE type = 2 AND query LIKE 'INSERT INTO `cost`.counters %FORMAT RowBinary%'")
n, c, d, rr = roll.split()
print(f"ClickHouse, minute rollups: {n} statements over {mins} minutes, {float(c):.2f} s CPU, {float(d):.2f} s wall, {int(rr):,} rows read")
n2, c2, d2 = ins.split()
print(f"ClickHouse, tallyd's counter inserts: {n2} INSERTs, {float(c2):.2f} s CPU, {float(d2):.2f} s wall")
# Rows a one-series query reads: raw rows over the run (per minute, as
# they are sorted by minute first, scaled to 30 days), minutes (per hour),
# and hours over 30 days of 10,000 series made in SQL.
mins_raw = int(q("SELECT uniqExact(toStartOfMinute(ts)) FROM cost.counters"))
name = q("SELECT any(name) FROM cost.counters")
q(f"SELECT sum(value) FROM (SELECT * FROM cost.counters FINAL WHERE toStartOfMinute(ts) >= toDateTime(0) AND name = '{name}')")
q(f"SELECT ts, sum(value) FROM cost.counters_1m FINAL WHERE name = '{name}' AND ts >= toDateTime(0) GROUP BY ts")
q("CREATE TABLE cost.hours30 AS cost.counters_1h")
q("INSERT INTO cost.hours30 SELECT toDateTime(1700000000 - 1700000000 % 3600 + intDiv(number, 10000) * 3600), concat('bench.', toString(number % 10000)), [], 'cost-host', 1, 1, 1, 1 FROM numbers(7200000)")
q("OPTIMIZE TABLE cost.hours30 FINAL")
q("SELECT ts, sum(value) FROM cost.hours30 FINAL WHERE name = 'bench.42' GROUP BY ts")
q("SYSTEM FLUSH LOGS")
def read(like):
    return int(q(f"SELECT read_rows FROM system.query_log WHERE type = 2 AND query LIKE '{like}' AND query NOT LIKE '%query_log%' ORDER BY event_time DESC LIMIT 1"))
raw = read("SELECT sum(value) FROM (SELECT * FROM cost.counters FINAL%")
minute = read("SELECT ts, sum(value) FROM cost.counters_1m FINAL%")
hour = read("SELECT ts, sum(value) FROM cost.hours30 FINAL%")
print(f"one series, raw: {raw:,} rows read for {mins_raw} minutes: {raw * 1440 * 30 // mins_raw:,} for 30 days")
# Minutes are sorted by hour first: a series reads about the same per hour.
hours = int(q("SELECT uniqExact(toStartOfHour(ts)) FROM cost.counters_1m"))
print(f"one series, minutes: {minute:,} rows read for {hours} hour(s): {minute * 720 // hours:,} for 30 days")
print(f"one series, hours: {hour:,} rows read for 30 days (10,000 series)")
PY
