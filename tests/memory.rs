//! A crafted flood against the memory budget (`aggregate.max_memory`): its
//! own test binary, so that the resident memory it measures is its own.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::{
    clickhouse, config, crafted_timer_flood, proc_status_kib, send_tcp, settings, wait_for_lines,
};

fn rss_kib() -> u64 {
    proc_status_kib("self", "VmRSS:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_timer_flood_stays_within_max_memory() {
    let ch = clickhouse();
    let mut s = settings(ch, "memory");
    s.aggregate.max_memory = "4MiB".into();
    s.aggregate.flush_interval = "1h".into();
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    send_tcp(tcp, "kept.c:1|c\n");
    wait_for_lines(&running.telemetry, 1);
    let before = rss_kib();
    // 1,000 histogram keys, each one line built for the largest sketch:
    // 32 KiB per key, 32 MiB unbounded (2.4 MB of lines, which the test's
    // WAL holds).
    let flood = crafted_timer_flood(1000);
    send_tcp(tcp, &flood);
    send_tcp(tcp, "kept.c:1|c\n");
    wait_for_lines(&running.telemetry, 1002);
    let grown_kib = rss_kib().saturating_sub(before);
    let t = &running.telemetry;
    assert!(
        grown_kib < 16 * 1024,
        "resident memory grew by {grown_kib} KiB for a 4 MiB budget"
    );
    assert!(t.dropped_memory.load(Relaxed) > 0, "nothing was dropped");
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM memory.counters FINAL WHERE name = 'kept.c'"),
        2.0,
        "a key that existed before the budget was spent still counts"
    );
    // Each kept key turns both its stores dense (2,048 buckets of 8 bytes
    // each, counted as they grow): at most 4 MiB / 32 KiB keys.
    let stored = ch.number("SELECT count() FROM memory.timers FINAL WHERE name LIKE 'flood.t%'");
    assert!(stored > 0.0 && stored <= 128.0, "{stored} timer keys kept");
}
