//! SIGHUP reloads the config file: a fixed ClickHouse URL takes effect
//! without losing what was pending, a new flush interval and max depth
//! apply, and an invalid file is refused while the running configuration
//! stays in force.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{clickhouse, free_port, http, send_tcp, temp_dir, wait_for};

fn write_config(path: &Path, url: &str, aggregate: &str) {
    std::fs::write(
        path,
        format!(
            "log_level = \"info\"\n[aggregate]\n{aggregate}\n[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nurl = \"{url}\"\ndatabase = \"reload\"\nretry_max = \"200ms\"\ntimeout = \"2s\"\n"
        ),
    )
    .expect("write config");
}

fn hup(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
}

#[test]
fn sighup_applies_new_settings_and_refuses_a_bad_file() {
    let ch = clickhouse();
    let dir = temp_dir("reload");
    let file = dir.join("tallyd.toml");
    let dead = format!("http://127.0.0.1:{}", free_port());
    write_config(&file, &dead, "flush_interval = \"200ms\"");
    let (tcp, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .arg("run")
        .arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--statsd-udp",
            "off",
            "--statsd-tcp",
            &format!("127.0.0.1:{tcp}"),
        ])
        .args([
            "--proto-tcp",
            "off",
            "--proto-udp",
            "off",
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert!(wait_for(20, || http(admin, "GET", "/health", "")
        .as_deref()
        == Some("ok\n")));
    let addr = format!("127.0.0.1:{tcp}").parse().expect("addr");

    // ClickHouse is unreachable at this URL: the rows wait.
    send_tcp(addr, &"pending:1|c\n".repeat(300));
    assert!(wait_for(10, || http(admin, "GET", "/metrics", "")
        .is_some_and(|m| m.contains("tallyd_samples_total 300\n"))));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        ch.try_query("SELECT count() FROM reload.counters")
            .is_none_or(|c| c == "0\n")
    );

    // The right URL, by reload.
    write_config(&file, &ch.url(), "flush_interval = \"200ms\"");
    hup(child.id());
    assert!(
        wait_for(20, || ch
            .try_query("SELECT sum(value) FROM reload.counters FINAL")
            .as_deref()
            == Some("300\n")),
        "the pending rows did not reach ClickHouse after the reload"
    );

    // A 1 h interval and a max depth of 50, by reload: 10 lines stay
    // pending (no tick), 50 flush at once (the new depth).
    write_config(&file, &ch.url(), "flush_interval = \"1h\"\nmax_depth = 50");
    hup(child.id());
    std::thread::sleep(std::time::Duration::from_millis(500));
    send_tcp(addr, &"quiet:1|c\n".repeat(10));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert!(
        ch.try_query("SELECT count() FROM reload.counters WHERE name = 'quiet'")
            .is_none_or(|c| c == "0\n"),
        "flushed on the old 200 ms interval"
    );
    send_tcp(addr, &"quiet:1|c\n".repeat(40));
    assert!(
        wait_for(20, || ch
            .try_query("SELECT sum(value) FROM reload.counters FINAL WHERE name = 'quiet'")
            .as_deref()
            == Some("50\n")),
        "the reloaded max_depth did not flush"
    );

    // A bad file is refused; the running configuration keeps working (the
    // 5 lines stay pending under the 1 h interval until the stop).
    std::fs::write(&file, "[aggregate]\nflush_intervall = \"1s\"\n").expect("write");
    hup(child.id());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(http(admin, "GET", "/health", "").as_deref(), Some("ok\n"));
    send_tcp(addr, &"after:1|c\n".repeat(5));
    assert!(wait_for(10, || http(admin, "GET", "/metrics", "")
        .is_some_and(|m| m.contains("tallyd_samples_total 355\n"))));

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
    assert!(
        stderr.contains("reload refused") && stderr.contains("flush_intervall"),
        "{stderr}"
    );
    assert_eq!(
        ch.number("SELECT sum(value) FROM reload.counters FINAL"),
        355.0
    );
}
