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
        running.telemetry.flushes_deferred.load(Relaxed) > 0,
        "the full queue never deferred a flush"
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
