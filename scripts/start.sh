#!/usr/bin/env bash
# Starts tallyd doing its job against a local ClickHouse.
#
# If no ClickHouse answers at $TALLYD_CLICKHOUSE_URL (default
# http://127.0.0.1:8123), this installs Debian's clickhouse-server (as root)
# and starts a private server with its data under ./.tallyd/clickhouse. Then
# it builds tallyd (release) and runs it in the foreground with its state
# under ./.tallyd/data. Extra arguments go to `tallyd run`. Ctrl-C stops
# tallyd (after a final flush); the private ClickHouse keeps running (its
# PID is in ./.tallyd/clickhouse/clickhouse.pid).
set -euo pipefail
cd "$(dirname "$0")/.."
url=${TALLYD_CLICKHOUSE_URL:-http://127.0.0.1:8123}
state=$PWD/.tallyd

ping_clickhouse() {
    local hostport=${url#http://}; hostport=${hostport%%/*}
    local host=${hostport%:*} port=${hostport##*:}
    { exec 3<>"/dev/tcp/$host/$port" && printf 'GET /ping HTTP/1.0\r\n\r\n' >&3 && grep -q '^Ok\.' <&3; } 2>/dev/null
}

if ! ping_clickhouse; then
    case $url in
        http://127.0.0.1:*|http://localhost:*) ;;
        *) echo "start.sh: no ClickHouse answers at $url" >&2; exit 1 ;;
    esac
    if [ ! -x /usr/sbin/clickhouse-server ]; then
        echo "start.sh: installing clickhouse-server (Debian package)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends clickhouse-server >/dev/null
    fi
    port=${url##*:}; port=${port%%/*}
    mkdir -p "$state/clickhouse"
    cat >"$state/clickhouse/config.xml" <<XML
<yandex>
  <logger><level>warning</level><log>$state/clickhouse/server.log</log><errorlog>$state/clickhouse/server.err.log</errorlog></logger>
  <mark_cache_size>5368709120</mark_cache_size>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$port</http_port>
  <path>$state/clickhouse/data/</path>
  <tmp_path>$state/clickhouse/tmp/</tmp_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
</yandex>
XML
    cat >"$state/clickhouse/users.xml" <<XML
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
XML
    echo "start.sh: starting a private ClickHouse on 127.0.0.1:$port (data in $state/clickhouse)"
    (cd "$state/clickhouse" && { nohup /usr/sbin/clickhouse-server --config-file=config.xml >server.out 2>&1 & echo $! >clickhouse.pid; })
    for _ in $(seq 100); do ping_clickhouse && break; sleep 0.1; done
    ping_clickhouse || { echo "start.sh: ClickHouse did not start; see $state/clickhouse/server.out" >&2; exit 1; }
fi

cargo build --release --locked
echo "start.sh: tallyd takes StatsD on 127.0.0.1:8125 (UDP and TCP) and protobuf batches on 127.0.0.1:8126; /health and /metrics on 127.0.0.1:8127"
exec ./target/release/tallyd run --clickhouse-url "$url" --data-dir "$state/data" "$@"
