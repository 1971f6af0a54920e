//! The built `tallyd` binary: its commands, config errors, and a SIGTERM
//! that flushes what was received.

mod common;

use std::process::{Command, Stdio};

use common::{clickhouse, free_port, send_tcp, send_udp, temp_dir, wait_for};

fn tallyd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    c.env("TALLYD_OTLP_HTTP", "off");
    c.env("TALLYD_OTLP_GRPC", "off");
    c
}

/// A config file with a small WAL (the default preallocates 1 GiB).
fn small_wal_config() -> std::path::PathBuf {
    let file = temp_dir("cfg").join("small-wal.toml");
    std::fs::write(&file, "[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n")
        .expect("write config");
    file
}

#[test]
fn version_names_the_crate_version() {
    let out = tallyd().arg("--version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("tallyd {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn schema_prints_the_ddl_for_the_configured_database() {
    // No server answers there: the DDL for 18.16 to 22.1, said so.
    let out = tallyd()
        .args(["schema", "--clickhouse-database", "metrics"])
        .args(["--clickhouse-url", "http://127.0.0.1:1"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("-- http://127.0.0.1:1 did not answer"),
        "{text}"
    );
    assert!(
        text.contains("\nCREATE DATABASE IF NOT EXISTS `metrics`;"),
        "{text}"
    );
    // 6 raw tables, the flushes table, 8 rollup tables and their runs.
    assert_eq!(
        text.matches("CREATE TABLE IF NOT EXISTS `metrics`.")
            .count(),
        16
    );
    assert!(text.contains("CREATE TABLE IF NOT EXISTS `metrics`.counters_1h ("));
    // Only the comment names the setting (statements end in `;`).
    assert!(!text.contains("non_replicated_deduplication_window = 1000;"));
    // For a given version and cluster.
    let out = tallyd()
        .args(["schema", "--server-version", "24.8.4", "--cluster", "c1"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("-- For ClickHouse 24.8.4."), "{text}");
    assert_eq!(text.matches(" ON CLUSTER `c1`").count(), 33, "{text}");
    assert_eq!(text.matches("ENGINE = Distributed(").count(), 16);
    let out = tallyd()
        .args(["schema", "--server-version", "24.8.4"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("SETTINGS non_replicated_deduplication_window = 1000;")
            .count(),
        6
    );
}

#[test]
fn check_config_prints_effective_settings_with_precedence() {
    let dir = temp_dir("cfg");
    let file = dir.join("t.toml");
    std::fs::write(&file, "[aggregate]\nmax_depth = 5\nflush_interval = \"2s\"\n[clickhouse]\npassword = \"hunter2\"\n").expect("write");
    let out = tallyd()
        .args(["check-config", "--config"])
        .arg(&file)
        .args(["--max-depth", "7"])
        .env("TALLYD_FLUSH_INTERVAL", "3s")
        .env("TALLYD_HOST_ID", "from-env")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("max_depth = 7\n"), "flag beats file: {text}");
    assert!(
        text.contains("flush_interval = \"3s\"\n"),
        "env beats file: {text}"
    );
    assert!(text.contains("host_id = \"from-env\"\n"), "{text}");
    assert!(
        !text.contains("hunter2") && text.contains("<redacted>"),
        "{text}"
    );
}

#[test]
fn unknown_key_fails_naming_the_key() {
    let dir = temp_dir("cfg");
    let file = dir.join("t.toml");
    std::fs::write(&file, "[statsd]\nudp_port = 8125\n").expect("write");
    let out = tallyd()
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("udp_port"), "{err}");
}

#[test]
fn bad_value_fails_naming_the_field() {
    let out = tallyd()
        .args(["check-config", "--flush-interval", "often"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("aggregate.flush_interval") && err.contains("often"),
        "{err}"
    );
}

#[test]
fn port_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = tallyd()
        .args([
            "run",
            "--statsd-udp",
            "off",
            "--admin",
            "off",
            "--statsd-tcp",
            &addr,
        ])
        .arg("--data-dir")
        .arg(temp_dir("busy"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on StatsD TCP {addr}")),
        "{err}"
    );
}

#[test]
fn sigterm_flushes_everything_received_and_exits_zero() {
    let ch = clickhouse();
    let (udp, tcp, admin) = (free_port(), free_port(), free_port());
    let child = tallyd()
        .args([
            "run",
            "--flush-interval",
            "1h",
            "--clickhouse-database",
            "sigterm",
            "--host-id",
            "bin",
        ])
        .args(["--clickhouse-url", &ch.url()])
        .args([
            "--statsd-udp",
            &format!("127.0.0.1:{udp}"),
            "--statsd-tcp",
            &format!("127.0.0.1:{tcp}"),
        ])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .arg("--config")
        .arg(small_wal_config())
        .args(["--proto-tcp", "off", "--proto-udp", "off"])
        .arg("--data-dir")
        .arg(temp_dir("sigterm"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert!(
        wait_for(10, || common::http(admin, "GET", "/health", "").as_deref()
            == Some("ok\n")),
        "tallyd did not become healthy"
    );
    send_udp(
        format!("127.0.0.1:{udp}").parse().expect("addr"),
        &vec!["term:1|c\nterm:2|c".to_string(); 50],
    );
    send_tcp(
        format!("127.0.0.1:{tcp}").parse().expect("addr"),
        &"term:1|c\n".repeat(100),
    );
    assert!(
        wait_for(10, || common::http(admin, "GET", "/metrics", "")
            .is_some_and(|m| m.contains("tallyd_samples_total 200\n"))),
        "not everything was received"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ch.query(
            "SELECT sum(value), sum(samples), any(host) FROM sigterm.counters FINAL FORMAT TSV"
        ),
        "250\t200\tbin\n"
    );
}

#[test]
fn an_unusable_data_dir_is_one_clear_line() {
    let not_a_dir = temp_dir("file").join("plain-file");
    std::fs::write(&not_a_dir, "x").expect("write");
    let out = tallyd()
        .args([
            "run",
            "--statsd-udp",
            "off",
            "--statsd-tcp",
            "off",
            "--admin",
            "off",
            "--proto-tcp",
            "off",
            "--proto-udp",
            "off",
        ])
        .arg("--data-dir")
        .arg(not_a_dir.join("data"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(73));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data dir") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn a_second_tallyd_on_the_same_data_dir_is_refused() {
    let dir = temp_dir("locked");
    let config = small_wal_config();
    let quiet = [
        "--statsd-udp",
        "off",
        "--statsd-tcp",
        "off",
        "--admin",
        "off",
        "--proto-tcp",
        "off",
        "--proto-udp",
        "off",
    ];
    let mut first = tallyd()
        .arg("run")
        .args(quiet)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(
        wait_for(20, || dir.join("wal").join("meta").exists()),
        "the first tallyd did not open its WAL"
    );
    let out = tallyd()
        .arg("run")
        .args(quiet)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .expect("run");
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.status.code(), Some(73));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("used by another tallyd"), "{err}");
}
