//! TLS, client certificates and tokens on tallyd's own listeners, with
//! certificates made by the test with the `openssl` command (a CA, its
//! server and client certificates, and another CA with its own client):
//!
//! - StatsD over TCP with TLS from Python's `ssl` module, with a client
//!   certificate, counts exactly while a plain client, one without a
//!   certificate and one with another CA's are refused and counted;
//! - `tallyd send` with a client certificate and a token counts exactly;
//!   a wrong or missing token is refused and counted;
//! - the admin API over HTTPS asks for its token;
//! - a certificate rotated by SIGHUP serves new connections while an old
//!   connection finishes with the old one;
//! - an edge forwards to its aggregator over mTLS with a token.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tallyd::auth::{Listener, Refusal};
use tallyd::config::Settings;
use tallyd::server;
use tallyd::telemetry::Telemetry;

/// Certificates of two CAs: `ca` signs the server's and the good client's,
/// `other` signs a client tallyd must refuse.
struct Pki {
    dir: PathBuf,
    ca: String,
    cert: String,
    key: String,
    other: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = temp_dir(tag);
        let (ca, cert, key) = certificates(&dir);
        let other = dir.join("other");
        std::fs::create_dir_all(&other).expect("dir");
        certificates(&other);
        Pki {
            dir,
            ca,
            cert,
            key,
            other,
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn other(&self, file: &str) -> String {
        self.other.join(file).display().to_string()
    }

    /// A token file holding `token`.
    fn token_file(&self, name: &str, token: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, format!("{token}\n")).expect("token file");
        p.display().to_string()
    }
}

/// Settings with TLS and mTLS on `listeners` and the token `right-token`.
fn secured(ch: &ClickHouse, db: &str, pki: &Pki, listeners: &[&str]) -> Settings {
    let mut s = settings(ch, db);
    s.tls.listeners = listeners.iter().map(|l| l.to_string()).collect();
    s.tls.cert_file = pki.cert.clone();
    s.tls.key_file = pki.key.clone();
    s.tls.client_ca_file = pki.ca.clone();
    s.auth.token_file = pki.token_file("tokens", "right-token");
    s.proto.udp = "off".into();
    s.aggregate.flush_interval = "100ms".into();
    s
}

fn python(args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn refused(t: &Telemetry, listener: Listener, reason: Refusal) -> u64 {
    t.refused.count(listener, reason)
}

fn sums(ch: &ClickHouse, db: &str, name: &str) -> [String; 2] {
    ["", "FINAL"].map(|fin| {
        ch.query(&format!(
            "SELECT sum(value) FROM {db}.counters {fin} WHERE name = '{name}'"
        ))
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_over_tls_from_pythons_ssl_counts_exactly_and_refused_clients_change_nothing() {
    let pki = Arc::new(Pki::new("sec-statsd"));
    let ch = clickhouse();
    let s = secured(ch, "sec_statsd", &pki, &["statsd_tcp", "admin"]);
    let mut s = s;
    s.admin_token = "admin-token".into();
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let admin = running.admin_addr.expect("admin");
    let t = Arc::clone(&running.telemetry);
    let p = Arc::clone(&pki);
    blocking(move || {
        let port = tcp.port().to_string();
        let (cert, key) = (p.path("client.crt"), p.path("client.key"));
        let good = std::thread::spawn({
            let (port, ca, cert, key) = (port.clone(), p.ca.clone(), cert.clone(), key.clone());
            move || {
                python(&[
                    "statsd",
                    "127.0.0.1",
                    &port,
                    &ca,
                    "sec.tcp:1|c",
                    "5000",
                    &cert,
                    &key,
                ])
            }
        });
        // Meanwhile: a plain client, one without a certificate, one with
        // another CA's.
        send_tcp(tcp, &"sec.tcp:1000|c\n".repeat(10));
        python(&["statsd", "127.0.0.1", &port, &p.ca, "sec.tcp:1000|c", "10"]);
        python(&[
            "statsd",
            "127.0.0.1",
            &port,
            &p.ca,
            "sec.tcp:1000|c",
            "10",
            &p.other("client.crt"),
            &p.other("client.key"),
        ]);
        let (ok, said) = good.join().expect("client");
        assert!(ok, "{said}");
        assert_eq!(said.trim(), "sent 5000");
        wait_for_lines(&t, 5000);
        let tls = Listener::StatsdTcp;
        // Counted when the server's handshake ends, which the client may
        // see first.
        assert!(wait_for(5, || refused(
            &t,
            tls,
            Refusal::BadClientCertificate
        ) == 1
            && refused(&t, tls, Refusal::NoClientCertificate) == 1));
        assert!(
            refused(&t, tls, Refusal::TlsHandshake) >= 1,
            "the plain client"
        );

        // tallyd send over StatsD TCP without a client certificate: TLS 1.3
        // refuses it after the client's side of the handshake, and tallyd
        // send still fails (with the alert's words, unless the server's
        // reset came first and took the alert with it).
        let (ok, said) = send(
            &[
                "--statsd-tcp",
                &tcp.to_string(),
                "--tls",
                "--ca-file",
                &p.ca,
            ],
            &["sec.tcp:1000|c"],
        );
        assert!(!ok, "a refused send said it sent: {said}");
        assert!(
            ["client certificate", "Broken pipe", "reset"]
                .iter()
                .any(|w| said.contains(w)),
            "{said}"
        );

        // Plain, to the TLS listener: tallyd send fails, and says to add
        // --tls (from the alert read back, or the reset that may come
        // first).
        let (ok, said) = send(&["--statsd-tcp", &tcp.to_string()], &["sec.tcp:1000|c"]);
        assert!(!ok && said.contains("(add --tls)"), "{said}");

        // The admin API over HTTPS: its token, and a refusal counted.
        let url = format!("https://127.0.0.1:{}/metrics", admin.port());
        let (_, said) = python(&["https", &url, &p.ca, "admin-token", &cert, &key]);
        assert!(said.starts_with("200\n# HELP"), "{said}");
        assert!(t.render().contains(
            "tallyd_refused_total{listener=\"statsd_tcp\",reason=\"no_client_certificate\"} 2"
        ));
        let (_, said) = python(&["https", &url, &p.ca, "wrong", &cert, &key]);
        assert!(said.starts_with("401\n"), "{said}");
        assert_eq!(refused(&t, Listener::Admin, Refusal::TokenWrong), 1);
    })
    .await;
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(sums(ch, "sec_statsd", "sec.tcp"), ["5000\n", "5000\n"]);
}

/// Runs `tallyd send` with `args` and the lines; (exit ok, stderr).
fn send(args: &[&str], lines: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .arg("send")
        .args(args)
        .args(lines)
        .env_remove("TALLYD_TOKEN")
        .output()
        .expect("tallyd send");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallyd_send_with_a_client_certificate_and_a_token_counts_exactly_and_wrong_ones_are_refused()
 {
    let pki = Arc::new(Pki::new("sec-send"));
    let ch = clickhouse();
    let s = secured(ch, "sec_send", &pki, &["proto_tcp"]);
    let running = server::start(config(&s)).await.expect("start");
    let proto = running.proto_tcp_addr.expect("proto").to_string();
    let t = Arc::clone(&running.telemetry);
    let p = Arc::clone(&pki);
    blocking(move || {
        let (cert, key) = (p.path("client.crt"), p.path("client.key"));
        let right = p.token_file("right", "right-token");
        let wrong = p.token_file("wrong", "wrong-token");
        let base = [
            "--proto",
            &proto,
            "--tls",
            "--ca-file",
            &p.ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ];
        let lines = ["sec.send:3|c", "sec.send:4|c", "sec.send:5|c"];
        let (ok, said) = send(&[&base[..], &["--token-file", &right]].concat(), &lines);
        assert!(ok, "{said}");
        assert!(said.contains("3 lines, 1 batch acknowledged"), "{said}");

        let (ok, said) = send(&[&base[..], &["--token-file", &wrong]].concat(), &lines);
        assert!(
            !ok && said.contains("not one this listener accepts"),
            "{said}"
        );
        assert_eq!(refused(&t, Listener::ProtoTcp, Refusal::TokenWrong), 1);

        let (ok, said) = send(&base, &lines);
        assert!(!ok && said.contains("needs a token first"), "{said}");
        assert_eq!(refused(&t, Listener::ProtoTcp, Refusal::TokenMissing), 1);

        // No client certificate: refused in the handshake.
        let (ok, said) = send(
            &[
                "--proto",
                &proto,
                "--tls",
                "--ca-file",
                &p.ca,
                "--token-file",
                &right,
            ],
            &lines,
        );
        assert!(!ok && said.contains("client certificate"), "{said}");
        // Counted when the server's handshake ends, which the client may
        // see first.
        let no_cert = || refused(&t, Listener::ProtoTcp, Refusal::NoClientCertificate);
        assert!(wait_for(5, || no_cert() >= 1));
        assert_eq!(no_cert(), 1, "refused once, not retried");
        // Plain, to the TLS listener: said at once, not retried.
        let (ok, said) = send(&["--proto", &proto, "--token-file", &right], &lines);
        assert!(!ok && said.contains("speaks TLS (add --tls)"), "{said}");
        // A server name the certificate is not for: tallyd send says so.
        let (ok, said) = send(
            &[
                &base[..],
                &["--server-name", "elsewhere.example", "--token-file", &right],
            ]
            .concat(),
            &lines,
        );
        assert!(!ok && said.contains("name mismatch"), "{said}");
    })
    .await;
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(sums(ch, "sec_send", "sec.send"), ["12\n", "12\n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_by_sighup_serves_new_connections_while_an_old_one_finishes() {
    use std::io::Write;
    use tallyd::client::Secure;
    let first = Pki::new("sec-rotate-a");
    let second = Pki::new("sec-rotate-b");
    let ch = clickhouse();
    let mut s = settings(ch, "sec_rotate");
    s.aggregate.flush_interval = "100ms".into();
    s.tls.listeners = vec!["statsd_tcp".into()];
    // The files tallyd reads, rotated in place.
    let dir = temp_dir("sec-rotate");
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::copy(&first.cert, &cert).expect("copy");
    std::fs::copy(&first.key, &key).expect("copy");
    s.tls.cert_file = cert.display().to_string();
    s.tls.key_file = key.display().to_string();
    let mut running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let trusting = |ca: &str| {
        let files = tallyd::sink::tls::TlsFiles {
            ca: Some(tallyd::sink::tls::Pem::read(ca, false).expect("ca")),
            ..Default::default()
        };
        let config = tallyd::sink::tls::client_config(&files).expect("client");
        Secure {
            tls: Some((
                Arc::new(config),
                rustls_pki_types::ServerName::from(tcp.ip()),
            )),
            token: None,
        }
    };
    let (old_ca, new_ca) = (trusting(&first.ca), trusting(&second.ca));
    let timeout = Duration::from_secs(10);
    let mut old = blocking({
        let c = old_ca.clone();
        move || c.connect(tcp, timeout).expect("the first certificate")
    })
    .await;
    old.write_all(b"sec.rotate:1|c\n").expect("write");
    old.flush().expect("flush");

    std::fs::copy(&second.cert, &cert).expect("rotate");
    std::fs::copy(&second.key, &key).expect("rotate");
    running.reload(config(&s)).await;

    blocking(move || {
        // New connections get the new certificate: only its CA trusts it.
        assert!(old_ca.connect(tcp, timeout).is_err(), "still the old one");
        let mut c = new_ca.connect(tcp, timeout).expect("the new certificate");
        c.write_all(b"sec.rotate:10|c\n").expect("write");
        c.finish().expect("finish");
        // The old connection goes on with the old one, then closes.
        old.write_all(b"sec.rotate:100|c\n")
            .expect("old connection");
        old.finish().expect("finish");
    })
    .await;
    wait_for_lines(&running.telemetry, 3);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(sums(ch, "sec_rotate", "sec.rotate"), ["111\n", "111\n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_forwards_over_mtls_with_its_token_and_a_wrong_token_lands_nothing() {
    let pki = Pki::new("sec-fleet");
    let ch = clickhouse();
    let aggregator = secured(ch, "sec_fleet", &pki, &["proto_tcp"]);
    let agg = server::start(config(&aggregator))
        .await
        .expect("aggregator");
    let upstream = agg.proto_tcp_addr.expect("proto").to_string();
    let edge_settings = |name: &str, token: &str| {
        let mut e = settings(ch, "sec_fleet_edge");
        e.host_id = name.into();
        e.aggregate.flush_interval = "100ms".into();
        e.forward.upstreams = vec![upstream.clone()];
        e.forward.tls = true;
        e.forward.ca_file = pki.ca.clone();
        e.forward.client_cert = pki.path("client.crt");
        e.forward.client_key = pki.path("client.key");
        e.forward.token_file = pki.token_file(&format!("{name}.token"), token);
        e.forward.retry_max = "200ms".into();
        e.shutdown_timeout = "3s".into();
        e
    };
    let edge = server::start(config(&edge_settings("edge-a", "right-token")))
        .await
        .expect("edge");
    let stranger = server::start(config(&edge_settings("edge-b", "wrong-token")))
        .await
        .expect("stranger");
    for round in 0..10 {
        send_udp(edge.udp_addr.expect("udp"), &["sec.fleet:2|c".to_string()]);
        send_udp(
            stranger.udp_addr.expect("udp"),
            &["sec.fleet:1000|c".into()],
        );
        if round % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    wait_for_lines(&edge.telemetry, 10);
    wait_for_lines(&stranger.telemetry, 10);
    let t = Arc::clone(&agg.telemetry);
    assert!(
        blocking(
            move || wait_for(20, || refused(&t, Listener::ProtoTcp, Refusal::TokenWrong)
                >= 1)
        )
        .await,
        "the stranger's token was never refused"
    );
    assert_eq!(edge.shutdown().await, 0);
    // The stranger's intervals stay in its spool (refused, not lost).
    stranger.shutdown().await;
    assert_eq!(agg.shutdown().await, 0);
    assert_eq!(sums(ch, "sec_fleet", "sec.fleet"), ["20\n", "20\n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_by_sighup_refuses_the_open_connections_that_showed_it() {
    use tallyd::client::{ProtoClient, Secure};
    use tallyd::protocol::proto::pb::{self, ack::Status};
    let pki = Pki::new("sec-revoke");
    let ch = clickhouse();
    let mut s = settings(ch, "sec_revoke");
    s.proto.udp = "off".into();
    s.auth.token_file = pki.token_file("tokens", "old-token\nnew-token");
    let mut running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_tcp_addr.expect("proto");
    let batch = |sequence: u64| pb::Batch {
        client_id: "revoked".into(),
        sequence,
        events: tallyd::client::events_from_lines(["sec.revoke:1|c"]).expect("events"),
        ..Default::default()
    };
    let secure = |token: &str| Secure {
        tls: None,
        token: Some(tallyd::auth::Secret::new(token)),
    };
    let (mut old, mut new) = (
        ProtoClient::secured(addr, secure("old-token")),
        ProtoClient::secured(addr, secure("new-token")),
    );
    let (old, new) = blocking(move || {
        assert_eq!(old.send(&batch(1)).expect("old").status, Status::Ok as i32);
        assert_eq!(new.send(&batch(2)).expect("new").status, Status::Ok as i32);
        (old, new)
    })
    .await;
    s.auth.token_file = pki.token_file("tokens", "new-token");
    running.reload(config(&s)).await;
    let t = Arc::clone(&running.telemetry);
    blocking(move || {
        let (mut old, mut new) = (old, new);
        old.retries = 0;
        let e = old.send(&batch(3)).expect_err("the old token is gone");
        assert!(
            e.to_string().contains("not one this listener accepts"),
            "{e}"
        );
        assert_eq!(new.send(&batch(4)).expect("new").status, Status::Ok as i32);
        assert_eq!(refused(&t, Listener::ProtoTcp, Refusal::TokenWrong), 1);
    })
    .await;
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(sums(ch, "sec_revoke", "sec.revoke"), ["3\n", "3\n"]);
}
