//! Unit tests of [`super`].

use super::*;

#[test]
fn shipped_example_is_valid_and_matches_the_defaults() {
    let text = include_str!("../../tallyd.example.toml");
    let example = Settings::from_toml(text, "tallyd.example.toml").expect("example parses");
    assert_eq!(example, Settings::default());
    example.validate().expect("example validates");
}

#[test]
fn defaults_validate() {
    let c = Settings::default().validate().expect("valid");
    assert_eq!(c.statsd_udp, Some("127.0.0.1:8125".parse().expect("addr")));
    assert_eq!(c.flush_interval, Duration::from_secs(1));
    assert_eq!(c.aggregate.max_depth, 10_000_000);
    assert_eq!(c.udp_recv_buffer, 8 << 20);
    assert!(!c.host_id.is_empty());
}

#[test]
fn the_system_roots_are_read_with_the_config_for_an_https_url_without_a_ca_file() {
    // Building a client (at start and at each reload, on an async
    // thread) then reads no file.
    let plain = Settings::default().validate().expect("valid");
    assert!(plain.sink.tls.system.is_empty());
    let mut s = Settings::default();
    s.clickhouse.replicas = vec!["https://replica-2:8443".into()];
    let https = s.validate().expect("valid");
    assert_eq!(https.sink.tls.system, crate::sink::tls::SystemRoots::load());
}

#[test]
fn unknown_key_is_named() {
    let e = Settings::from_toml("[aggregate]\nflush_intervall = \"1s\"\n", "f.toml").unwrap_err();
    assert_eq!(e.field, "f.toml");
    assert!(e.reason.contains("flush_intervall"), "{e}");
}

#[test]
fn bad_value_names_its_field() {
    let mut s = Settings::default();
    s.aggregate.flush_interval = "soon".into();
    assert_eq!(s.validate().unwrap_err().field, "aggregate.flush_interval");
    let mut s = Settings::default();
    s.statsd.udp = "localhost".into();
    assert_eq!(s.validate().unwrap_err().field, "statsd.udp");
    let mut s = Settings::default();
    s.aggregate.max_keys = 0;
    assert_eq!(s.validate().unwrap_err().field, "aggregate.max_keys");
    let mut s = Settings::default();
    s.statsd.udp_recv_buffer = "lots".into();
    assert_eq!(s.validate().unwrap_err().field, "statsd.udp_recv_buffer");
}

#[test]
fn wal_geometry_is_derived_and_checked() {
    let mut s = Settings::default();
    s.statsd.udp_workers = 2;
    let wal = s.validate().expect("valid").wal.expect("enabled");
    assert_eq!(
        (wal.streams, wal.segment_size, wal.segments_per_stream),
        (4, 32 << 20, 8)
    );
    s.wal.size = "64KiB".into();
    assert_eq!(s.validate().unwrap_err().field, "wal.size");
    s.wal.size = "1GiB".into();
    s.wal.sync = "sometimes".into();
    assert_eq!(s.validate().unwrap_err().field, "wal.sync");
    s.wal.enabled = false;
    assert_eq!(s.validate().expect("valid").wal, None);
}

#[test]
fn the_default_wal_fits_any_core_count_in_its_size() {
    let size = 1 << 30;
    for workers in [1u64, 2, 15, 64, 256] {
        let g = wal_geometry(size, 32 << 20, 4 << 20, workers, 2).expect("fits");
        let total = u64::from(g.streams) * u64::from(g.segments_per_stream) * g.segment_size;
        assert!(total <= size, "{workers} workers: {g:?}");
        assert!(g.segments_per_stream >= 2, "{workers} workers: {g:?}");
        assert!(
            g.segment_size >= (4 << 20) + (64 << 10),
            "a 4 MiB batch fits: {g:?}"
        );
        assert_eq!(g.streams - g.udp_streams, 2);
        assert!(u64::from(g.udp_streams) <= workers);
    }
    let g = wal_geometry(size, 32 << 20, 4 << 20, 64, 2).expect("fits");
    assert_eq!(g.udp_streams, 64, "64 workers still get a stream each");
    let g = wal_geometry(size, 32 << 20, 4 << 20, 256, 2).expect("fits");
    assert!(g.udp_streams < 256, "256 workers share streams");
    let mut s = Settings::default();
    s.statsd.udp_workers = 256;
    assert_eq!(
        s.validate().expect("valid").udp_wal_streams as u32,
        g.udp_streams
    );
}

#[test]
fn off_disables_a_listener() {
    let mut s = Settings::default();
    s.statsd.tcp = "off".into();
    assert_eq!(s.validate().expect("valid").statsd_tcp, None);
}

#[test]
fn flags_override_the_file() {
    let mut s = Settings::from_toml("[aggregate]\nmax_depth = 5\nflush_interval = \"2s\"\n", "f")
        .expect("parse");
    let o = Overrides {
        max_depth: Some(9),
        ..Overrides::default()
    };
    o.apply(&mut s);
    assert_eq!(
        (s.aggregate.max_depth, s.aggregate.flush_interval.as_str()),
        (9, "2s")
    );
}

#[test]
fn password_is_redacted() {
    let mut s = Settings::default();
    s.clickhouse.password = "hunter2".into();
    let text = s.to_redacted_toml();
    assert!(!text.contains("hunter2"));
    assert!(text.contains("<redacted>"));
}

#[test]
fn a_wal_segment_that_cannot_hold_a_64_kib_block_is_refused_by_name() {
    let mut s = Settings::default();
    s.wal.segment_size = "64KiB".into();
    let e = s.validate().expect_err("a 64 KiB TCP read would not fit");
    assert!(e.to_string().contains("wal.segment_size"), "{e}");
    s.wal.segment_size = "68KiB".into();
    s.wal.size = "16MiB".into();
    s.validate().expect("68 KiB holds one");
}

#[test]
fn an_edge_is_configured_by_upstreams_and_a_bad_forward_setting_is_named() {
    assert_eq!(Settings::default().validate().expect("valid").forward, None);
    let s = Settings::from_toml(
        "[forward]\nupstreams = [\"agg1:8126\", \"10.0.0.2:8126\"]\nhost = \"drop\"\nhost_except = [\"fleet.*\"]\n",
        "f",
    )
    .expect("parse");
    let f = s.validate().expect("valid").forward.expect("an edge");
    assert_eq!(f.upstreams, ["agg1:8126", "10.0.0.2:8126"]);
    assert_eq!(
        (f.keep_host, f.host_except.as_slice()),
        (false, &["fleet.*".to_string()][..])
    );
    let bad = [
        ("upstreams = [\"agg1\"]", "forward.upstreams"),
        ("upstreams = [\"agg1:0\"]", "forward.upstreams"),
        ("upstreams = [\"a:1\", \"a:1\"]", "forward.upstreams"),
        ("upstreams = [\"a:1\"]\nhost = \"maybe\"", "forward.host"),
        (
            "upstreams = [\"a:1\"]\nhost_except = [\"\"]",
            "forward.host_except",
        ),
        (
            "upstreams = [\"a:1\"]\nbatch_size = \"1KiB\"",
            "forward.batch_size",
        ),
        (
            "upstreams = [\"a:1\"]\nmax_lag = \"soon\"",
            "forward.max_lag",
        ),
    ];
    for (text, field) in bad {
        let s = Settings::from_toml(&format!("[forward]\n{text}\n"), "f").expect("parse");
        assert_eq!(s.validate().unwrap_err().field, field, "{text}");
    }
    let o = Overrides {
        forward_upstreams: Some(vec!["x:1".into(), "y:2".into()]),
        forward_host: Some("drop".into()),
        ..Overrides::default()
    };
    let mut s = Settings::default();
    o.apply(&mut s);
    let f = s.validate().expect("valid").forward.expect("an edge");
    assert_eq!((f.upstreams.len(), f.keep_host), (2, false));
}

#[test]
fn retention_names_each_bad_setting_and_takes_flags() {
    let s = Settings::from_toml("[retention]\nraw = \"3d\"\n", "f").expect("parse");
    let r = s.validate().expect("valid").retention;
    assert_eq!(r.raw, std::time::Duration::from_secs(3 * 86_400));
    assert_eq!(r.hour, crate::rollup::Retention::default().hour);
    let bad = [
        ("raw = \"soon\"", "retention.raw"),
        ("raw = \"1h\"", "retention.raw"),
        ("minute = \"1d\"", "retention.minute"),
        ("minute = \"40d\"\nhour = \"39d\"", "retention.hour"),
    ];
    for (text, field) in bad {
        let s = Settings::from_toml(&format!("[retention]\n{text}\n"), "f").expect("parse");
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, field, "{text}: {}", e.reason);
    }
    let o = Overrides {
        retention_raw: Some("7d".into()),
        ..Overrides::default()
    };
    let mut s = Settings::default();
    o.apply(&mut s);
    assert_eq!(s.retention.raw, "7d");
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token_from_a_file() {
    let mut s = Settings {
        admin: "0.0.0.0:8127".into(),
        ..Settings::default()
    };
    let e = s.validate().expect_err("no token");
    assert_eq!(e.field, "admin_token");
    assert!(e.reason.contains("admin_token_file"), "{e}");

    let dir = crate::test_dir::test_dir("admin-token");
    let file = dir.join("token");
    let config = dir.join("tallyd.toml");
    std::fs::write(
        &config,
        format!(
            "admin = \"0.0.0.0:8127\"\nadmin_token_file = {:?}\n",
            file.display().to_string()
        ),
    )
    .expect("write");
    let missing = Settings::load(Some(&config), &Overrides::default()).expect_err("no file");
    assert_eq!(missing.field, "admin_token_file");
    std::fs::write(&file, "  s3cret \nignored\n").expect("write");
    s = Settings::load(Some(&config), &Overrides::default()).expect("loads");
    assert_eq!(
        s.validate().expect("valid").admin_token.as_deref(),
        Some("s3cret")
    );
    assert!(
        s.to_redacted_toml()
            .contains("admin_token = \"<redacted>\"")
    );
    assert!(!s.to_redacted_toml().contains("s3cret"));
}

#[test]
fn a_bad_metric_budget_names_its_field() {
    let text = "[[cardinality.metric]]\nname = \"api.*\"\nmax_keys = 0\n";
    let s = Settings::from_toml(text, "t.toml").expect("parses");
    let e = s.validate().expect_err("refused");
    assert_eq!(e.field, "cardinality.metric[0].max_keys");
    let text = "[[cardinality.metric]]\nname = \"api.*\"\nmax_keys = 5\n[[cardinality.metric]]\nname = \"\"\nmax_keys = 5\n";
    let e = Settings::from_toml(text, "t.toml")
        .expect("parses")
        .validate();
    assert_eq!(e.expect_err("refused").field, "cardinality.metric[1].name");
    let text =
        "[cardinality]\nmax_keys = 7\n[[cardinality.metric]]\nname = \"api.*\"\nmax_keys = 5\n";
    let c = Settings::from_toml(text, "t.toml")
        .expect("parses")
        .validate()
        .expect("valid");
    assert_eq!(
        (c.budgets.limit(b"api.x"), c.budgets.limit(b"db.x")),
        (5, 7)
    );
}

/// A fixture file's path (the certificates the TLS unit tests use).
fn fixture(name: &str) -> String {
    format!("{}/src/sink/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn with_tls(listeners: &[&str]) -> Settings {
    let mut s = Settings::default();
    s.tls.listeners = listeners.iter().map(|l| l.to_string()).collect();
    s.tls.cert_file = fixture("self-signed-leaf.pem");
    s.tls.key_file = fixture("self-signed-leaf.key");
    s
}

#[test]
fn tls_listeners_are_named_and_need_a_certificate_and_its_key() {
    let c = with_tls(&["statsd_tcp", "admin"])
        .validate()
        .expect("valid");
    assert_eq!(
        c.auth.tls_on,
        [
            crate::auth::Listener::StatsdTcp,
            crate::auth::Listener::Admin
        ]
    );
    let e = with_tls(&["statsd_udp"])
        .validate()
        .expect_err("no TLS on UDP");
    assert_eq!(e.field, "tls.listeners");
    assert!(e.reason.contains("statsd_tcp, proto_tcp"), "{e}");
    let mut s = with_tls(&["proto_tcp"]);
    s.tls.key_file.clear();
    assert_eq!(s.validate().expect_err("no key").field, "tls.key_file");
    // A key of another certificate: rustls refuses the pair, said of
    // the key.
    let mut s = with_tls(&["proto_tcp"]);
    s.tls.key_file = fixture("self-signed-ca.key");
    let e = s.validate().expect_err("mismatched key");
    assert_eq!(e.field, "tls.key_file");
    assert!(e.reason.contains("not the certificate's"), "{e}");
    // mTLS without a TLS listener would protect nothing.
    let mut s = Settings::default();
    s.tls.client_ca_file = fixture("self-signed-ca.pem");
    assert_eq!(
        s.validate().expect_err("no listener").field,
        "tls.client_ca_file"
    );
}

#[test]
fn an_ingest_token_file_without_a_token_is_refused_and_a_plain_remote_listener_warned_of() {
    let dir = crate::test_dir::test_dir("config-tokens");
    let empty = dir.join("empty");
    std::fs::write(&empty, "# no token yet\n\n").expect("write");
    let mut s = Settings::default();
    s.auth.token_file = empty.display().to_string();
    assert_eq!(s.validate().expect_err("empty").field, "auth.token_file");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "t1\nt2\n").expect("write");
    s.auth.token_file = tokens.display().to_string();
    s.proto.tcp = "0.0.0.0:8126".into();
    let c = s.validate().expect("valid");
    assert!(c.auth.tokens.is_some_and(|t| t.accepts(b"t2")));
    assert!(
        c.warnings.iter().any(|w| w.contains("proto_tcp (0.0.0.0:8126) asks for a token but does not speak TLS")),
        "{:?}",
        c.warnings
    );
    s.tls = with_tls(&["proto_tcp"]).tls;
    let c = s.validate().expect("valid");
    assert!(
        !c.warnings.iter().any(|w| w.contains("in clear")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn forward_tls_files_need_forward_tls() {
    let mut s = Settings::default();
    s.forward.upstreams = vec!["aggregator:8126".into()];
    s.forward.ca_file = fixture("self-signed-ca.pem");
    assert_eq!(s.validate().expect_err("tls off").field, "forward.tls");
    s.forward.tls = true;
    let c = s.validate().expect("valid");
    assert!(
        c.forward
            .is_some_and(|f| f.tls.is_some_and(|t| t.ca.is_some()))
    );
}

fn replicated() -> Settings {
    let mut s = Settings::default();
    s.replication.servers = vec!["nats://127.0.0.1:4222".into()];
    s.replication.monitor_urls = vec!["http://127.0.0.1:8222".into()];
    s
}

#[test]
fn replication_is_off_without_servers_and_names_the_stream_as_its_rows_host() {
    assert!(
        Settings::default()
            .validate()
            .expect("valid")
            .replication
            .is_none()
    );
    let r = replicated()
        .validate()
        .expect("valid")
        .replication
        .expect("on");
    assert_eq!(
        (r.host.as_str(), r.lease),
        ("TALLYD", Duration::from_secs(10))
    );
    assert!(r.consume);
}

#[test]
fn a_bad_replication_setting_names_its_field_and_why() {
    let mut s = replicated();
    s.replication.lease = "1s".into();
    let e = s.validate().expect_err("a lease under 3s").to_string();
    assert!(
        e.contains("replication.lease") && e.contains("at least 3s"),
        "{e}"
    );
    let mut s = replicated();
    s.replication.monitor_urls.clear();
    let e = s.validate().expect_err("no monitoring URL").to_string();
    assert!(
        e.contains("replication.monitor_urls") && e.contains("fsyncs every write"),
        "{e}"
    );
    let mut s = replicated();
    s.forward.upstreams = vec!["127.0.0.1:8126".into()];
    let e = s.validate().expect_err("an edge that consumes").to_string();
    assert!(e.contains("replication.consume"), "{e}");
    s.replication.consume = false;
    s.validate().expect("an edge that only publishes");
}

#[test]
fn replication_credentials_and_tls_name_their_field_when_wrong() {
    let dir = std::env::temp_dir().join(format!("tallyd-nats-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut s = replicated();
    s.replication.user = "tallyd".into();
    let e = s
        .validate()
        .expect_err("a user without a password")
        .to_string();
    assert!(e.contains("replication.password_file"), "{e}");
    let creds = dir.join("bad.creds");
    std::fs::write(&creds, "not a creds file").expect("write");
    let mut s = replicated();
    s.replication.credentials_file = creds.display().to_string();
    let e = s.validate().expect_err("not a .creds file").to_string();
    assert!(
        e.contains("replication.credentials_file") && e.contains(".creds"),
        "{e}"
    );
    let mut s = replicated();
    s.replication.ca_file = "/nonexistent/ca.pem".into();
    let e = s.validate().expect_err("an unreadable CA").to_string();
    assert!(e.contains("replication.ca_file"), "{e}");
    let token = dir.join("token");
    std::fs::write(&token, "# rotated\nt0ken\n").expect("write");
    let mut s = replicated();
    s.replication.token_file = token.display().to_string();
    s.replication.servers = vec!["tls://127.0.0.1:4222".into()];
    let r = s.validate().expect("valid").replication.expect("on");
    assert_eq!(r.auth.token.as_ref().map(|t| t.expose()), Some("t0ken"));
    assert!(r.auth.tls, "a tls:// server asks for TLS");
    s.replication.user = "tallyd".into();
    s.replication.password_file = token.display().to_string();
    let e = s.validate().expect_err("a token and a user").to_string();
    assert!(e.contains("set one of"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
