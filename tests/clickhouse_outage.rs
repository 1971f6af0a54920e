//! ClickHouse goes away mid-run: tallyd keeps aggregating, retries, and
//! loses nothing once the server is back. Its own binary, because it stops
//! the binary's private server.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{clickhouse, config, send_tcp, settings, wait_for, wait_for_lines};
use tallyd::server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_restarted_mid_run_loses_nothing() {
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
