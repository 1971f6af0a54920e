//! Cardinality control end to end: one metric with an exploding tag folds
//! past its key budget into its overflow series, exactly, while the
//! others are still admitted. Its own test binary, so that the memory it
//! measures is its own.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use common::{clickhouse, config, proc_status_kib, send_tcp, settings, wait_for_lines};
use tallyd::config::MetricBudget;

const VALUES: u64 = 1_000_000;
const OTHERS: u64 = 10_000;
const BUDGET: u32 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_values_of_one_tag_fold_into_the_overflow_series_within_memory_and_exactly() {
    let ch = clickhouse();
    let mut s = settings(ch, "cardinality");
    s.cardinality.metric = vec![MetricBudget {
        name: "flood.*".into(),
        max_keys: BUDGET,
    }];
    // Without the budget, a million keys would need far more than this:
    // the memory budget would drop values, and the sums would be short.
    s.aggregate.max_memory = "32MiB".into();
    // One interval, so that the folded count is exact: the first 1,000
    // users are admitted and every later value folds.
    s.aggregate.flush_interval = "1h".into();
    s.aggregate.max_depth = 10 * VALUES;
    s.wal.size = "256MiB".into();
    s.wal.segment_size = "8MiB".into();
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let telemetry = Arc::clone(&running.telemetry);
    let tcp = running.tcp_addr.expect("tcp");
    // Other metrics' new keys arrive among the flood, after its budget is
    // spent.
    let mut flood = String::with_capacity(40 * VALUES as usize);
    for u in 0..VALUES {
        flood.push_str(&format!("flood.req:1|c|#user:u{u},env:prod\n"));
        if u % (VALUES / OTHERS) == VALUES / OTHERS - 1 {
            flood.push_str(&format!("other.k{u}:1|c\n"));
        }
    }
    let rss = || proc_status_kib("self", "RssAnon:");
    let before = rss();
    let sender = std::thread::spawn(move || send_tcp(tcp, &flood));
    wait_for_lines(&telemetry, VALUES + OTHERS);
    sender.join().expect("sender");
    let grown_kib = rss().saturating_sub(before);
    assert!(
        grown_kib < 24 * 1024,
        "resident memory grew by {grown_kib} KiB for {BUDGET} keys and an overflow series"
    );
    let t = &telemetry;
    for (what, dropped) in [
        ("key limit", &t.dropped_key_limit),
        ("memory", &t.dropped_memory),
    ] {
        assert_eq!(dropped.load(Relaxed), 0, "values dropped for {what}");
    }
    running.shutdown().await;

    let q = |sql: &str| ch.number(sql);
    let db = "cardinality";
    assert_eq!(
        q(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'flood.req'"
        )),
        VALUES as f64,
        "the metric's sum, overflow included, is what was sent"
    );
    let folded = VALUES - u64::from(BUDGET);
    assert_eq!(
        q(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'flood.req' \
             AND has(tags, 'user:tallyd_overflow') AND has(tags, 'env:tallyd_overflow')"
        )),
        folded as f64,
        "every value past the budget is in the overflow series"
    );
    assert_eq!(
        q(&format!(
            "SELECT count() FROM {db}.counters FINAL WHERE name = 'flood.req'"
        )),
        f64::from(BUDGET + 1)
    );
    assert_eq!(
        q(&format!(
            "SELECT count() FROM {db}.counters FINAL WHERE name LIKE 'other.k%' AND value = 1"
        )),
        OTHERS as f64,
        "other metrics' new keys were admitted"
    );
    // The meta row, next to the data, names the metric...
    assert_eq!(
        q(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'tallyd.cardinality.folded' \
             AND has(tags, 'metric:flood.req') AND has(tags, 'type:c')"
        )),
        folded as f64
    );
    // ...and so does /metrics (its text, rendered after the last flush).
    let text = telemetry.render();
    let line = format!(
        "tallyd_cardinality_folded_values{{metric=\"flood.req\",type=\"c\",budget=\"{BUDGET}\"}} {folded}"
    );
    assert!(text.contains(&line), "no {line:?} in\n{text}");
    assert!(text.contains(&format!("tallyd_cardinality_folded_values_total {folded}")));
}
