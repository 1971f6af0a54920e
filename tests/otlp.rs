//! OTLP/HTTP ingest against a real ClickHouse, with the OpenTelemetry
//! Python SDK and its own OTLP exporter (tests/otlp_client.py) as the
//! client: counters, up-down counters, gauges, histograms and exponential
//! histograms in delta and cumulative temporality land exactly; a kill -9
//! during exports loses and doubles nothing; an SDK restarted with a new
//! start time adds no spike; an identical request re-sent counts once; a
//! full WAL answers 503 with Retry-After and the SDK catches up; bad and
//! oversized bodies get 400 and 413 while other clients go on.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{clickhouse, config, free_port, http, settings, temp_dir, wait_for};
use prost::Message;
use tallyd::protocol::otlp::common::{AnyValue, KeyValue, any_value};
use tallyd::protocol::otlp::metrics::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use tallyd::protocol::otlp::{Request, resource::Resource};
use tallyd::server;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client thread")
}

/// What the SDK client recorded (its JSON line).
#[derive(Debug, Default)]
struct Sent(std::collections::HashMap<String, f64>);

impl Sent {
    fn get(&self, k: &str) -> f64 {
        self.0.get(k).copied().unwrap_or(f64::NAN)
    }
}

/// Runs tests/otlp_client.py to the end.
fn sdk(endpoint: &str, protocol: &str, temporality: &str, service: &str, rounds: u32) -> Sent {
    let out = sdk_child(endpoint, protocol, temporality, service, rounds, 200, &[])
        .wait_with_output()
        .expect("python");
    parse_sent(&out)
}

/// Starts tests/otlp_client.py, with `env` (TLS files and a token, see
/// the script).
fn sdk_child(
    endpoint: &str,
    protocol: &str,
    temporality: &str,
    service: &str,
    rounds: u32,
    interval_ms: u32,
    env: &[(&str, &str)],
) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_client.py");
    let mut python = Command::new("python3");
    if !env.is_empty() {
        // requests takes these over the exporter's own certificate_file
        // (psf/requests#3829): the test's CA must be the one used.
        python
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE");
    }
    python
        .envs(env.iter().copied())
        .arg(script)
        .args([endpoint, protocol, temporality, service])
        .arg(rounds.to_string())
        .arg(interval_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with opentelemetry-sdk (scripts/test.sh installs it)")
}

fn parse_sent(out: &std::process::Output) -> Sent {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK client failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text.lines().last().unwrap_or("");
    let mut sent = Sent::default();
    // A flat JSON object of numbers, booleans and nulls.
    for field in line.trim_matches(['{', '}']).split(", ") {
        if let Some((k, v)) = field.split_once(": ") {
            let v = match v {
                "true" => 1.0,
                "false" => 0.0,
                v => v.parse().unwrap_or(f64::NAN),
            };
            sent.0.insert(k.trim_matches('"').to_owned(), v);
        }
    }
    assert_eq!(sent.get("flushed"), 1.0, "the SDK could not export: {line}");
    sent
}

/// Checks what ClickHouse holds of `service` against what the SDK sent,
/// with and without FINAL (no duplicate rows either way).
fn check(db: &str, service: &str, sent: &Sent, exact_extremes: bool) {
    let ch = clickhouse();
    let tag = format!("has(tags, 'service.name:{service}')");
    for fin in ["FINAL", ""] {
        let q = |what: &str, table: &str, name: &str| {
            ch.number(&format!(
                "SELECT {what} FROM {db}.{table} {fin} WHERE name = '{name}' AND {tag}"
            ))
        };
        assert_eq!(
            q("sum(value)", "counters", "otlp.requests"),
            sent.get("requests"),
            "{service} counters {fin}"
        );
        assert_eq!(
            q("sum(count)", "timers", "otlp.latency"),
            sent.get("latency_count")
        );
        let sum = q("sum(sum)", "timers", "otlp.latency");
        assert!((sum - sent.get("latency_sum")).abs() < 1e-6, "{sum}");
        assert_eq!(q("sum(count)", "timers", "otlp.exp"), sent.get("exp_count"));
        let sum = q("sum(sum)", "timers", "otlp.exp");
        assert!((sum - sent.get("exp_sum")).abs() < 1e-6, "{sum}");
        if exact_extremes {
            assert_eq!(
                q("min(min)", "timers", "otlp.latency"),
                sent.get("latency_min")
            );
            assert_eq!(
                q("max(max)", "timers", "otlp.latency"),
                sent.get("latency_max")
            );
        }
    }
    let last = |name: &str| {
        ch.number(&format!(
            "SELECT argMax(value, ts) FROM (SELECT * FROM {db}.gauges FINAL WHERE name = '{name}' AND {tag})"
        ))
    };
    assert_eq!(last("otlp.inflight"), sent.get("inflight"), "{service}");
    assert_eq!(last("otlp.temperature"), sent.get("temperature"));
    // Promoted resource attributes only; host.name is the row's host.
    let tags = ch.query(&format!(
        "SELECT DISTINCT arrayStringConcat(tags, ',') FROM {db}.counters WHERE {tag} FORMAT TSV"
    ));
    assert!(!tags.contains("process.pid"), "{tags}");
    let hosts = ch.query(&format!(
        "SELECT DISTINCT host FROM {db}.counters WHERE {tag} FORMAT TSV"
    ));
    assert_eq!(hosts.trim(), "otlp-test-host");
}

/// Waits until every table's rows of `service` are in (each table is
/// its own INSERT).
fn wait_rows(db: &str, service: &str, sent: &Sent) {
    let tag = format!("has(tags, 'service.name:{service}')");
    let queries = [
        (
            format!(
                "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'otlp.requests' AND {tag}"
            ),
            sent.get("requests"),
        ),
        (
            format!("SELECT sum(count) FROM {db}.timers FINAL WHERE name = 'otlp.exp' AND {tag}"),
            sent.get("exp_count"),
        ),
    ];
    for (q, want) in queries {
        let ok = wait_for(30, || {
            clickhouse()
                .try_query(&q)
                .and_then(|v| v.trim().parse::<f64>().ok())
                == Some(want)
        });
        assert!(
            ok,
            "{service}: {:?} of {want} ({q})",
            clickhouse().try_query(&q)
        );
    }
}

fn otlp_settings(db: &str) -> tallyd::config::Settings {
    let mut s = settings(clickhouse(), db);
    s.otlp.http = "127.0.0.1:0".into();
    s.otlp.grpc = "127.0.0.1:0".into();
    s
}

/// One raw OTLP/gRPC call (tests/otlp_grpc_probe.py, with grpcio): the
/// status code's name, the RetryInfo delay (empty without one), the message.
fn grpc_probe(addr: SocketAddr, message: &[u8]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_grpc_probe.py");
    let hex: String = message.iter().map(|b| format!("{b:02x}")).collect();
    let mut child = Command::new("python3")
        .arg(script)
        .arg(addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with grpcio");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(hex.as_bytes());
    }
    let out = child.wait_with_output().expect("python3 with grpcio");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_over_http_and_grpc_in_delta_and_cumulative_lands_exactly() {
    let running = server::start(config(&otlp_settings("otlp_sdk")))
        .await
        .expect("start");
    let http_url = format!(
        "http://{}/v1/metrics",
        running.otlp_http_addr.expect("otlp")
    );
    let grpc_url = format!("http://{}", running.otlp_grpc_addr.expect("grpc"));
    blocking(move || {
        let runs = [
            (&http_url, "http", "delta"),
            (&http_url, "http", "cumulative"),
            (&grpc_url, "grpc", "delta"),
            (&grpc_url, "grpc", "cumulative"),
        ]
        .map(|(url, protocol, t)| {
            let service = format!("sdk-{protocol}-{t}");
            let child = sdk_child(url, protocol, t, &service, 12, 200, &[]);
            (service, t, child)
        });
        for (service, t, child) in runs {
            let sent = parse_sent(&child.wait_with_output().expect("python"));
            wait_rows("otlp_sdk", &service, &sent);
            check("otlp_sdk", &service, &sent, t == "delta");
        }
    })
    .await;
    let points = &running.telemetry.otlp.points;
    assert_eq!(points[1].load(Relaxed), 0, "no retries were sent");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_restarted_with_a_new_start_time_adds_no_spike_and_loses_nothing() {
    let running = server::start(config(&otlp_settings("otlp_restart")))
        .await
        .expect("start");
    let url = format!(
        "http://{}/v1/metrics",
        running.otlp_http_addr.expect("otlp")
    );
    blocking(move || {
        let first = sdk(&url, "http", "cumulative", "restarted", 6);
        let second = sdk(&url, "http", "cumulative", "restarted", 9);
        let mut both = Sent::default();
        for k in [
            "requests",
            "exp_count",
            "latency_count",
            "latency_sum",
            "exp_sum",
        ] {
            both.0.insert(k.into(), first.get(k) + second.get(k));
        }
        for k in ["inflight", "temperature"] {
            both.0.insert(k.into(), second.get(k));
        }
        wait_rows("otlp_restart", "restarted", &both);
        check("otlp_restart", "restarted", &both, false);
    })
    .await;
    // Every point of the second process is after tallyd's start: none is
    // a mere reference, none a decrease.
    let points = &running.telemetry.otlp.points;
    assert_eq!(points[2].load(Relaxed) + points[3].load(Relaxed), 0);
    running.shutdown().await;
}

/// A POST of `body` to `/v1/metrics`: (status, headers, body).
fn post(addr: SocketAddr, content_type: &str, extra: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..at]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, out.get(at + 4..).unwrap_or_default().to_vec())
}

fn attr(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// A request of one monotonic Sum `name` with one point.
fn sum_request(
    name: &str,
    temporality: AggregationTemporality,
    start: u64,
    time: u64,
    v: i64,
) -> Request {
    let point = NumberDataPoint {
        attributes: vec![attr("k", "v")],
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsInt(v)),
        ..Default::default()
    };
    Request {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![attr("service.name", "raw")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: name.into(),
                    data: Some(Data::Sum(Sum {
                        data_points: vec![point],
                        aggregation_temporality: temporality as i32,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_request_sent_again_counts_once() {
    let running = server::start(config(&otlp_settings("otlp_again")))
        .await
        .expect("start");
    let addr = running.otlp_http_addr.expect("otlp");
    let t0 = now_ns();
    let requests = [
        sum_request("again.delta", AggregationTemporality::Delta, t0, t0 + 1, 5),
        // A cumulative series that started after tallyd: its first point counts whole.
        sum_request(
            "again.cum",
            AggregationTemporality::Cumulative,
            t0,
            t0 + 1,
            7,
        ),
        sum_request(
            "again.cum",
            AggregationTemporality::Cumulative,
            t0,
            t0 + 2,
            10,
        ),
    ];
    blocking(move || {
        for r in &requests {
            for _ in 0..3 {
                let (status, head, _) =
                    post(addr, "application/x-protobuf", "", &r.encode_to_vec());
                assert_eq!(status, 200, "{head}");
            }
        }
        // The same, as JSON: still the same points, still retries.
        let json = serde_json::to_vec(&requests[0]).expect("json");
        let (status, _, body) = post(addr, "application/json", "", &json);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    })
    .await;
    blocking(|| {
        let ch = clickhouse();
        let ok = wait_for(30, || {
            ch.try_query("SELECT sum(value) FROM otlp_again.counters FINAL WHERE name LIKE 'again.%' FORMAT TSV")
                .as_deref()
                == Some("15\n")
        });
        assert!(ok, "stored {:?}", ch.try_query("SELECT name, sum(value) FROM otlp_again.counters GROUP BY name FORMAT TSV"));
        for fin in ["FINAL", ""] {
            for (name, total) in [("again.delta", 5.0), ("again.cum", 10.0)] {
                assert_eq!(
                    ch.number(&format!("SELECT sum(value) FROM otlp_again.counters {fin} WHERE name = '{name}'")),
                    total,
                    "{name} {fin}"
                );
            }
        }
    })
    .await;
    // 3 + 3 + 3 sends and a JSON one: 3 applied, the rest retries.
    let points = &running.telemetry.otlp.points;
    assert_eq!(points[0].load(Relaxed), 3);
    assert_eq!(points[1].load(Relaxed), 7);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_oversized_bodies_get_400_and_413_and_other_clients_go_on() {
    let mut s = otlp_settings("otlp_bad");
    s.otlp.max_body = "64KiB".into();
    let running = server::start(config(&s)).await.expect("start");
    let addr = running.otlp_http_addr.expect("otlp");
    let grpc = running.otlp_grpc_addr.expect("grpc");
    let t0 = now_ns();
    blocking(move || {
        let garbage = post(addr, "application/x-protobuf", "", b"\xff\xff\xff\xff not protobuf");
        assert_eq!(garbage.0, 400, "{}", garbage.1);
        let json = post(addr, "application/json", "", b"{\"resourceMetrics\": [");
        assert_eq!(json.0, 400, "{}", json.1);
        assert!(String::from_utf8_lossy(&json.2).contains("JSON"), "{:?}", json.2);
        let big = vec![b'x'; 100 << 10];
        assert_eq!(post(addr, "application/x-protobuf", "", &big).0, 413);
        // A gzip bomb: 64 KiB of zeros and more, small on the wire.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 1 << 20]).expect("gzip");
        let bomb = gz.finish().expect("gzip");
        assert_eq!(post(addr, "application/x-protobuf", "Content-Encoding: gzip\r\n", &bomb).0, 413);
        assert_eq!(post(addr, "text/plain", "", b"x").0, 415);
        // The same over gRPC: INVALID_ARGUMENT, and RESOURCE_EXHAUSTED with
        // no RetryInfo (neither is retried).
        let answer = grpc_probe(grpc, b"\xff\xff\xff\xff not protobuf");
        assert!(answer.starts_with("INVALID_ARGUMENT  "), "{answer}");
        let answer = grpc_probe(grpc, &big);
        assert!(answer.starts_with("RESOURCE_EXHAUSTED  "), "{answer}");
        // Another client's request, gzip-compressed, counts.
        let good = sum_request("bad.neighbour", AggregationTemporality::Delta, t0, t0 + 1, 3);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&good.encode_to_vec()).expect("gzip");
        let (status, head, _) = post(
            addr,
            "application/x-protobuf",
            "Content-Encoding: gzip\r\n",
            &gz.finish().expect("gzip"),
        );
        assert_eq!(status, 200, "{head}");
        let ok = wait_for(30, || {
            clickhouse()
                .try_query("SELECT sum(value) FROM otlp_bad.counters WHERE name = 'bad.neighbour' FORMAT TSV")
                .as_deref()
                == Some("3\n")
        });
        assert!(ok);
    })
    .await;
    let r = &running.telemetry.otlp.requests;
    assert_eq!(
        (r[0].load(Relaxed), r[2].load(Relaxed), r[3].load(Relaxed)),
        (1, 4, 3)
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_answers_503_with_retry_after_and_the_sdk_catches_up() {
    let ch = clickhouse();
    let mut s = otlp_settings("otlp_full");
    s.aggregate.flush_interval = "100ms".into();
    s.spool.max_size = "64KiB".into();
    s.spool.hard_limit = "192KiB".into();
    s.spool.coarsen = "0s".into();
    s.wal.size = "512KiB".into();
    s.wal.segment_size = "68KiB".into();
    s.proto.overload_timeout = "100ms".into();
    let mut down = s.clone();
    down.clickhouse.url = format!("http://127.0.0.1:{}", free_port());
    let mut running = server::start(config(&down)).await.expect("start");
    let (tcp, addr) = (
        running.tcp_addr.expect("tcp"),
        running.otlp_http_addr.expect("otlp"),
    );
    // ClickHouse is down: new keys every interval fill the spool to its hard
    // limit, intervals stay open, and the WAL fills.
    let full = blocking(move || {
        let t0 = now_ns();
        for round in 0..400 {
            let lines: String = (0..500)
                .map(|i| format!("fill.{round}.{i}:1|c\n"))
                .collect();
            common::send_tcp(tcp, &lines);
            let r = sum_request(
                "full.probe",
                AggregationTemporality::Delta,
                t0,
                t0 + round + 1,
                1,
            );
            let (status, head, _) = post(addr, "application/x-protobuf", "", &r.encode_to_vec());
            if status == 503 {
                return Some(head);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
    .await
    .expect("the WAL never filled");
    assert!(
        full.to_ascii_lowercase().contains("retry-after: 1"),
        "{full}"
    );
    // gRPC says it as UNAVAILABLE with a RetryInfo of 1 s.
    let grpc = running.otlp_grpc_addr.expect("grpc");
    let t0 = now_ns();
    let probe = sum_request("full.probe", AggregationTemporality::Delta, t0, t0 + 1, 1);
    let answer = blocking(move || grpc_probe(grpc, &probe.encode_to_vec())).await;
    assert!(answer.starts_with("UNAVAILABLE 1 "), "{answer}");
    // The SDK exports into the full WAL: it is answered 503 and retries.
    let url = format!("http://{addr}/v1/metrics");
    let child = blocking(move || sdk_child(&url, "http", "delta", "full", 4, 300, &[])).await;
    let t = std::sync::Arc::clone(&running.telemetry);
    blocking(move || {
        let refused = wait_for(20, || t.otlp.requests[4].load(Relaxed) >= 3);
        assert!(refused, "the SDK was not refused");
    })
    .await;
    // ClickHouse is back: the spool drains, the WAL empties, the SDK's
    // retries land, and nothing it sent is lost.
    running.reload(config(&s)).await;
    let sent = blocking(move || parse_sent(&child.wait_with_output().expect("python"))).await;
    blocking(move || {
        wait_rows("otlp_full", "full", &sent);
        check("otlp_full", "full", &sent, true);
    })
    .await;
    assert!(ch.number("SELECT count() FROM otlp_full.counters WHERE name LIKE 'fill.%'") > 0.0);
    running.shutdown().await;
}

/// tallyd as a process, for kill -9.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, db: &str, otlp: u16, admin: u16) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .arg("run")
        .arg("--data-dir")
        .arg(dir)
        .args(["--host-id", "otlp-crash"])
        .args(["--clickhouse-url", &clickhouse().url()])
        .args(["--clickhouse-database", db])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--otlp-http", &format!("127.0.0.1:{otlp}")])
        .args(["--statsd-udp", "off", "--statsd-tcp", "off"])
        .args(["--proto-udp", "off", "--proto-tcp", "off"])
        .env("TALLYD_WAL_SIZE", "32MiB")
        .stderr(if std::env::var_os("TALLYD_TEST_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn tallyd");
    let mut d = Daemon(child);
    let up = wait_for(30, || {
        d.0.try_wait().ok().flatten().is_none() && http(admin, "GET", "/health", "").is_some()
    });
    assert!(
        up,
        "tallyd did not start (TALLYD_TEST_STDERR=1 shows its log)"
    );
    d
}

#[test]
fn a_kill_9_during_exports_loses_nothing_and_counts_nothing_twice() {
    let dir = temp_dir("otlp-crash");
    let (otlp, admin) = (free_port(), free_port());
    let db = "otlp_crash";
    let daemon = spawn(&dir, db, otlp, admin);
    let url = format!("http://127.0.0.1:{otlp}/v1/metrics");
    let clients = [("delta", "crash-delta"), ("cumulative", "crash-cum")]
        .map(|(t, service)| (service, sdk_child(&url, "http", t, service, 60, 400, &[])));
    // Several exports in (the clients record for 6 s, exporting every
    // 400 ms), tallyd dies mid-stream, and is back a moment later.
    std::thread::sleep(Duration::from_millis(2500));
    drop(daemon);
    // A client born while tallyd is down: its series are new, and its
    // first cumulative point counts whole once tallyd is back.
    let born = sdk_child(&url, "http", "cumulative", "crash-born", 20, 400, &[]);
    std::thread::sleep(Duration::from_millis(1000));
    let daemon = spawn(&dir, db, otlp, admin);
    let [delta, cumulative] = clients;
    for (service, child) in [delta, cumulative, ("crash-born", born)] {
        let sent = parse_sent(&child.wait_with_output().expect("python"));
        wait_rows(db, service, &sent);
        check(db, service, &sent, service == "crash-delta");
    }
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_over_tls_with_a_client_certificate_and_a_bearer_token_lands_exactly() {
    use tallyd::auth::{Listener, Refusal};
    let dir = temp_dir("otlp-tls");
    let (ca, cert, key) = common::certificates(&dir);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "otel-token\n").expect("tokens");
    let mut s = otlp_settings("otlp_tls");
    s.tls.listeners = vec!["otlp_http".into(), "otlp_grpc".into()];
    s.tls.cert_file = cert;
    s.tls.key_file = key;
    s.tls.client_ca_file = ca.clone();
    s.auth.token_file = tokens.display().to_string();
    s.proto.udp = "off".into();
    let running = server::start(config(&s)).await.expect("start");
    let http_url = format!(
        "https://{}/v1/metrics",
        running.otlp_http_addr.expect("otlp")
    );
    let grpc_url = format!("https://{}", running.otlp_grpc_addr.expect("grpc"));
    let t = std::sync::Arc::clone(&running.telemetry);
    blocking(move || {
        let (cert, key) = (
            dir.join("client.crt").display().to_string(),
            dir.join("client.key").display().to_string(),
        );
        let good = [
            ("OTLP_CA_FILE", ca.as_str()),
            ("OTLP_CLIENT_CERT", cert.as_str()),
            ("OTLP_CLIENT_KEY", key.as_str()),
            ("OTLP_TOKEN", "otel-token"),
        ];
        let runs = [(&http_url, "http"), (&grpc_url, "grpc")].map(|(url, protocol)| {
            let service = format!("tls-{protocol}");
            let child = sdk_child(url, protocol, "delta", &service, 6, 200, &good);
            (service, child)
        });
        // A wrong token, over the same TLS: refused (401), nothing lands.
        let mut wrong = good;
        wrong[3].1 = "not-the-token";
        let refused = sdk_child(&http_url, "http", "delta", "tls-wrong", 2, 200, &wrong)
            .wait_with_output()
            .expect("python");
        for (service, child) in runs {
            let sent = parse_sent(&child.wait_with_output().expect("python"));
            wait_rows("otlp_tls", &service, &sent);
            check("otlp_tls", &service, &sent, true);
        }
        assert!(
            refused.status.success(),
            "the SDK only logs a refused export"
        );
        assert!(t.refused.count(Listener::OtlpHttp, Refusal::TokenWrong) >= 1);
    })
    .await;
    running.shutdown().await;
    assert_eq!(
        clickhouse().query(
            "SELECT count() FROM otlp_tls.counters WHERE has(tags, 'service.name:tls-wrong')"
        ),
        "0\n"
    );
}
