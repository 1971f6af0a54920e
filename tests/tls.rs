//! ClickHouse over HTTPS: a private 18.16 server with a certificate signed
//! by a CA made here (with the `openssl` command), and tallyd trusting that
//! CA through `clickhouse.ca_file`. Without it, the certificate is refused,
//! the data waits in the spool, and it lands once the config is fixed.
//! A self-signed certificate made as ClickHouse's guide makes one (CA:TRUE
//! on OpenSSL 3) is pinned by `ca_file`; a refused one's reason is in the
//! log and in `/health`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;

use common::*;
use tallyd::server;

/// Whether tallyd retried ClickHouse at least `times` times within 10 s
/// (polled off the runtime's threads).
async fn retried(telemetry: &std::sync::Arc<tallyd::telemetry::Telemetry>, times: u64) -> bool {
    let t = std::sync::Arc::clone(telemetry);
    tokio::task::spawn_blocking(move || {
        wait_for(10, || t.clickhouse_retries.load(Relaxed) >= times)
    })
    .await
    .expect("poll")
}

/// A self-signed certificate for 127.0.0.1 and localhost, made as
/// ClickHouse's guide to HTTPS makes it, in `dir`: (server.crt,
/// server.key). OpenSSL 3 (Debian 12) marks it `CA:TRUE`, which is checked
/// here so that the test stays about such a certificate.
fn guide_certificate(dir: &Path) -> (String, String) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
        .args(["-keyout", "server.key", "-out", "server.crt"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", "server.crt"])
        .current_dir(dir)
        .output()
        .expect("openssl x509");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
        "this openssl does not make a CA:TRUE certificate by default"
    );
    let path = |f: &str| dir.join(f).display().to_string();
    (path("server.crt"), path("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_certificate_made_as_clickhouses_guide_says_is_pinned_and_counts_exactly() {
    let dir = temp_dir("tls-guide");
    let (cert, key) = guide_certificate(&dir);
    let ch = clickhouse_tls(Path::new(&cert), Path::new(&key));
    let mut s = settings(&ch, "guide");
    s.clickhouse.url = format!("https://127.0.0.1:{}", ch.https_port);
    s.clickhouse.ca_file = cert;
    s.aggregate.flush_interval = "100ms".into();
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    for _ in 0..10 {
        send_udp(udp, &["guide.c:1|c\nguide.c:2|c".to_string()]);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    wait_for_lines(&running.telemetry, 20);
    let telemetry = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        telemetry.clickhouse_retries.load(Relaxed),
        0,
        "{}",
        telemetry
            .clickhouse_last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    );
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value), sum(samples) FROM guide.counters {fin} WHERE name = 'guide.c'"
            )),
            "30\t20\n",
            "{fin}"
        );
    }
}

#[test]
fn a_refused_certificate_says_why_in_the_log_and_in_health_and_check_config_warns_of_a_pin() {
    let dir = temp_dir("tls-why");
    let (cert, key) = guide_certificate(&dir);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let (other_ca, _, _) = certificates(&other);
    let ch = clickhouse_tls(Path::new(&cert), Path::new(&key));
    let admin = free_port();
    let file = dir.join("tallyd.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nadmin = \"127.0.0.1:{admin}\"\n[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nurl = \"https://127.0.0.1:{}\"\nca_file = {other_ca:?}\nretry_max = \"200ms\"\n",
            dir.join("data").display(),
            ch.https_port
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("stderr")).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .args(["run", "--statsd-udp", "off", "--statsd-tcp", "off"])
        .args(["--proto-tcp", "off", "--proto-udp", "off", "--config"])
        .arg(&file)
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut health = None;
    let said = wait_for(20, || {
        health = http(admin, "GET", "/health", "");
        health
            .as_deref()
            .is_some_and(|h| h.contains("CA used as end entity"))
    });
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    assert!(said, "/health: {health:?}\nlog:\n{stderr}");
    let health = health.unwrap_or_default();
    // 503 with the problem (the harness shows a non-200 answer whole).
    assert!(health.contains("503 Service Unavailable"), "{health}");
    assert!(
        health.contains("degraded: ClickHouse's TLS handshake fails"),
        "{health}"
    );
    assert!(
        stderr.contains("TLS handshake fails") && stderr.contains("CA used as end entity"),
        "{stderr}"
    );
    // The guide's certificate itself in ca_file: check-config says it is
    // pinned.
    let pinned = dir.join("pinned.toml");
    std::fs::write(
        &pinned,
        format!("[clickhouse]\nurl = \"https://127.0.0.1:8443\"\nca_file = {cert:?}\n"),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["check-config", "--config"])
        .arg(&pinned)
        .output()
        .expect("check-config");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("self-signed CA certificate") && text.contains("pinned"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_asks_for_a_client_certificate_gets_ours() {
    let dir = temp_dir("mtls");
    let (ca, cert, key) = certificates(&dir);
    let ch = clickhouse_mtls(Path::new(&cert), Path::new(&key), Path::new(&ca));
    let mut s = settings(&ch, "mtls");
    s.clickhouse.url = format!("https://127.0.0.1:{}", ch.https_port);
    s.clickhouse.ca_file = ca;
    s.clickhouse.client_cert = dir.join("client.crt").display().to_string();
    s.clickhouse.client_key = dir.join("client.key").display().to_string();
    let running = server::start(config(&s)).await.expect("start");
    send_udp(running.udp_addr.expect("udp"), &["mtls.c:5|c".to_string()]);
    wait_for_lines(&running.telemetry, 1);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.number("SELECT sum(value) FROM mtls.counters FINAL WHERE name = 'mtls.c'"),
        5.0
    );
    // Without the client certificate, the same server takes nothing (the
    // rows wait in the spool).
    s.clickhouse.client_cert.clear();
    s.clickhouse.client_key.clear();
    s.data_dir = temp_dir("mtls-bare").display().to_string();
    s.shutdown_timeout = "2s".into();
    let running = server::start(config(&s)).await.expect("start");
    send_udp(running.udp_addr.expect("udp"), &["mtls.c:7|c".to_string()]);
    wait_for_lines(&running.telemetry, 1);
    assert!(
        retried(&running.telemetry, 1).await,
        "tallyd never tried the server without its certificate"
    );
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.number("SELECT sum(value) FROM mtls.counters FINAL WHERE name = 'mtls.c'"),
        5.0,
        "a client without a certificate got in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_counts_exactly_and_an_untrusted_server_waits() {
    let dir = temp_dir("tls");
    let (ca, cert, key) = certificates(&dir);
    let ch = clickhouse_tls(Path::new(&cert), Path::new(&key));
    let https = format!("https://127.0.0.1:{}", ch.https_port);

    // Without the CA: nothing is trusted, nothing is lost.
    let mut s = settings(&ch, "tls");
    s.clickhouse.url = https.clone();
    s.clickhouse.retry_max = "200ms".into();
    s.aggregate.flush_interval = "100ms".into();
    // What ClickHouse has not taken by then stays in the spool.
    s.shutdown_timeout = "2s".into();
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    send_udp(udp, &["tls.c:1|c\ntls.c:2|c".to_string()]);
    wait_for_lines(&running.telemetry, 2);
    assert!(
        retried(&running.telemetry, 2).await,
        "the untrusted server was not retried"
    );
    assert_eq!(running.shutdown().await, 0);
    assert!(
        ch.try_query("SELECT count() FROM tls.counters")
            .is_none_or(|n| n == "0\n"),
        "nothing may land over an untrusted connection"
    );

    // The same data dir with the CA: the spooled rows land, and new ones.
    s.clickhouse.ca_file = ca.clone();
    let running = server::start(config(&s)).await.expect("restart");
    let udp = running.udp_addr.expect("udp");
    send_udp(udp, &["tls.c:4|c".to_string()]);
    wait_for_lines(&running.telemetry, 1);
    let t = std::sync::Arc::clone(&running.telemetry);
    assert!(
        tokio::task::spawn_blocking(move || wait_for(20, || t.backlog_batches.load(Relaxed) == 0
            && t.rows_written[0].load(Relaxed) + t.rows_resent[0].load(Relaxed) >= 2))
        .await
        .expect("poll"),
        "the backlog did not drain over HTTPS"
    );
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.number("SELECT sum(value) FROM tls.counters FINAL WHERE name = 'tls.c'"),
        7.0
    );
}

#[test]
fn a_ca_file_that_is_not_pem_is_a_config_error_naming_the_field() {
    let dir = temp_dir("tls-bad");
    let bad = dir.join("ca.crt");
    std::fs::write(&bad, "not a certificate").expect("write");
    let mut s = tallyd::config::Settings::default();
    s.clickhouse.url = "https://127.0.0.1:8443".into();
    s.clickhouse.ca_file = bad.display().to_string();
    let e = s.validate().expect_err("refused");
    assert_eq!(e.field, "clickhouse.ca_file");
    assert!(e.reason.contains("no certificate"), "{}", e.reason);
    let mut s = tallyd::config::Settings::default();
    s.clickhouse.client_cert = bad.display().to_string();
    assert_eq!(
        s.validate().expect_err("key missing").field,
        "clickhouse.client_cert"
    );
}
