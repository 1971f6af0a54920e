//! Protobuf ingest against a real ClickHouse: acknowledged batches, exact
//! totals, duplicates (also across a restart), broken connections, bad and
//! oversize frames, UDP batches, and a Python protobuf client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{clickhouse, config, settings, wait_for};
use prost::Message;
use tallyd::client::{ProtoClient, read_ack};
use tallyd::protocol::proto::pb::ack::Status;
use tallyd::protocol::proto::pb::event::Value;
use tallyd::protocol::proto::{Batch, Event, Tag, encode_frame};
use tallyd::server;

fn event(name: &str, value: Value) -> Event {
    Event {
        name: name.into(),
        tags: vec![Tag {
            key: "env".into(),
            value: "prod".into(),
        }],
        value: Some(value),
        sample_rate: 0.0,
        ..Default::default()
    }
}

fn batch(client: &str, sequence: u64, events: Vec<Event>) -> Batch {
    Batch {
        client_id: client.into(),
        sequence,
        events,
        ..Default::default()
    }
}

/// Sends on a blocking thread (the client is std I/O).
async fn send(addr: SocketAddr, batches: Vec<Batch>) -> Vec<(i32, u32)> {
    tokio::task::spawn_blocking(move || {
        let mut client = ProtoClient::new(addr);
        batches
            .iter()
            .map(|b| {
                let ack = client.send(b).expect("ack");
                assert_eq!(ack.sequence, b.sequence);
                (ack.status, ack.rejected_events)
            })
            .collect()
    })
    .await
    .expect("client")
}

const OK: i32 = Status::Ok as i32;
const DUPLICATE: i32 = Status::Duplicate as i32;
const REJECTED: i32 = Status::Rejected as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_batches_arrive_exact() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "proto_exact")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let batches: Vec<Batch> = (1..=20)
        .map(|seq| {
            let mut events: Vec<Event> = (0..250)
                .map(|_| event("jobs.done", Value::Counter(2.0)))
                .collect();
            events.extend((0..250).map(|i| event("jobs.ms", Value::TimerMs(f64::from(i)))));
            events.push(event("jobs.queue", Value::Gauge(seq as f64)));
            events.push(event(
                "jobs.users",
                Value::SetMember(format!("u{}", seq % 3)),
            ));
            batch("worker-1", seq, events)
        })
        .collect();
    let acks = send(addr, batches).await;
    assert!(acks.iter().all(|&a| a == (OK, 0)), "{acks:?}");
    // tallyd's own latencies: each operation that ran has a p50, p99 and
    // max, in that order.
    let admin = running.admin_addr.expect("admin").port();
    let ops = ["proto_ack", "wal_sync", "flush", "insert"];
    let latencies = tokio::task::spawn_blocking(move || {
        let mut last = String::new();
        wait_for(30, || {
            last = common::http(admin, "GET", "/metrics", "").unwrap_or_default();
            ops.iter().all(|op| {
                last.contains(&format!(
                    "tallyd_latency_seconds{{op=\"{op}\",quantile=\"1\"}}"
                ))
            })
        });
        last
    })
    .await
    .expect("metrics");
    for op in ops {
        let q: Vec<f64> = ["0.5", "0.99", "1"]
            .iter()
            .filter_map(|q| {
                let key = format!("tallyd_latency_seconds{{op=\"{op}\",quantile=\"{q}\"}} ");
                latencies
                    .lines()
                    .find_map(|l| l.strip_prefix(&key)?.parse().ok())
            })
            .collect();
        assert!(q.len() == 3 && q[0] <= q[1] && q[1] <= q[2], "{op}: {q:?}");
    }
    assert_eq!(running.shutdown().await, 0);

    let db = "proto_exact";
    assert_eq!(
        ch.query(&format!("SELECT tags, sum(value), sum(samples) FROM {db}.counters FINAL GROUP BY tags FORMAT TSV")),
        "['env:prod']\t10000\t5000\n"
    );
    assert_eq!(
        ch.query(&format!(
            "SELECT sum(count), sum(sum) FROM {db}.timers FINAL FORMAT TSV"
        )),
        "5000\t622500\n"
    );
    assert_eq!(
        ch.number(&format!(
            "SELECT argMax(value, version) FROM {db}.gauges FINAL"
        )),
        20.0
    );
    assert_eq!(
        ch.number(&format!(
            "SELECT uniqExact(h) FROM {db}.sets FINAL ARRAY JOIN member_hashes AS h"
        )),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_counted_once_even_when_sent_again_after_a_restart() {
    let ch = clickhouse();
    let s = settings(ch, "proto_dup");
    let once = batch("shipper", 7, vec![event("dup", Value::Counter(5.0))]);

    let running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let acks = send(addr, vec![once.clone(), once.clone()]).await;
    assert_eq!(acks, vec![(OK, 0), (DUPLICATE, 0)]);
    running.shutdown().await;

    // Same data dir: the dedup state comes back.
    let running = server::start(config(&s)).await.expect("restart");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let next = batch("shipper", 8, vec![event("dup", Value::Counter(1.0))]);
    let acks = send(addr, vec![once, next]).await;
    assert_eq!(acks, vec![(DUPLICATE, 0), (OK, 0)]);
    running.shutdown().await;

    assert_eq!(
        ch.number("SELECT sum(value) FROM proto_dup.counters FINAL WHERE name = 'dup'"),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_batch_and_retried_counts_once() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "proto_cut")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let b = batch(
        "cutter",
        1,
        (0..100)
            .map(|_| event("cut", Value::Counter(1.0)))
            .collect(),
    );
    let frame = encode_frame(&b);
    {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&frame[..frame.len() / 2])
            .expect("half a frame");
    }
    let acks = send(addr, vec![b.clone(), b]).await;
    assert_eq!(acks, vec![(OK, 0), (DUPLICATE, 0)]);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM proto_cut.counters FINAL"),
        100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_skipped_and_counted_in_the_ack() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "proto_invalid")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let events = vec![
        event("good", Value::Counter(1.0)),
        event("", Value::Counter(1.0)),
        event("bad.timer", Value::TimerMs(-5.0)),
        Event {
            value: None,
            ..event("novalue", Value::Counter(1.0))
        },
        event("good", Value::Counter(2.0)),
    ];
    let acks = send(addr, vec![batch("", 1, events)]).await;
    assert_eq!(acks, vec![(OK, 3)]);
    running.shutdown().await;
    assert_eq!(
        ch.query(
            "SELECT name, sum(value) FROM proto_invalid.counters FINAL GROUP BY name FORMAT TSV"
        ),
        "good\t3\n"
    );
}

/// Reads an ack, then expects the server to close the connection.
fn ack_then_close(s: &mut TcpStream) -> tallyd::protocol::proto::Ack {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let ack = read_ack(s).expect("an ack");
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).expect("closed"),
        0,
        "the connection stays open"
    );
    ack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_is_rejected_and_other_connections_go_on() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "proto_bad")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let (bad_ack, good) = tokio::task::spawn_blocking(move || {
        let mut other = ProtoClient::new(addr);
        other
            .send(&batch("", 1, vec![event("fine", Value::Counter(1.0))]))
            .expect("first");
        let mut bad = TcpStream::connect(addr).expect("connect");
        bad.write_all(&[5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .expect("garbage");
        let bad_ack = ack_then_close(&mut bad);
        let good = other
            .send(&batch("", 2, vec![event("fine", Value::Counter(1.0))]))
            .expect("second");
        (bad_ack, good)
    })
    .await
    .expect("client");
    assert_eq!(bad_ack.status, REJECTED);
    assert!(
        bad_ack.message.contains("undecodable"),
        "{}",
        bad_ack.message
    );
    assert_eq!(good.status, OK);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM proto_bad.counters FINAL"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_is_rejected_and_the_connection_closed() {
    let ch = clickhouse();
    let mut s = settings(ch, "proto_big");
    s.proto.max_frame = "1KiB".into();
    let running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let big = batch(
        "",
        1,
        (0..200)
            .map(|_| event("big", Value::Counter(1.0)))
            .collect(),
    );
    let ack = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&encode_frame(&big)).expect("write");
        ack_then_close(&mut s)
    })
    .await
    .expect("client");
    assert_eq!(ack.status, REJECTED);
    assert!(ack.message.contains("1024 byte limit"), "{}", ack.message);
    assert_eq!(running.telemetry.proto_frames_too_large.load(Relaxed), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_batches_count_once_per_sequence() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "proto_udp")))
        .await
        .expect("start");
    let addr = running.proto_udp_addr.expect("proto udp");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for seq in 1..=10u64 {
        let b = batch(
            "udp-client",
            seq,
            (0..10).map(|_| event("udp", Value::Counter(1.0))).collect(),
        );
        sock.send_to(&b.encode_to_vec(), addr).expect("send");
        sock.send_to(&b.encode_to_vec(), addr)
            .expect("send the same again");
    }
    let t = std::sync::Arc::clone(&running.telemetry);
    assert!(
        tokio::task::spawn_blocking(move || wait_for(10, || t.proto_acks[0].load(Relaxed)
            + t.proto_acks[1].load(Relaxed)
            >= 20))
        .await
        .expect("wait"),
        "not every datagram arrived"
    );
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM proto_udp.counters FINAL"),
        100.0
    );
}

/// The `tallyd_dropped_total{reason="udp_kernel",listener="proto"}` figure.
fn proto_kernel_drops(admin: u16) -> Option<u64> {
    let metrics = common::http(admin, "GET", "/metrics", "")?;
    let line = metrics.lines().find(|l| {
        l.starts_with("tallyd_dropped_total{reason=\"udp_kernel\",listener=\"proto\"}")
    })?;
    line.rsplit(' ').next()?.parse().ok()
}

/// More one-event batches than the host takes, each from a client of its
/// own (past `proto.max_clients`): every datagram is counted, as received
/// (by its outcome) or as dropped by the kernel, and every accepted one is
/// stored exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_counts_every_datagram_as_received_or_dropped() {
    let ch = clickhouse();
    let mut s = settings(ch, "proto_flood");
    s.statsd.udp_recv_buffer = "64KiB".into();
    s.proto.max_clients = 50_000;
    let running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_udp_addr.expect("proto udp");
    let admin = running.admin_addr.expect("admin").port();
    let sent: u64 = tokio::task::spawn_blocking(move || {
        let senders: Vec<_> = (0..2)
            .map(|t| {
                std::thread::spawn(move || {
                    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
                    let mut sent = 0u64;
                    for i in 0..100_000u64 {
                        let b = batch(
                            &format!("flood-{t}-{i}"),
                            1,
                            vec![event("flood", Value::Counter(1.0))],
                        );
                        if sock.send_to(&b.encode_to_vec(), addr).is_ok() {
                            sent += 1;
                        }
                    }
                    sent
                })
            })
            .collect();
        senders.into_iter().map(|h| h.join().expect("sender")).sum()
    })
    .await
    .expect("senders");
    let t = std::sync::Arc::clone(&running.telemetry);
    let received = move || t.proto_acks.iter().map(|a| a.load(Relaxed)).sum::<u64>();
    let counted = tokio::task::spawn_blocking(move || {
        let mut last = (0, 0);
        wait_for(60, || {
            last = (received(), proto_kernel_drops(admin).unwrap_or(0));
            last.0 + last.1 == sent
        });
        last
    })
    .await
    .expect("wait");
    assert_eq!(
        counted.0 + counted.1,
        sent,
        "received, dropped: {counted:?}"
    );
    assert!(counted.1 > 0, "the flood never overflowed the socket");
    let ok = running.telemetry.proto_acks[0].load(Relaxed);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM proto_flood.counters FINAL"),
        ok as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_protobuf_client_is_understood() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "proto_python")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python_client.py");
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(proto_dir)
            .arg(addr.to_string())
            .output()
            .expect("python3 runs")
    })
    .await
    .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client failed (scripts/test.sh installs protobuf and grpcio-tools):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "ack 1 OK 1\nack 2 DUPLICATE 0\n");
    running.shutdown().await;
    assert_eq!(
        ch.query("SELECT name, tags, sum(value) FROM proto_python.counters FINAL GROUP BY name, tags FORMAT TSV"),
        "py.requests\t['lang:python','region:eu']\t42\n"
    );
    assert_eq!(
        ch.number("SELECT sum(count) FROM proto_python.timers FINAL WHERE name = 'py.latency'"),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_answers_overloaded_after_the_timeout() {
    let ch = clickhouse();
    let mut s = settings(ch, "proto_full");
    // Nothing is ever confirmed (no ClickHouse there), so the small ring fills.
    s.clickhouse.url = format!("http://127.0.0.1:{}", common::free_port());
    s.wal.size = "512KiB".into();
    s.wal.segment_size = "68KiB".into();
    s.proto.overload_timeout = "200ms".into();
    s.shutdown_timeout = "1s".into();
    let running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let statuses = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut statuses = Vec::new();
        for seq in 1..=40u64 {
            let b = batch(
                "filler",
                seq,
                (0..1000)
                    .map(|_| event("fill", Value::Counter(1.0)))
                    .collect(),
            );
            s.write_all(&encode_frame(&b)).expect("write");
            let ack = read_ack(&mut s).expect("ack");
            statuses.push(ack.status);
            if ack.status == Status::Overloaded as i32 {
                break;
            }
        }
        statuses
    })
    .await
    .expect("client");
    assert_eq!(
        statuses.last(),
        Some(&(Status::Overloaded as i32)),
        "{statuses:?}"
    );
    assert!(
        statuses[..statuses.len() - 1].iter().all(|&s| s == OK),
        "{statuses:?}"
    );
    assert!(running.telemetry.dropped_wal_full.load(Relaxed) > 0);
    running.shutdown().await;
}
