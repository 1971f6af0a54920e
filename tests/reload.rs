//! SIGHUP reloads the config file: a fixed ClickHouse URL takes effect
//! without losing what was pending, and an invalid file is refused while the
//! running configuration stays in force.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{clickhouse, free_port, http, send_tcp, temp_dir, wait_for};

fn write_config(path: &Path, url: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "log_level = \"info\"\n{extra}\n[aggregate]\nflush_interval = \"200ms\"\n[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nurl = \"{url}\"\ndatabase = \"reload\"\nretry_max = \"200ms\"\ntimeout = \"2s\"\n"
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
fn sighup_applies_a_new_clickhouse_url_and_refuses_a_bad_file() {
    let ch = clickhouse();
    let dir = temp_dir("reload");
    let file = dir.join("tallyd.toml");
    let dead = format!("http://127.0.0.1:{}", free_port());
    write_config(&file, &dead, "");
    let (tcp, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
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
    write_config(&file, &ch.url(), "");
    hup(child.id());
    assert!(
        wait_for(20, || ch
            .try_query("SELECT sum(value) FROM reload.counters FINAL")
            .as_deref()
            == Some("300\n")),
        "the pending rows did not reach ClickHouse after the reload"
    );

    // A bad file is refused; the running configuration keeps working.
    std::fs::write(&file, "[aggregate]\nflush_intervall = \"1s\"\n").expect("write");
    hup(child.id());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(http(admin, "GET", "/health", "").as_deref(), Some("ok\n"));
    send_tcp(addr, &"after:1|c\n".repeat(5));
    assert!(
        wait_for(20, || ch
            .try_query("SELECT sum(value) FROM reload.counters FINAL WHERE name = 'after'")
            .as_deref()
            == Some("5\n")),
        "rows after a refused reload did not arrive"
    );

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
        305.0
    );
}
