//! DogStatsD clients over a Unix datagram socket (`statsd.dogstatsd_socket`):
//! Datadog's Python client (`socket_path=`) and node's hot-shots (`protocol:
//! 'uds'`, with the unix-dgram native module), against a running tallyd and
//! the private ClickHouse. `scripts/test.sh` installs both clients.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use common::*;
use tallyd::server;

/// Runs `program args…` and fails the test with its output if it fails.
async fn run(program: &'static str, args: Vec<String>, hint: &'static str) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{program} does not run ({hint}): {e}"))
    })
    .await
    .expect("client thread");
    assert!(
        out.status.success(),
        "{program} failed ({hint}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn client(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/uds")
        .join(file)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_clients_over_the_unix_socket_count_exactly() {
    let ch = clickhouse();
    let mut s = settings(ch, "dsd_uds");
    let socket: PathBuf = temp_dir("uds").join("dsd.socket");
    s.statsd.dogstatsd_socket = socket.display().to_string();
    let running = server::start(config(&s)).await.expect("start");
    assert!(socket.exists(), "the socket file is made");
    let path = socket.display().to_string();
    run(
        "python3",
        vec![client("client.py"), path.clone()],
        "scripts/test.sh installs the datadog package from PyPI",
    )
    .await;
    run(
        "node",
        vec![client("client.js"), path],
        "scripts/test.sh runs npm install in tests/uds",
    )
    .await;
    let t = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);
    assert!(!socket.exists(), "the socket file is removed at stop");
    assert!(t.uds.lines.load(Relaxed) >= 2, "lines came over the socket");
    assert_eq!(t.udp.lines.load(Relaxed), 0, "and not over UDP");
    let q = |sql: &str| ch.query(&format!("{sql} FORMAT TSV"));
    assert_eq!(
        q(
            "SELECT name, tags, sum(value) FROM dsd_uds.counters FINAL WHERE name IN ('py.hits', 'node.hits') GROUP BY name, tags ORDER BY name"
        ),
        "node.hits\t['lang:node']\t100\npy.hits\t['lang:python']\t100\n"
    );
    assert_eq!(
        q("SELECT argMax(value, version) FROM dsd_uds.gauges WHERE name = 'py.queue'"),
        "7\n"
    );
    assert_eq!(
        q(
            "SELECT name, kind, sum(count), sum(sum) FROM dsd_uds.timers FINAL WHERE name IN ('py.latency', 'node.latency') GROUP BY name, kind ORDER BY name"
        ),
        "node.latency\th\t4\t10\npy.latency\td\t4\t8\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_over_a_unix_stream_socket_counts_exactly() {
    let ch = clickhouse();
    let mut s = settings(ch, "dsd_stream");
    let socket: PathBuf = temp_dir("uds-stream").join("dsd.socket");
    s.statsd.dogstatsd_stream_socket = socket.display().to_string();
    s.statsd.tcp_max_line = "16KiB".into();
    let running = server::start(config(&s)).await.expect("start");
    run(
        "python3",
        vec![
            client("client.py"),
            format!("unixstream://{}", socket.display()),
        ],
        "scripts/test.sh installs the datadog package from PyPI",
    )
    .await;
    // A raw client: frames cut at odd places, then one over the limit,
    // which closes its connection (what came before it counts).
    let path = socket.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut conn = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let mut bytes = Vec::new();
        for payload in ["raw.c:1|c", "raw.c:2|c\nraw.c:3|c"] {
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(payload.as_bytes());
        }
        for chunk in bytes.chunks(3) {
            conn.write_all(chunk).expect("write");
            conn.flush().expect("flush");
        }
        // tallyd may close the connection as soon as it reads the length.
        let _ = conn.write_all(&100_000u32.to_le_bytes());
        let _ = conn.write_all(&[b'x'; 100]);
    })
    .await
    .expect("raw client");
    let t = std::sync::Arc::clone(&running.telemetry);
    assert!(
        wait_for(10, || t.uds_frames_too_large.load(Relaxed) == 1),
        "the oversize frame was not refused"
    );
    assert_eq!(running.shutdown().await, 0);
    assert!(!socket.exists(), "the socket file is removed at stop");
    let q = |sql: &str| ch.query(&format!("{sql} FORMAT TSV"));
    assert_eq!(
        q(
            "SELECT name, sum(value) FROM dsd_stream.counters FINAL WHERE name IN ('py.hits', 'raw.c') GROUP BY name ORDER BY name"
        ),
        "py.hits\t100\nraw.c\t6\n"
    );
    assert_eq!(
        q("SELECT sum(count), sum(sum) FROM dsd_stream.timers FINAL WHERE name = 'py.latency'"),
        "4\t8\n"
    );
}
