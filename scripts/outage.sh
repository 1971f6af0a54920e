#!/usr/bin/env bash
# A long ClickHouse outage under load, with kill -9s of tallyd during it:
# the ClickHouse totals must equal what tallyd received, exactly.
#
#   scripts/outage.sh BLAST [MINUTES] [RATE] [KEYS] [KILLS]
#   e.g. gcc -O2 -o blast bench/blast.c -lm
#        cargo deb   # or: cargo build --release, and TALLYD=target/release/tallyd
#        scripts/outage.sh ./blast 10 1000000 100000 3
#
# 1. A private ClickHouse (Debian's clickhouse-server) and a release tallyd
#    with the default config (1 GiB WAL, 1 GiB spool, 1 s intervals).
# 2. ClickHouse is stopped. For MINUTES, BLAST sends RATE counter lines/s
#    over KEYS keys, in KILLS+1 equal parts; after each part the script waits
#    until tallyd has received what it will receive, notes it, and (but
#    after the last) kills tallyd with SIGKILL and starts it again.
# 3. ClickHouse comes back while one more part is sent (live ingest during
#    the drain); the script waits until tallyd's backlog is empty.
# 4. tallyd is stopped; the counter total in ClickHouse is compared with the
#    lines tallyd received. Prints the drain time, the peak spool size, the
#    peak RSS and tallyd's drop counters.
set -euo pipefail
cd "$(dirname "$0")/.."
blast=${1:?usage: scripts/outage.sh BLAST [MINUTES] [RATE] [KEYS] [KILLS]}
minutes=${2:-10} rate=${3:-1000000} keys=${4:-100000} kills=${5:-3}
tallyd=${TALLYD:-target/deb/tallyd}
[ -x "$tallyd" ] || { echo "outage.sh: no $tallyd (cargo deb, or set TALLYD)" >&2; exit 1; }

dir=$(mktemp -d)
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ch_port=$(free_port) udp_port=$(free_port) admin_port=$(free_port)
ch_pid="" t_pid=""
cleanup() {
    [ -n "$t_pid" ] && kill -9 "$t_pid" 2>/dev/null
    [ -n "$ch_pid" ] && kill "$ch_pid" 2>/dev/null && wait "$ch_pid" 2>/dev/null
    rm -rf "$dir"
    true
}
trap cleanup EXIT

cat >"$dir/ch.xml" <<XML
<yandex><logger><console>1</console><level>warning</level></logger><listen_host>127.0.0.1</listen_host>
<http_port>$ch_port</http_port><tcp_port>0</tcp_port><path>$dir/ch/</path><mark_cache_size>536870912</mark_cache_size>
<users_config>$dir/ch.xml</users_config><profiles><default/></profiles>
<users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
<quotas><default/></quotas></yandex>
XML
ch_url=http://127.0.0.1:$ch_port
start_ch() {
    /usr/sbin/clickhouse-server --config-file="$dir/ch.xml" >>"$dir/ch.log" 2>&1 &
    ch_pid=$!
    for _ in $(seq 200); do curl -sf "$ch_url/ping" >/dev/null && return; sleep 0.1; done
    echo "outage.sh: ClickHouse did not start" >&2; exit 1
}
stop_ch() { kill "$ch_pid"; wait "$ch_pid" 2>/dev/null || true; ch_pid=""; }
metric() { # sum of a metric's samples, 0 when tallyd does not answer
    curl -sf "http://127.0.0.1:$admin_port/metrics" 2>/dev/null |
        awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}
start_tallyd() {
    "$tallyd" run --statsd-udp "127.0.0.1:$udp_port" --statsd-tcp off --proto-tcp off --proto-udp off \
        --admin "127.0.0.1:$admin_port" --clickhouse-url "$ch_url" --clickhouse-database outage \
        --data-dir "$dir/data" --host-id outage --flush-interval 1s 2>>"$dir/tallyd.log" &
    t_pid=$!
    for _ in $(seq 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/health")" = 200 ] && return
        sleep 0.1
    done
    echo "outage.sh: tallyd did not become healthy" >&2; tail "$dir/tallyd.log" >&2; exit 1
}
# Peaks: VmHWM (all resident pages, WAL file pages included), RssAnon
# (sampled each second: tallyd's own memory) and RssFile (mapped file pages:
# the WAL's, which the kernel can write back and drop).
peak_rss_kb=0 peak_anon_kb=0 peak_file_kb=0 peak_spool=0
watch_peaks() {
    local rss anon file spool
    rss=$(awk '/VmHWM/ { print $2 }' "/proc/$t_pid/status" 2>/dev/null || echo 0)
    anon=$(awk '/RssAnon/ { print $2 }' "/proc/$t_pid/status" 2>/dev/null || echo 0)
    file=$(awk '/RssFile/ { print $2 }' "/proc/$t_pid/status" 2>/dev/null || echo 0)
    spool=$(metric tallyd_spool_bytes)
    [ "${rss:-0}" -gt "$peak_rss_kb" ] && peak_rss_kb=$rss
    [ "${anon:-0}" -gt "$peak_anon_kb" ] && peak_anon_kb=$anon
    [ "${file:-0}" -gt "$peak_file_kb" ] && peak_file_kb=$file
    [ "${spool:-0}" -gt "$peak_spool" ] && peak_spool=$spool
    true
}
# Sends one part and waits until tallyd's received count stops moving; sets
# `now_received` to that count (this life of tallyd's).
received=0 sent=0 now_received=0
send_part() {
    local seconds=$1 out last=-1
    out=$("$blast" -p "$udp_port" -k "$keys" -m c=100 -r "$rate" -n $((rate * seconds)) -P outage -q)
    sent=$((sent + $(sed -n 's/.*counter_sum=\([0-9]*\).*/\1/p' <<<"$out")))
    while :; do
        sleep 1
        watch_peaks
        now_received=$(metric tallyd_received_lines_total)
        [ "$now_received" = "$last" ] && break
        last=$now_received
    done
}

start_ch
curl -sf "$ch_url" --data-binary "CREATE DATABASE outage" >/dev/null
start_tallyd
stop_ch
part=$((minutes * 60 / (kills + 1)))
echo "outage.sh: ClickHouse down; $minutes min at $rate lines/s over $keys keys, $kills kill -9"
for i in $(seq 0 "$kills"); do
    # A fresh tallyd counts from 0: each life's count is its own.
    life_before=$(metric tallyd_received_lines_total)
    send_part "$part"
    received=$((received + now_received - life_before))
    echo "  part $((i + 1)): tallyd received $((now_received - life_before)) lines; spool $(metric tallyd_spool_bytes) bytes; dropped: $(metric tallyd_dropped_total)"
    if [ "$i" -lt "$kills" ]; then
        kill -9 "$t_pid"; wait "$t_pid" 2>/dev/null || true
        start_tallyd
    fi
done
start_ch
began=$(date +%s.%N)
before=$(metric tallyd_received_lines_total)
send_part 20
live=$((now_received - before))
received=$((received + live))
while [ "$(metric tallyd_backlog_batches)" != 0 ]; do watch_peaks; sleep 1; done
drained=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
dropped=$(metric tallyd_dropped_total)
inserts=$(metric tallyd_inserts_total)
kill -TERM "$t_pid"; wait "$t_pid" || true; t_pid=""
stored=$(curl -sf "$ch_url" --data-binary "SELECT sum(value) FROM outage.counters FINAL WHERE name LIKE 'outage.%'")
echo "sent $sent, received $received, stored $stored (difference $((stored - received))); backlog drained in ${drained}s (with 20 s of live traffic)"
echo "live traffic while draining: received $live of $((rate * 20)) lines ($(awk -v l="$live" -v n="$((rate * 20))" 'BEGIN { printf "%.3f", 100 * (n - l) / n }') % lost at the socket)"
echo "peak spool $((peak_spool / 1048576)) MiB; peak RSS $((peak_rss_kb / 1024)) MiB (VmHWM), of which at most $((peak_anon_kb / 1024)) MiB anonymous and $((peak_file_kb / 1024)) MiB mapped WAL pages (sampled each second); INSERTs in the last life $inserts; tallyd drops in its last life: $dropped"
[ "$stored" = "$received" ]
