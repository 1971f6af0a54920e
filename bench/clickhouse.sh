# Sourced by the kit's scripts. private_clickhouse DIR starts a private ClickHouse (Debian's
# clickhouse-server, 18.16) on a free loopback port, its config and data under DIR, and sets
# CH (its HTTP URL) and ch_pid (for the caller to stop it). free prints a free loopback port.
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
private_clickhouse() {
  local dir=$1 port
  port=$(free)
  cat >"$dir/ch.xml" <<XML
<yandex><logger><console>1</console><level>warning</level></logger><listen_host>127.0.0.1</listen_host>
<http_port>$port</http_port><tcp_port>0</tcp_port><path>$dir/clickhouse/</path><mark_cache_size>536870912</mark_cache_size>
<users_config>$dir/ch.xml</users_config><profiles><default/></profiles>
<users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
<quotas><default/></quotas></yandex>
XML
  /usr/sbin/clickhouse-server --config-file="$dir/ch.xml" >"$dir/ch.log" 2>&1 & ch_pid=$!
  CH=http://127.0.0.1:$port
  for _ in $(seq 100); do curl -sf "$CH/ping" >/dev/null && break; sleep 0.1; done
}
