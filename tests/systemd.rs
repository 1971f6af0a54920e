//! systemd integration without systemd as PID 1: a NOTIFY_SOCKET datagram
//! socket stands in for the service manager, and systemd-analyze checks the
//! unit file.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{clickhouse, free_port, temp_dir};

/// Reads notifications until one contains `want` (or the time runs out);
/// returns every message read.
fn read_until(sock: &UnixDatagram, want: &str, secs: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want} within {secs} s; got {seen:?}");
}

#[test]
fn ready_watchdog_and_stopping_reach_the_service_manager() {
    let ch = clickhouse();
    let dir = temp_dir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    std::fs::write(
        dir.join("t.toml"),
        "[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n",
    )
    .expect("config");
    let tcp = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .args([
            "run",
            "--clickhouse-database",
            "notify",
            "--clickhouse-url",
            &ch.url(),
        ])
        .args([
            "--statsd-udp",
            "127.0.0.1:0",
            "--statsd-tcp",
            &format!("127.0.0.1:{tcp}"),
        ])
        .args(["--proto-tcp", "off", "--proto-udp", "off", "--admin", "off"])
        .arg("--config")
        .arg(dir.join("t.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");

    let before_ready = read_until(&sock, "READY=1", 20);
    assert!(
        !before_ready.iter().any(|m| m.contains("WATCHDOG=1")),
        "a ping before READY: {before_ready:?}"
    );
    // READY means the listeners take traffic now.
    TcpStream::connect(("127.0.0.1", tcp))
        .expect("the StatsD TCP listener accepts once READY=1 is sent");
    assert!(
        before_ready
            .last()
            .is_some_and(|m| m.contains("STATUS=ready")),
        "{before_ready:?}"
    );

    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        read_until(&sock, "WATCHDOG=1", 5);
        pings += 1;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "3 pings took {:?} with a 200 ms watchdog",
        started.elapsed()
    );

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    read_until(&sock, "STOPPING=1", 10);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let dir = temp_dir("unit");
    for name in ["tallyd.service", "tallyd.socket"] {
        let unit =
            std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR")))
                .expect("unit");
        // verify wants ExecStart's binary to exist.
        std::fs::write(
            dir.join(name),
            unit.replace("/usr/bin/tallyd", env!("CARGO_BIN_EXE_tallyd")),
        )
        .expect("write");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("tallyd.service"))
        .arg(dir.join("tallyd.socket"))
        .output()
        .expect("systemd-analyze runs (scripts/test.sh installs Debian's systemd package)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
