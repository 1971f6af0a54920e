//! ClickHouse goes away mid-run, or is unreachable when tallyd stops:
//! tallyd keeps aggregating, retries, and loses nothing once the server is
//! back. Its own binary, because it stops
//! the binary's private server.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{clickhouse, config, send_tcp, settings, wait_for, wait_for_lines};
use tallyd::server;

/// The tests here stop this binary's ClickHouse server: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_restarted_mid_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let mut s = settings(ch, "outage");
    s.aggregate.flush_interval = "100ms".into();
    s.aggregate.flush_queue = 2;
    s.clickhouse.timeout = "2s".into();
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");

    send_tcp(tcp, &"before:1|c\n".repeat(100));
    let landed = tokio::task::spawn_blocking(|| {
        wait_for(10, || {
            clickhouse()
                .try_query("SELECT sum(value) FROM outage.counters FINAL")
                .as_deref()
                == Some("100\n")
        })
    })
    .await
    .expect("poll");
    assert!(landed, "first rows did not land");

    tokio::task::spawn_blocking(|| clickhouse().stop())
        .await
        .expect("stop");
    // Many intervals while the server is down: more than the queue holds.
    for i in 0..20 {
        send_tcp(tcp, &format!("during:{}|c\nduring.g:{i}|g\n", i + 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_lines(&running.telemetry, 100 + 40);
    assert!(
        running.telemetry.clickhouse_retries.load(Relaxed) > 0,
        "no insert failed while the server was down"
    );
    assert!(
        running.telemetry.flushes_parked.load(Relaxed) > 0,
        "the full queue never parked a flush"
    );

    tokio::task::spawn_blocking(|| assert!(clickhouse().start(), "restart on the same port"))
        .await
        .expect("start");
    send_tcp(tcp, "after:1|c\n");
    wait_for_lines(&running.telemetry, 100 + 40 + 1);
    assert_eq!(running.shutdown().await, 0, "rows lost at shutdown");

    assert_eq!(
        ch.number("SELECT sum(value) FROM outage.counters FINAL WHERE name = 'during'"),
        210.0
    );
    assert_eq!(
        ch.number("SELECT sum(samples) FROM outage.counters FINAL WHERE name = 'during'"),
        20.0
    );
    assert_eq!(
        ch.number("SELECT argMax(value, version) FROM outage.gauges FINAL WHERE name = 'during.g'"),
        19.0
    );
    assert_eq!(
        ch.number("SELECT sum(value) FROM outage.counters FINAL WHERE name = 'after'"),
        1.0
    );
    assert_eq!(
        ch.number("SELECT sum(value) FROM outage.counters FINAL WHERE name = 'before'"),
        100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_clickhouse_is_unreachable_keeps_everything_for_the_next_start() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let mut s = settings(ch, "unreachable");
    let right_url = s.clickhouse.url.clone();
    s.clickhouse.url = format!("http://127.0.0.1:{}", common::free_port());
    s.aggregate.flush_interval = "100ms".into();
    s.aggregate.flush_queue = 1;
    s.shutdown_timeout = "1s".into();
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    for i in 0..5 {
        send_tcp(tcp, &format!("kept:{}|c\n", i + 1));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_for_lines(&running.telemetry, 5);
    let stopped = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
    assert_eq!(
        stopped,
        Ok(0),
        "the stop must end within its timeout and count nothing lost (the WAL keeps it)"
    );

    // Next start, ClickHouse reachable: the WAL is replayed and written.
    s.clickhouse.url = right_url;
    let running = server::start(config(&s)).await.expect("restart");
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM unreachable.counters FINAL WHERE name = 'kept'"),
        15.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_wal_holds_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let mut s = settings(ch, "long_outage");
    // 2 MiB of WAL: 512 KiB per stream, far less than the raw lines of the
    // outage below (about 1 MiB per UDP stream).
    s.wal.size = "2MiB".into();
    s.wal.segment_size = "256KiB".into();
    s.aggregate.flush_interval = "200ms".into();
    s.aggregate.flush_queue = 2;
    s.clickhouse.timeout = "1s".into();
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    tokio::task::spawn_blocking(|| clickhouse().stop())
        .await
        .expect("stop");
    // 12 s at 300 datagrams/s of 50 lines over 1,000 keys.
    let datagrams = 3600u64;
    tokio::task::spawn_blocking(move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let start = std::time::Instant::now();
        for d in 0..datagrams {
            let text: String = (0..50)
                .map(|i| format!("outage.k{:03}:1|c\n", (d * 50 + i) % 1000))
                .collect();
            sock.send_to(text.as_bytes(), udp).expect("send");
            let due = start + Duration::from_micros(d * 1_000_000 / 300);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    })
    .await
    .expect("sender");
    wait_for_lines(&running.telemetry, datagrams * 50);
    let t = &running.telemetry;
    assert_eq!(t.dropped_wal_full.load(Relaxed), 0, "the WAL filled up");
    assert!(t.flushes_parked.load(Relaxed) > 0, "nothing was parked");
    tokio::task::spawn_blocking(|| assert!(clickhouse().start(), "restart on the same port"))
        .await
        .expect("start");
    let t = std::sync::Arc::clone(&running.telemetry);
    assert!(
        tokio::task::spawn_blocking(move || wait_for(60, || t.backlog_batches.load(Relaxed) == 0))
            .await
            .expect("poll"),
        "the backlog did not drain"
    );
    let t = &running.telemetry;
    let (inserts, flushes) = (t.inserts[0].load(Relaxed), t.flushes.load(Relaxed));
    assert!(
        inserts > 0 && inserts * 2 < flushes,
        "the backlog drained in batches: {inserts} counter inserts for {flushes} flushes"
    );
    running.shutdown().await;
    assert_eq!(
        ch.query("SELECT sum(value), uniqExact(name) FROM long_outage.counters FINAL WHERE name LIKE 'outage.k%' FORMAT TSV"),
        format!("{}\t1000\n", datagrams * 50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_over_its_budget_merges_intervals_and_keeps_totals() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let mut s = settings(ch, "merged");
    let right_url = s.clickhouse.url.clone();
    s.clickhouse.url = format!("http://127.0.0.1:{}", common::free_port());
    s.aggregate.flush_interval = "100ms".into();
    s.aggregate.flush_queue = 1;
    s.spool.max_size = "16KiB".into();
    // Past the budget, about three intervals to a merge.
    s.spool.coarsen = "300ms".into();
    s.shutdown_timeout = "1s".into();
    let data_dir = std::path::PathBuf::from(&s.data_dir);
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    // 30 intervals of 200 keys: about 10 KiB of rows each.
    for round in 0..30 {
        let mut lines = String::new();
        for k in 0..200 {
            lines.push_str(&format!(
                "merged.c{k}:1|c\nmerged.t{}:{}|ms\n",
                k % 10,
                round + 1
            ));
        }
        lines.push_str(&format!("merged.g:{round}|g\nmerged.s:m{round}|s\n"));
        send_tcp(tcp, &lines);
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    wait_for_lines(&running.telemetry, 30 * 402);
    running.shutdown().await;
    let files = std::fs::read_dir(data_dir.join("spool"))
        .expect("spool")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "flush"))
        })
        .count();
    assert!(files < 10, "{files} spool files: intervals were not merged");

    s.clickhouse.url = right_url;
    let running = server::start(config(&s)).await.expect("restart");
    running.shutdown().await;
    assert_eq!(
        ch.query("SELECT sum(value), uniqExact(name), uniqExact(ts) < 30 FROM merged.counters FINAL WHERE name LIKE 'merged.c%' FORMAT TSV"),
        "6000\t200\t1\n"
    );
    assert_eq!(
        ch.query("SELECT sum(count), sum(sum), max(max) FROM merged.timers FINAL WHERE name LIKE 'merged.t%' FORMAT TSV"),
        // 200 samples per round, values 1..=30.
        format!("6000\t{}\t30\n", 200 * (1..=30).sum::<u32>())
    );
    assert_eq!(
        ch.number("SELECT argMax(value, version) FROM merged.gauges FINAL WHERE name = 'merged.g'"),
        29.0
    );
    assert_eq!(
        ch.number("SELECT uniqExact(h) FROM merged.sets FINAL ARRAY JOIN member_hashes AS h WHERE name = 'merged.s'"),
        30.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_udp_workers_start_and_count_exactly() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let mut s = settings(ch, "workers64");
    s.statsd.udp_workers = 64;
    s.wal.size = "64MiB".into();
    let running = server::start(config(&s))
        .await
        .expect("start with 64 UDP workers");
    let udp = running.udp_addr.expect("udp");
    tokio::task::spawn_blocking(move || {
        // Many source ports, as from many senders.
        for c in 0..128 {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..10 {
                sock.send_to(format!("w64.c{}:1|c\n", c % 16).as_bytes(), udp)
                    .expect("send");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .await
    .expect("sender");
    wait_for_lines(&running.telemetry, 1280);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM workers64.counters FINAL WHERE name LIKE 'w64.c%'"),
        1280.0
    );
}

/// A queued flush is sent from its spool file: one damaged at rest while
/// ClickHouse is down is found by its CRC before a byte of it is sent,
/// moved aside (said in /health), its rows lost rather than garbage
/// stored; the sink goes on with the next flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_flush_damaged_on_disk_is_quarantined_and_the_next_ones_land() {
    let _serial = SERIAL.lock().await;
    let ch = clickhouse();
    let mut s = settings(ch, "damaged_queued");
    s.aggregate.flush_interval = "100ms".into();
    s.clickhouse.timeout = "2s".into();
    let spool = std::path::PathBuf::from(&s.data_dir).join("spool");
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let sum = |name: &'static str, fin: &'static str| {
        clickhouse().try_query(&format!(
            "SELECT sum(value) FROM damaged_queued.counters {fin} WHERE name = '{name}' FORMAT TSV"
        ))
    };
    send_tcp(tcp, "before:1|c\n");
    let landed = tokio::task::spawn_blocking(move || {
        wait_for(10, || sum("before", "FINAL").as_deref() == Some("1\n"))
    });
    assert!(landed.await.expect("poll"), "first rows did not land");

    tokio::task::spawn_blocking(|| clickhouse().stop())
        .await
        .expect("stop");
    send_tcp(tcp, &"damaged:1|c\n".repeat(50));
    wait_for_lines(&running.telemetry, 51);
    let files = move || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "flush"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let recorded = files.clone();
    let found = tokio::task::spawn_blocking(move || wait_for(10, || !recorded().is_empty()));
    assert!(found.await.expect("poll"), "the flush was never recorded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for path in files() {
        let mut bytes = std::fs::read(&path).expect("read");
        // The counters body's last byte: after it come five empty tables'
        // 12-byte prefixes and the 8-byte tail (no gauges, nothing
        // absorbed). Only the CRC can tell.
        let at = bytes.len() - 5 * 12 - 8 - 1;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).expect("damage");
    }

    tokio::task::spawn_blocking(|| assert!(clickhouse().start(), "restart on the same port"))
        .await
        .expect("start");
    send_tcp(tcp, "after:1|c\n");
    let landed = tokio::task::spawn_blocking(move || {
        wait_for(30, || sum("after", "FINAL").as_deref() == Some("1\n"))
    });
    assert!(landed.await.expect("poll"), "the next flush did not land");
    let admin = running.admin_addr.expect("admin").port();
    let health = tokio::task::spawn_blocking(move || common::http(admin, "GET", "/health", ""))
        .await
        .expect("health")
        .unwrap_or_default();
    assert!(health.contains("damaged file(s) moved aside"), "{health}");
    assert!(
        running.telemetry.rows_lost_damaged.load(Relaxed) > 0,
        "the rows lost are counted"
    );
    running.shutdown().await;
    for fin in ["", "FINAL"] {
        assert_eq!(sum("damaged", fin).as_deref(), Some("0\n"), "{fin}");
        assert_eq!(sum("after", fin).as_deref(), Some("1\n"), "{fin}");
        assert_eq!(sum("before", fin).as_deref(), Some("1\n"), "{fin}");
    }
}
