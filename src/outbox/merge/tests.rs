//! Unit tests of [`super`].

use super::*;
use crate::aggregate::{AggregateLimits, Aggregator, Generation, Scratch};
use crate::outbox::gauges::GaugeMemory;
use crate::outbox::rows::build;
use crate::protocol::statsd::Limits;
use crate::telemetry::BlockStats;
use std::time::Duration;

fn generation(block: &str, started: u64) -> Generation {
    let a = Aggregator::new(
        AggregateLimits {
            max_keys: 100,
            max_set_members: 100,
            max_depth: u64::MAX,
            max_memory: u64::MAX,
            timestamp_window: Duration::from_secs(86_400),
            interval: Duration::from_secs(1),
        },
        Limits::default(),
        Duration::from_secs(started),
    );
    a.ingest_block(
        block.as_bytes(),
        &mut Scratch::default(),
        &mut BlockStats::default(),
    );
    std::sync::Arc::try_unwrap(a.swap(Duration::from_secs(started + 1))).expect("unique")
}

/// The flush of `block` (an interval that started at `started`).
fn flush(block: &str, started: u64, id: u64, memory: &mut GaugeMemory) -> Flush {
    let mut late = id * 1_000;
    let mut next_id = || {
        late += 1;
        late
    };
    build(
        generation(block, started),
        id,
        "h",
        1,
        memory,
        &mut next_id,
        Default::default(),
    )
    .0
}

/// `build4` of the rows tests: a flush's rows.
fn build4(g: Generation, id: u64, _host: &str, memory: &mut GaugeMemory) -> (Batch, u64) {
    let (f, lost) = build(
        g,
        id,
        "h",
        1,
        memory,
        &mut || panic!("no late rows"),
        Default::default(),
    );
    (f.into_batch().expect("decodes"), lost)
}

/// Counter and gauge rows, sorted, as comparable tuples.
fn sorted(b: &Batch) -> (Vec<String>, Vec<String>) {
    let mut c: Vec<String> = b.counters.iter().map(|r| format!("{r:?}")).collect();
    let mut g: Vec<String> = b.gauges.iter().map(|r| format!("{r:?}")).collect();
    c.sort();
    g.sort();
    (c, g)
}

#[test]
fn merging_in_place_gives_what_merging_decoded_rows_gives() {
    let mut memory = GaugeMemory::new(100);
    let now = 1_700_000_000;
    let older = flush(
        "c:1|c|#b,a\nc:2|c\nonly.old:3|c|#x:1\ng:10|g\ng:+1|g|#t\nlate:7|c|T1699999000\nlg:4|g|T1699999000\nt:1:2|ms\ns:a|s",
        now,
        7,
        &mut memory,
    );
    let newer = flush(
        "c:4|c|#a,b\nc:0.5|c\nonly.new:1|c\ng:-3|g\ng:2|g|#t\nlate:1|c|T1699999000\nlg:9|g|T1699998000\nt:3|ms\ns:b|s",
        now + 1,
        8,
        &mut memory,
    );
    let by_rows = merge(
        older.clone().into_batch().expect("decodes"),
        newer.clone().into_batch().expect("decodes"),
        8,
    );
    let in_place = flushes(older, newer).expect("merges");
    assert_eq!(
        (in_place.flush_id, in_place.ts, &in_place.absorbed),
        (8, now as u32, &vec![7])
    );
    let decoded = in_place.into_batch().expect("decodes");
    assert_eq!(sorted(&decoded), sorted(&by_rows));
    assert_eq!(
        decoded.counters.len(),
        5,
        "c twice (tags), only.old, only.new, late"
    );
    assert_eq!((decoded.timers.len(), decoded.sets.len()), (1, 1));
    assert_eq!(decoded.sets[0].cardinality, 2);
    let sum: f64 = decoded.counters.iter().map(|r| r.value).sum();
    assert_eq!(sum, 1.0 + 2.0 + 3.0 + 7.0 + 4.0 + 0.5 + 1.0 + 1.0);
}

#[test]
fn a_name_that_is_not_utf8_is_an_error_as_in_a_row_merge() {
    let mut memory = GaugeMemory::new(10);
    let older = flush("c:1|c", 100, 1, &mut memory);
    let mut newer = flush("c:2|c", 101, 2, &mut memory);
    // The name's byte after the `ts` and its length.
    newer.tables.bodies[0][5] = 0xff;
    assert!(flushes(older.clone(), newer.clone()).is_err());
    assert!(
        newer.into_batch().is_err(),
        "the row decoder refuses it too"
    );
}

#[test]
fn a_damaged_body_is_an_error_not_a_panic() {
    let mut memory = GaugeMemory::new(10);
    let older = flush("c:1|c", 100, 1, &mut memory);
    let mut newer = flush("c:2|c", 101, 2, &mut memory);
    let cut = newer.tables.bodies[0].len() - 3;
    newer.tables.bodies[0].truncate(cut);
    assert!(flushes(older, newer).is_err());
}

#[test]
fn a_merge_keeps_the_gauge_of_the_newest_interval_not_the_newest_flush() {
    let gauge = |ts, version, value| GaugeRow {
        ts,
        name: "g".into(),
        tags: vec![],
        host: "h".into(),
        value,
        version,
        samples: 1,
    };
    let older = Batch {
        ts: 100,
        flush_id: 7,
        // This interval's value, and a stamped one for an hour before,
        // under the later flush id the late rows get.
        gauges: vec![gauge(100, 7, 10.0), gauge(40, 9, 3.0)],
        ..Batch::default()
    };
    let m = merge(older, Batch::default(), 11);
    assert_eq!(
        m.gauges
            .iter()
            .map(|g| (g.value, g.samples))
            .collect::<Vec<_>>(),
        vec![(10.0, 2)]
    );
}

#[test]
fn a_merge_keeps_a_stamped_gauges_own_version() {
    let gauge = |name: &str, ts, version, value| GaugeRow {
        ts,
        name: name.into(),
        tags: vec![],
        host: "h".into(),
        value,
        version,
        samples: 1,
    };
    let older = Batch {
        ts: 100,
        flush_id: 7_000,
        gauges: vec![gauge("live", 100, 7_000, 10.0)],
        ..Batch::default()
    };
    // Only a stamped value of "late" in the newer flush: its version is
    // its interval start's id, below the live one's.
    let newer = Batch {
        ts: 101,
        flush_id: 8_000,
        gauges: vec![gauge("late", 40, 4_000, 3.0)],
        ..Batch::default()
    };
    let m = merge(older, newer, 8_000);
    let mut versions: Vec<(String, u64)> = m
        .gauges
        .iter()
        .map(|g| (g.name.clone(), g.version))
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        vec![("late".to_owned(), 4_000), ("live".to_owned(), 7_000)],
        "a merged flush's id would rank the stamped value above live ones"
    );
}

#[test]
fn merged_flushes_keep_every_total() {
    let mut memory = GaugeMemory::new(10);
    let (a, _) = build4(
        generation("c:1|c\nc:2|c\ng:10|g\nt:10:20|ms\ns:x|s\nonly.a:5|c", 100),
        1,
        "h",
        &mut memory,
    );
    let (b, _) = build4(
        generation("c:4|c\ng:+5|g\nt:20:30|ms\ns:x|s\ns:y|s", 101),
        2,
        "h",
        &mut memory,
    );
    let mut m = merge(a, b, 2);
    m.counters.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(m.ts, 100);
    assert_eq!(
        m.counters
            .iter()
            .map(|r| (r.name.as_str(), r.value, r.samples, r.flush_id, r.ts))
            .collect::<Vec<_>>(),
        vec![("c", 7.0, 3, 2, 100), ("only.a", 5.0, 1, 2, 100)]
    );
    assert_eq!(
        (m.gauges[0].value, m.gauges[0].version, m.gauges[0].samples),
        (15.0, 2, 2)
    );
    let t = &m.timers[0];
    assert_eq!(
        (t.count, t.sum, t.min, t.max, t.samples),
        (4.0, 80.0, 10.0, 30.0, 4)
    );
    assert_eq!(t.bucket_counts.iter().sum::<f64>(), 4.0);
    assert!(t.p50 >= 10.0 && t.p50 <= 20.5 && t.p99 >= 29.5, "{t:?}");
    assert_eq!((m.sets[0].cardinality, m.sets[0].samples), (2, 3));
    assert_eq!(m.gauge_values.len(), 1);
}
