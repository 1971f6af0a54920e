//! Socket activation: listeners passed by systemd (here by
//! systemd-socket-activate, which starts tallyd on the first traffic) are
//! served, and what the kernel queued before tallyd ran is not lost.

mod common;

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};

use common::{clickhouse, free_port, http, send_tcp, temp_dir, wait_for};

fn activate(flags: &[&str], port: u16, name: &str, database: &str, admin: u16) -> Child {
    let ch = clickhouse();
    let dir = temp_dir("activation");
    std::fs::write(
        dir.join("t.toml"),
        "[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n",
    )
    .expect("config");
    Command::new("systemd-socket-activate")
        .args(flags)
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            &format!("--fdname={name}"),
        ])
        .arg(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "run",
            "--clickhouse-url",
            &ch.url(),
            "--clickhouse-database",
            database,
        ])
        // Configured addresses that must not be used: the passed socket wins.
        .args([
            "--statsd-udp",
            "off",
            "--statsd-tcp",
            "off",
            "--proto-tcp",
            "off",
            "--proto-udp",
            "off",
            "--otlp-http",
            "off",
            "--otlp-grpc",
            "off",
        ])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .arg("--config")
        .arg(dir.join("t.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate runs (scripts/test.sh installs Debian's systemd package)")
}

fn stop(mut child: Child) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

fn received(admin: u16, lines: u64) -> bool {
    http(admin, "GET", "/metrics", "").is_some_and(|m| {
        m.lines()
            .filter(|l| l.starts_with("tallyd_received_lines_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
            >= lines
    })
}

#[test]
fn a_passed_udp_socket_is_served_and_loses_nothing_queued_before_start() {
    let (port, admin) = (free_port(), free_port());
    let child = activate(&["--datagram"], port, "statsd-udp", "activated_udp", admin);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Sent before tallyd runs: the first datagram is what starts it.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for _ in 0..3 {
        sock.send_to(b"activated:1|c\nactivated:1|c", ("127.0.0.1", port))
            .expect("send");
    }
    assert!(
        wait_for(20, || received(admin, 6)),
        "the queued datagrams were not served"
    );
    stop(child);
    assert_eq!(
        clickhouse().number("SELECT sum(value) FROM activated_udp.counters FINAL"),
        6.0
    );
}

#[test]
fn a_passed_tcp_listener_is_served() {
    let (port, admin) = (free_port(), free_port());
    let child = activate(&[], port, "statsd-tcp", "activated_tcp", admin);
    std::thread::sleep(std::time::Duration::from_millis(200));
    send_tcp(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        "activated:5|c\n",
    );
    assert!(
        wait_for(20, || received(admin, 1)),
        "the passed listener was not served"
    );
    stop(child);
    assert_eq!(
        clickhouse().number("SELECT sum(value) FROM activated_tcp.counters FINAL"),
        5.0
    );
}

#[test]
fn unnamed_sockets_are_told_apart_by_type() {
    // As from one tallyd.socket with ListenDatagram and ListenStream: both
    // sockets carry the unit's name. Here: a datagram socket named "tallyd".
    let (port, admin) = (free_port(), free_port());
    let child = activate(&["--datagram"], port, "tallyd", "activated_unnamed", admin);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.send_to(b"unnamed:7|c", ("127.0.0.1", port))
        .expect("send");
    assert!(
        wait_for(20, || received(admin, 1)),
        "the unnamed socket was not served as StatsD UDP"
    );
    stop(child);
    assert_eq!(
        clickhouse().number("SELECT sum(value) FROM activated_unnamed.counters FINAL"),
        7.0
    );
}
