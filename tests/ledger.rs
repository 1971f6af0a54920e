//! Exactly-once as production runs it, against a real ClickHouse: protobuf
//! batches in any order and on any connection, two instances with one host
//! id, a table whose schema drifts under a running tallyd, and a disk that
//! fails a sync, fills up or tears a write (through the filesystem seam).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{clickhouse, config, http, proto_batch, send_tcp, settings, wait_for, wait_for_lines};
use prost::Message;
use tallyd::client::read_ack;
use tallyd::fs::{Fault, FaultyFs};
use tallyd::protocol::proto::pb::ack::Status;
use tallyd::protocol::proto::{Batch, encode_frame};
use tallyd::server;

const OK: i32 = Status::Ok as i32;
const DUPLICATE: i32 = Status::Duplicate as i32;
const OVERLOADED: i32 = Status::Overloaded as i32;

/// Sends `b` on `s` and returns the ack's status.
fn send(s: &mut TcpStream, b: &Batch) -> i32 {
    s.write_all(&encode_frame(b)).expect("write");
    let ack = read_ack(s).expect("ack");
    assert_eq!(ack.sequence, b.sequence);
    ack.status
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Runs blocking client code off the runtime's workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_then_later_seq_then_retry_counts_once() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_overload");
    // A 1 h interval keeps everything in the WAL: the small ring fills.
    s.aggregate.flush_interval = "1h".into();
    s.wal.size = "512KiB".into();
    s.wal.segment_size = "128KiB".into();
    s.wal.tcp_streams = 1; // every connection appends to the one full ring
    s.proto.overload_timeout = "200ms".into();
    let mut running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let (filled, seven) = blocking(move || {
        let mut c = connect(addr);
        let mut filled = 0;
        for seq in 1..=100u64 {
            match send(&mut c, &proto_batch("filler", seq, "fill", 1000, 1.0)) {
                OK => filled += 1,
                OVERLOADED => break,
                other => panic!("status {other}"),
            }
        }
        // Pipelined: 7 is refused while the ring is full.
        let mut c = connect(addr);
        let seven = send(&mut c, &proto_batch("c", 7, "c.x", 1000, 7.0));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("closed after OVERLOADED");
        assert!(rest.is_empty(), "nothing after OVERLOADED");
        (filled, seven)
    })
    .await;
    assert!(filled > 0);
    assert_eq!(seven, OVERLOADED);
    let admin = running.admin_addr.expect("admin").port();
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    assert!(
        health
            .as_deref()
            .is_some_and(|h| h.contains("degraded: the WAL was full")),
        "{health:?}"
    );
    // A flush releases the ring: 8 goes through, then 7 is retried.
    let mut quick = s.clone();
    quick.aggregate.flush_interval = "100ms".into();
    running.reload(config(&quick)).await;
    let t = Arc::clone(&running.telemetry);
    assert!(blocking(move || wait_for(10, || t.flushes.load(Relaxed) > 0)).await);
    let statuses = blocking(move || {
        let mut c = connect(addr);
        [
            send(&mut c, &proto_batch("c", 8, "c.x", 1000, 8.0)),
            send(&mut c, &proto_batch("c", 7, "c.x", 1000, 7.0)),
            send(&mut c, &proto_batch("c", 7, "c.x", 1000, 7.0)),
        ]
    })
    .await;
    assert_eq!(statuses, [OK, OK, DUPLICATE]);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_overload.counters FINAL WHERE name = 'c.x'"),
        15000.0
    );
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_overload.counters FINAL WHERE name = 'fill'"),
        f64::from(filled) * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_batches_reordered_all_count_once() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "ledger_udp")))
        .await
        .expect("start");
    let addr = running.proto_udp_addr.expect("proto udp");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for round in 0..2 {
        for seq in [5u64, 3, 1, 4, 2] {
            let b = proto_batch("reorder", seq, "udp.r", 10, seq as f64);
            sock.send_to(&b.encode_to_vec(), addr).expect("send");
        }
        if round == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let t = Arc::clone(&running.telemetry);
    let answered = move || t.proto_acks[0].load(Relaxed) + t.proto_acks[1].load(Relaxed);
    let done = answered.clone();
    assert!(
        blocking(move || wait_for(10, || done() >= 10)).await,
        "datagrams lost"
    );
    let acks = &running.telemetry.proto_acks;
    assert_eq!((acks[0].load(Relaxed), acks[1].load(Relaxed)), (5, 5));
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_udp.counters FINAL WHERE name = 'udp.r'"),
        150.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_two_connections_counts_each_batch_once() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "ledger_two_conns")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let statuses = blocking(move || {
        let (mut a, mut b) = (connect(addr), connect(addr));
        let one = |seq| proto_batch("shared", seq, "two.c", 10, 1.0);
        vec![
            send(&mut a, &one(2)),
            send(&mut b, &one(1)),
            send(&mut a, &one(4)),
            send(&mut b, &one(3)),
            send(&mut b, &one(2)),
            send(&mut a, &one(1)),
        ]
    })
    .await;
    assert_eq!(statuses, [OK, OK, OK, OK, DUPLICATE, DUPLICATE]);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_two_conns.counters FINAL WHERE name = 'two.c'"),
        40.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_send_runs_default_client_id_both_count() {
    let ch = clickhouse();
    let running = server::start(config(&settings(ch, "ledger_send_runs")))
        .await
        .expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp").to_string();
    blocking(move || {
        for _ in 0..2 {
            // The same first sequence: only the client id tells the runs apart.
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
                .args(["send", "--proto", &addr, "--sequence", "1"])
                .args(["runs.c:1|c", "runs.c:2|c"])
                .output()
                .expect("tallyd send");
            let text = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("(0 duplicates)"), "{text}");
        }
    })
    .await;
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_send_runs.counters FINAL WHERE name = 'runs.c'"),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_same_host_id_keep_both_rows() {
    let ch = clickhouse();
    let s = settings(ch, "ledger_twins");
    let mut other = settings(ch, "ledger_twins");
    other.host_id = s.host_id.clone();
    let a = server::start(config(&s)).await.expect("start a");
    let b = server::start(config(&other)).await.expect("start b");
    let lines: String = (0..100).map(|_| "twins.c:1|c\n").collect();
    for r in [&a, &b] {
        send_tcp(r.tcp_addr.expect("tcp"), &lines);
    }
    for r in [&a, &b] {
        let t = Arc::clone(&r.telemetry);
        blocking(move || wait_for_lines(&t, 100)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(
        ch.query("SELECT sum(value), uniqExact(host) FROM ledger_twins.counters FINAL WHERE name = 'twins.c' FORMAT TSV"),
        "200\t1\n"
    );
}

/// A golden image, a VM clone or a restored backup carries the data dir's
/// identity to another host: both then flush under the same instance and
/// flush ids. On 22.2+ the token must still tell their inserts apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clones_of_a_data_dir_on_two_hosts_keep_both_rows() {
    let ch = clickhouse();
    let s = settings(ch, "ledger_clones");
    server::start(config(&s))
        .await
        .expect("first start")
        .shutdown()
        .await;
    let mut clone = settings(ch, "ledger_clones");
    clone.host_id = "cloned-host".into();
    for file in ["instance", "dedup", "gauges.log"] {
        let from = std::path::Path::new(&s.data_dir).join(file);
        if from.exists() {
            std::fs::copy(&from, std::path::Path::new(&clone.data_dir).join(file)).expect("copy");
        }
    }
    let a = server::start(config(&s)).await.expect("start a");
    let b = server::start(config(&clone)).await.expect("start b");
    let lines: String = (0..100).map(|_| "clones.c:1|c\n").collect();
    for round in 0..3 {
        for r in [&a, &b] {
            send_tcp(r.tcp_addr.expect("tcp"), &lines);
        }
        for r in [&a, &b] {
            let t = Arc::clone(&r.telemetry);
            blocking(move || wait_for_lines(&t, 100 * (round + 1))).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!("SELECT sum(value), uniqExact(host) FROM ledger_clones.counters {fin} WHERE name = 'clones.c' FORMAT TSV")),
            "600\t2\n",
            "{fin}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_blocks_table_keeps_data_and_resumes() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_drift");
    s.aggregate.flush_interval = "100ms".into();
    s.clickhouse.retry_initial = "50ms".into();
    s.clickhouse.retry_max = "200ms".into();
    let running = server::start(config(&s)).await.expect("start");
    let (tcp, admin) = (
        running.tcp_addr.expect("tcp"),
        running.admin_addr.expect("admin").port(),
    );
    let lines: String = (0..100).map(|_| "drift.c:1|c\n").collect();
    send_tcp(tcp, &lines);
    assert!(
        blocking(move || wait_for(10, || clickhouse()
            .try_query("SELECT sum(value) FROM ledger_drift.counters FINAL WHERE name = 'drift.c'")
            .as_deref()
            == Some("100\n")))
        .await
    );
    // An operator's ALTER: tallyd's rows no longer fit the table (RowBinary
    // would land them as garbage strings: the column check must block).
    ch.query("ALTER TABLE ledger_drift.counters MODIFY COLUMN value String");
    send_tcp(tcp, &lines);
    let t = Arc::clone(&running.telemetry);
    assert!(
        blocking(move || wait_for(10, || t.tables_blocked[0].load(Relaxed) == 1)).await,
        "the table was not blocked"
    );
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    assert!(
        health
            .as_deref()
            .is_some_and(|h| h.contains("counters (schema drift)")),
        "{health:?}"
    );
    // More data while blocked: kept too.
    send_tcp(tcp, &lines);
    let t = Arc::clone(&running.telemetry);
    blocking(move || wait_for_lines(&t, 300)).await;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ch.number(
            "SELECT sum(toFloat64(value)) FROM ledger_drift.counters FINAL WHERE name = 'drift.c'"
        ),
        100.0,
        "nothing lands while the table is blocked"
    );
    ch.query("ALTER TABLE ledger_drift.counters MODIFY COLUMN value Float64");
    let t = Arc::clone(&running.telemetry);
    assert!(
        blocking(move || wait_for(10, || t.tables_blocked[0].load(Relaxed) == 0)).await,
        "the table stayed blocked"
    );
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_drift.counters FINAL WHERE name = 'drift.c'"),
        300.0
    );
}

/// A drifted table holds only itself: the other tables of its flushes go
/// on, and its own rows land, each once, when it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_sets_table_does_not_stop_counters() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_drift_sets");
    s.aggregate.flush_interval = "100ms".into();
    s.clickhouse.retry_initial = "50ms".into();
    s.clickhouse.retry_max = "200ms".into();
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let round = |r: usize| -> String {
        (0..50)
            .map(|i| format!("drift2.c:1|c\ndrift2.s:m{r}-{i}|s\n"))
            .collect()
    };
    send_tcp(tcp, &round(0));
    let counters = "SELECT sum(value) FROM ledger_drift_sets.counters WHERE name = 'drift2.c'";
    assert!(
        blocking(
            move || wait_for(10, || clickhouse().try_query(counters).as_deref()
                == Some("50\n"))
        )
        .await
    );
    ch.query("ALTER TABLE ledger_drift_sets.sets MODIFY COLUMN samples String");
    for r in 1..=3 {
        send_tcp(tcp, &round(r));
        let want = format!("{}\n", 50 * (r + 1));
        assert!(
            blocking(
                move || wait_for(10, || clickhouse().try_query(counters).as_deref()
                    == Some(want.as_str()))
            )
            .await,
            "counters stopped behind the blocked sets table (round {r}): {:?} {:?}",
            clickhouse().try_query(counters),
            http(
                running.admin_addr.expect("admin").port(),
                "GET",
                "/metrics",
                ""
            )
        );
    }
    let t = Arc::clone(&running.telemetry);
    assert_eq!(t.tables_blocked[3].load(Relaxed), 1, "sets is blocked");
    assert_eq!(t.tables_blocked[0].load(Relaxed), 0, "counters is not");
    ch.query("ALTER TABLE ledger_drift_sets.sets MODIFY COLUMN samples UInt64");
    assert!(
        blocking(move || wait_for(10, || t.tables_blocked[3].load(Relaxed) == 0)).await,
        "the sets table stayed blocked"
    );
    running.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT count() FROM ledger_drift_sets.sets {fin} ARRAY JOIN member_hashes WHERE name = 'drift2.s' FORMAT TSV"
            )),
            "200\n",
            "{fin}"
        );
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value) FROM ledger_drift_sets.counters {fin} WHERE name = 'drift2.c' FORMAT TSV"
            )),
            "200\n",
            "{fin}"
        );
    }
}

/// The WAL directory is lost (or the WAL turned off and on) while the
/// spool holds a backlog: generation ids go on past the spool's, and the
/// WAL must not wait for the generations it never held, or the ring, once
/// lapped, refuses every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wal_dir_with_a_backlog_then_more_than_a_ring_of_traffic_loses_nothing() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_wal_lost");
    s.aggregate.flush_interval = "100ms".into();
    s.shutdown_timeout = "1s".into();
    s.wal.size = "1MiB".into();
    s.wal.segment_size = "128KiB".into();
    s.wal.tcp_streams = 1;
    let mut down = s.clone();
    down.clickhouse.url = format!("http://127.0.0.1:{}", common::free_port());
    let running = server::start(config(&down)).await.expect("start");
    send_tcp(running.tcp_addr.expect("tcp"), &"lost.c:1|c\n".repeat(100));
    let t = Arc::clone(&running.telemetry);
    assert!(
        blocking(move || wait_for(10, || t.tcp.lines.load(Relaxed) >= 100
            && t.flushes.load(Relaxed) >= 1))
        .await,
        "the backlog's interval was not recorded"
    );
    running.shutdown().await;
    std::fs::remove_dir_all(std::path::Path::new(&s.data_dir).join("wal")).expect("rm -rf wal");
    let running = server::start(config(&s))
        .await
        .expect("start without its wal/");
    let tcp = running.tcp_addr.expect("tcp");
    // 2.4 MB through a 1 MiB ring, over TCP (which waits for room).
    for round in 1..=6u64 {
        send_tcp(tcp, &"lost.c:1|c\n".repeat(40_000));
        let t = Arc::clone(&running.telemetry);
        assert!(
            blocking(move || wait_for(20, || t.tcp.lines.load(Relaxed) >= 40_000 * round)).await,
            "the ring refused records after a lap (round {round}): {:?}",
            http(
                running.admin_addr.expect("admin").port(),
                "GET",
                "/metrics",
                ""
            )
        );
    }
    running.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value) FROM ledger_wal_lost.counters {fin} WHERE name = 'lost.c' FORMAT TSV"
            )),
            "240100\n",
            "{fin}"
        );
    }
}

/// A wall clock an hour fast, then stepped back by NTP, while running and
/// across restarts: the README's newest-gauge query returns the value sent
/// last (a gauge stamped for an earlier moment never overtakes it), and
/// every counter is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_an_hour_fast_then_stepped_back_keeps_the_newest_gauge_newest() {
    use std::sync::atomic::AtomicI64;
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_clock");
    s.aggregate.flush_interval = "100ms".into();
    let offset = Arc::new(AtomicI64::new(3600));
    let clock: tallyd::flush::Clock = {
        let offset = Arc::clone(&offset);
        Arc::new(move || {
            let wall = tallyd::clock::wall_clock();
            let by = Duration::from_secs(offset.load(Relaxed).unsigned_abs());
            if offset.load(Relaxed) >= 0 {
                wall + by
            } else {
                wall - by
            }
        })
    };
    let newest =
        "SELECT argMax(value, version) FROM ledger_clock.gauges WHERE name = 'clock.g' FORMAT TSV";
    let counted = |n: u64| {
        move || {
            wait_for(10, || {
                clickhouse()
                    .try_query("SELECT sum(value) FROM ledger_clock.counters WHERE name = 'clock.c' FORMAT TSV")
                    .as_deref()
                    == Some(format!("{n}\n").as_str())
            })
        }
    };
    // Counters and gauges are two INSERTs: wait for the gauge row too.
    let newest_is = |v: u32| {
        move || {
            wait_for(10, || {
                clickhouse().try_query(newest).as_deref() == Some(format!("{v}\n").as_str())
            })
        }
    };
    let stamped_in = || {
        wait_for(10, || {
            clickhouse()
                .try_query("SELECT count() FROM ledger_clock.gauges WHERE name = 'clock.g' AND value = 9 FORMAT TSV")
                .as_deref()
                == Some("1\n")
        })
    };
    let start =
        || server::start_with_clock(config(&s), Arc::new(tallyd::fs::RealFs), Arc::clone(&clock));
    let running = start().await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    send_tcp(tcp, "clock.g:1|g\nclock.c:1|c\n");
    assert!(blocking(counted(1)).await && blocking(newest_is(1)).await);
    // NTP steps the clock back an hour, while tallyd runs.
    offset.store(0, Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_tcp(tcp, "clock.g:2|g\nclock.c:1|c\n");
    assert!(blocking(counted(2)).await);
    assert!(
        blocking(newest_is(2)).await,
        "the value sent last, after the step: {}",
        ch.query(newest)
    );
    assert!(running.telemetry.clock_steps_back.load(Relaxed) >= 1);
    // A gauge stamped half a minute ago is not newer than the live value.
    let stamp = tallyd::clock::wall_clock().as_secs() - 30;
    send_tcp(tcp, &format!("clock.g:9|g|T{stamp}\nclock.c:1|c\n"));
    assert!(blocking(counted(3)).await && blocking(stamped_in).await);
    assert_eq!(
        ch.query(newest),
        "2\n",
        "a stamped gauge overtook the live one"
    );
    running.shutdown().await;
    // Across restarts: a run with the fast clock, then one with it stepped back.
    for (ahead, value, total) in [(3600, 3, 4), (0, 4, 5)] {
        offset.store(ahead, Relaxed);
        let running = start().await.expect("restart");
        send_tcp(
            running.tcp_addr.expect("tcp"),
            &format!("clock.g:{value}|g\nclock.c:1|c\n"),
        );
        assert!(blocking(counted(total)).await);
        running.shutdown().await;
        assert!(
            blocking(newest_is(value)).await,
            "after a restart {ahead} s ahead: {}",
            ch.query(newest)
        );
    }
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value) FROM ledger_clock.counters {fin} WHERE name = 'clock.c' FORMAT TSV"
            )),
            "5\n",
            "{fin}"
        );
    }
}

/// New keys every interval through an outage: merged intervals still grow
/// (their key sets add up). The spool stops at its hard limit: intervals
/// stay open meanwhile, and once ClickHouse is back every line counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_keys_through_an_outage_keep_the_spool_within_its_hard_limit() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_churn");
    s.aggregate.flush_interval = "100ms".into();
    s.spool.max_size = "64KiB".into();
    s.spool.hard_limit = "256KiB".into();
    // Every interval merged (no coarsening): the spool grows to its limit.
    s.spool.coarsen = "0s".into();
    let mut down = s.clone();
    down.clickhouse.url = format!("http://127.0.0.1:{}", common::free_port());
    let mut running = server::start(config(&down)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let mut peak = 0;
    for round in 0..30 {
        let lines: String = (0..1000)
            .map(|i| format!("churn.{round}.{i}:1|c\n"))
            .collect();
        send_tcp(tcp, &lines);
        let t = Arc::clone(&running.telemetry);
        blocking(move || wait_for_lines(&t, 1000 * (round + 1))).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        peak = peak.max(running.telemetry.spool_bytes.load(Relaxed));
    }
    assert!(peak <= 2 * 256 * 1024, "the spool reached {peak} bytes");
    assert!(
        running.telemetry.flushes_deferred.load(Relaxed) > 0,
        "never at the limit"
    );
    let admin = running.admin_addr.expect("admin").port();
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    assert!(
        health
            .as_deref()
            .is_some_and(|h| h.contains("the spool is at spool.hard_limit")),
        "{health:?}"
    );
    // ClickHouse is back (the URL fixed by a reload): everything lands.
    running.reload(config(&s)).await;
    let sum = "SELECT sum(value) FROM ledger_churn.counters WHERE name LIKE 'churn.%' FORMAT TSV";
    assert!(
        blocking(
            move || wait_for(30, || clickhouse().try_query(sum).as_deref()
                == Some("30000\n"))
        )
        .await,
        "{:?}",
        ch.try_query(sum)
    );
    running.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value), count() > 0 FROM ledger_churn.counters {fin} WHERE name LIKE 'churn.%' FORMAT TSV"
            )),
            "30000\t1\n",
            "{fin}"
        );
    }
}

/// A stop while a table is blocked: the spool files keep only the blocked
/// table's rows, so the restart sends those and not the other tables again
/// (on 18.16, with no insert token, they would count twice without FINAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_a_table_is_blocked_sends_only_that_tables_rows() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_blocked_restart");
    s.aggregate.flush_interval = "100ms".into();
    s.clickhouse.retry_initial = "50ms".into();
    s.clickhouse.retry_max = "200ms".into();
    s.shutdown_timeout = "1s".into();
    let running = server::start(config(&s)).await.expect("start");
    send_tcp(running.tcp_addr.expect("tcp"), "br.c:1|c\nbr.s:first|s\n");
    let landed = |sql: &'static str, want: &'static str| {
        move || wait_for(10, || clickhouse().try_query(sql).as_deref() == Some(want))
    };
    let counters =
        "SELECT sum(value) FROM ledger_blocked_restart.counters WHERE name = 'br.c' FORMAT TSV";
    let sets = "SELECT count() FROM ledger_blocked_restart.sets ARRAY JOIN member_hashes WHERE name = 'br.s' FORMAT TSV";
    assert!(blocking(landed(sets, "1\n")).await);
    ch.query("ALTER TABLE ledger_blocked_restart.sets MODIFY COLUMN samples String");
    for round in 0..3 {
        send_tcp(
            running.tcp_addr.expect("tcp"),
            &format!("br.c:1|c\nbr.s:m{round}|s\n"),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(blocking(landed(counters, "4\n")).await, "counters went on");
    assert_eq!(running.telemetry.tables_blocked[3].load(Relaxed), 1);
    running.shutdown().await;
    ch.query("ALTER TABLE ledger_blocked_restart.sets MODIFY COLUMN samples UInt64");
    let running = server::start(config(&s)).await.expect("restart");
    assert!(blocking(landed(sets, "4\n")).await, "the blocked rows land");
    running.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value) FROM ledger_blocked_restart.counters {fin} WHERE name = 'br.c' FORMAT TSV"
            )),
            "4\n",
            "counters sent again ({fin})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fsync_never_acks() {
    let ch = clickhouse();
    let fs = Arc::new(FaultyFs::default());
    let running = server::start_with(config(&settings(ch, "ledger_fsync")), fs.clone())
        .await
        .expect("start");
    let (addr, admin) = (
        running.proto_tcp_addr.expect("proto tcp"),
        running.admin_addr.expect("admin").port(),
    );
    fs.arm("seg-", Fault::SyncFails);
    let c = blocking(move || {
        let mut c = connect(addr);
        c.write_all(&encode_frame(&proto_batch("f", 1, "fsync.c", 10, 1.0)))
            .expect("write");
        c.set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        let early = c.read(&mut byte);
        assert!(
            early.is_err(),
            "an ack arrived while every sync fails: {early:?}"
        );
        c
    })
    .await;
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    assert!(
        health
            .as_deref()
            .is_some_and(|h| h.contains("degraded: a WAL sync failed")),
        "{health:?}"
    );
    fs.heal();
    let status = blocking(move || {
        let mut c = c;
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        read_ack(&mut c).expect("ack after a full sync").status
    })
    .await;
    assert_eq!(status, OK);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_fsync.counters FINAL WHERE name = 'fsync.c'"),
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_intent_does_not_send() {
    let ch = clickhouse();
    let fs = Arc::new(FaultyFs::default());
    let mut s = settings(ch, "ledger_enospc");
    s.aggregate.flush_interval = "100ms".into();
    fs.arm("spool", Fault::NoSpace);
    let running = server::start_with(config(&s), fs.clone())
        .await
        .expect("start");
    let lines: String = (0..100).map(|_| "enospc.c:1|c\n").collect();
    send_tcp(running.tcp_addr.expect("tcp"), &lines);
    let t = Arc::clone(&running.telemetry);
    assert!(
        blocking(move || wait_for(10, || t.spool_errors.load(Relaxed) >= 3)).await,
        "the spool write never failed"
    );
    // Degraded from the first held flush, before the WAL fills and drops.
    let admin = running.admin_addr.expect("admin").port();
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    assert!(
        health
            .as_deref()
            .is_some_and(|h| h.contains("degraded: a closed interval is held")
                && h.contains("could not record it in the spool")),
        "{health:?}"
    );
    assert_eq!(running.telemetry.dropped_wal_full.load(Relaxed), 0);
    let metrics = blocking(move || http(admin, "GET", "/metrics", "")).await;
    assert!(
        metrics
            .as_deref()
            .is_some_and(|m| m.contains("\ntallyd_flush_held 1\n")),
        "{metrics:?}"
    );
    send_tcp(running.tcp_addr.expect("tcp"), &lines);
    let t = Arc::clone(&running.telemetry);
    blocking(move || wait_for_lines(&t, 200)).await;
    assert_eq!(
        ch.try_query("SELECT count() FROM ledger_enospc.counters")
            .map_or(0.0, |n| n.trim().parse().unwrap_or(0.0)),
        0.0,
        "a flush that was not recorded was sent"
    );
    fs.heal();
    let t = Arc::clone(&running.telemetry);
    assert!(blocking(move || wait_for(10, || t.flushes.load(Relaxed) >= 2)).await);
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    assert_eq!(health.as_deref(), Some("ok\n"), "healed");
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM ledger_enospc.counters FINAL WHERE name = 'enospc.c'"),
        200.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_and_damaged_state_and_spool_files_are_quarantined_and_the_start_goes_on() {
    let ch = clickhouse();
    let fs = Arc::new(FaultyFs::default());
    let mut s = settings(ch, "ledger_torn");
    s.aggregate.flush_interval = "100ms".into();
    s.shutdown_timeout = "1s".into();
    let dir = std::path::PathBuf::from(&s.data_dir);
    let running = server::start_with(config(&s), fs.clone())
        .await
        .expect("start");
    // Every state file write tears from now on, as if power failed mid-write.
    for file in ["instance", "dedup", "checkpoint", "gauges"] {
        fs.arm(file, Fault::TornWrite(3));
    }
    let lines: String = (0..100).map(|_| "torn.c:1|c\ntorn.g:+1|g\n").collect();
    send_tcp(running.tcp_addr.expect("tcp"), &lines);
    let t = Arc::clone(&running.telemetry);
    blocking(move || wait_for_lines(&t, 200)).await;
    let t = Arc::clone(&running.telemetry);
    assert!(blocking(move || wait_for(10, || t.spool_errors.load(Relaxed) > 0)).await);
    running.shutdown().await;
    assert!(
        dir.join("instance.tmp").exists(),
        "a torn temp file is left"
    );
    // A pre-ledger release could leave an empty flush id file too.
    std::fs::write(dir.join("flush_id"), "").expect("write");
    let running = server::start(config(&s))
        .await
        .expect("starts after a power loss");
    running.shutdown().await;
    assert_eq!(
        ch.query(
            "SELECT sum(value) FROM ledger_torn.counters FINAL WHERE name = 'torn.c' FORMAT TSV"
        ),
        "100\n"
    );
    // Damage at rest in every state file and in a spool file: each is moved
    // aside, the start goes on, /health says so, and new data counts.
    for file in ["instance", "dedup", "gauges.log"] {
        std::fs::write(dir.join(file), b"\xffdamaged").expect("damage");
    }
    std::fs::write(
        dir.join("spool/00000000000000000001.flush"),
        b"TALLYFLS torn",
    )
    .expect("damage");
    let running = server::start(config(&s))
        .await
        .expect("starts past damaged files");
    let admin = running.admin_addr.expect("admin").port();
    let health = blocking(move || http(admin, "GET", "/health", "")).await;
    let health = health.unwrap_or_default();
    assert!(health.contains("4 damaged file(s) moved aside"), "{health}");
    for file in [
        "instance",
        "dedup",
        "gauges.log",
        "spool/00000000000000000001.flush",
    ] {
        assert!(dir.join(format!("{file}.damaged")).exists(), "{file}");
    }
    send_tcp(running.tcp_addr.expect("tcp"), &lines);
    let t = Arc::clone(&running.telemetry);
    blocking(move || wait_for_lines(&t, 200)).await;
    running.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(
            ch.query(&format!(
                "SELECT sum(value) FROM ledger_torn.counters {fin} WHERE name = 'torn.c' FORMAT TSV"
            )),
            "200\n",
            "{fin}"
        );
    }
    // The gauge memory went with the quarantined `gauges.log` (the spool
    // was empty): the hundred `+1` deltas since resolve against 0, not 100.
    assert_eq!(
        ch.number(
            "SELECT argMax(value, version) FROM ledger_torn.gauges FINAL WHERE name = 'torn.g'"
        ),
        100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_under_sixteen_streaming_connections_ends_in_time_and_keeps_every_acked_batch() {
    let ch = clickhouse();
    let mut s = settings(ch, "ledger_stop");
    s.shutdown_timeout = "3s".into();
    let running = server::start(config(&s)).await.expect("start");
    let addr = running.proto_tcp_addr.expect("proto tcp");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut sent, mut acked) = (0u64, 0u64);
                let Ok(mut conn) = TcpStream::connect(addr) else {
                    return (sent, acked);
                };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let name = format!("stop.c{c}");
                while !stop.load(Relaxed) {
                    let b = proto_batch(&format!("streamer-{c}"), sent + 1, &name, 10, 1.0);
                    if conn.write_all(&encode_frame(&b)).is_err() {
                        break;
                    }
                    sent += 1;
                    match read_ack(&mut conn) {
                        Ok(a) if a.status == OK => acked += 1,
                        _ => break,
                    }
                }
                (sent, acked)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let began = std::time::Instant::now();
    running.shutdown().await;
    let took = began.elapsed();
    stop.store(true, Relaxed);
    let counts: Vec<(u64, u64)> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    for (c, (sent, acked)) in counts.into_iter().enumerate() {
        assert!(acked > 0, "client {c} never got an ack");
        let stored = ch.number(&format!(
            "SELECT sum(value) FROM ledger_stop.counters FINAL WHERE name = 'stop.c{c}'"
        )) as u64;
        assert!(
            stored >= acked * 10 && stored <= sent * 10 && stored.is_multiple_of(10),
            "client {c}: sent {sent}, acked {acked}, stored {stored}"
        );
    }
}
