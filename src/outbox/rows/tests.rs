//! Unit tests of [`super`].

use super::*;

/// The rows `build` encodes, decoded again.
fn build_rows(
    generation: Generation,
    flush_id: u64,
    host: &str,
    gauges: &mut GaugeMemory,
    next_id: &mut dyn FnMut() -> u64,
) -> (Batch, u64) {
    let (flush, forgotten) = build(
        generation,
        flush_id,
        host,
        1,
        gauges,
        next_id,
        Default::default(),
    );
    (flush.into_batch().expect("decodes"), forgotten)
}

/// `build_rows` for generations without timestamped samples.
fn build4(
    generation: Generation,
    flush_id: u64,
    host: &str,
    gauges: &mut GaugeMemory,
) -> (Batch, u64) {
    build_rows(generation, flush_id, host, gauges, &mut || {
        panic!("no late rows")
    })
}
use crate::aggregate::{AggregateLimits, Aggregator, Scratch};
use crate::protocol::statsd::Limits;
use crate::telemetry::BlockStats;
use std::sync::Arc;
use std::time::Duration;

fn generation(block: &str, started: u64) -> Generation {
    let a = Aggregator::new(
        AggregateLimits {
            max_keys: 100,
            max_set_members: 100,
            max_depth: 1000,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    );
    a.ingest_block(
        block.as_bytes(),
        &mut Scratch::default(),
        &mut BlockStats::default(),
    );
    let g = a.swap(Duration::ZERO);
    let mut g = Arc::try_unwrap(g).expect("unique");
    g.started = Duration::from_secs(started);
    g
}

#[test]
fn timestamped_samples_become_rows_of_their_interval_under_ids_of_their_own() {
    let started = 1_700_000_010u64;
    let a = Aggregator::new(
        AggregateLimits {
            max_keys: 100,
            max_set_members: 100,
            max_depth: 1000,
            max_memory: u64::MAX,
            timestamp_window: Duration::from_secs(3600),
            interval: Duration::from_secs(10),
        },
        Limits::default(),
        Duration::from_secs(started),
    );
    let block = format!(
        "c:1|c|T{now}\nc:2|c\nc:4|c|T{a}\nc:8|c|T{b}\ng:5|g|T{a}\ng:+1|g|T{a}\nc:16|c|T{old}\nc:32|c|T{future}",
        now = started + 5,
        a = started - 60,
        b = started - 55,
        old = started - 3601,
        future = started + 3601,
    );
    let mut stats = BlockStats::default();
    a.ingest_block(block.as_bytes(), &mut Scratch::default(), &mut stats);
    assert_eq!(stats.dropped_timestamp, 2, "outside the hour's window");
    let g = Arc::try_unwrap(a.swap(Duration::from_secs(started + 10))).expect("unique");
    let mut ids = 100..;
    let mut memory = GaugeMemory::new(10);
    let (batch, _) = build_rows(g, 7, "h", &mut memory, &mut || ids.next().expect("id"));
    let mut counters: Vec<(u32, u64, f64)> = batch
        .counters
        .iter()
        .map(|r| (r.ts, r.flush_id, r.value))
        .collect();
    counters.sort_by_key(|c| c.0);
    // T-60 and T-55 share the interval starting at T-60 (10 s intervals).
    assert_eq!(
        counters,
        vec![(1_699_999_950, 100, 12.0), (1_700_000_010, 7, 3.0)]
    );
    assert_eq!(
        batch
            .gauges
            .iter()
            .map(|r| (r.ts, r.version, r.value))
            .collect::<Vec<_>>(),
        vec![(
            1_699_999_950,
            crate::outbox::flush::flush_id(
                crate::outbox::flush::tick_of(Duration::from_secs(1_699_999_950)),
                1
            ),
            6.0
        )],
        "a stamped gauge's version is its interval start's id, below the live flush's"
    );
    assert!(
        batch.gauges[0].version
            < crate::outbox::flush::flush_id(
                crate::outbox::flush::tick_of(Duration::from_secs(started)),
                1
            )
    );
    assert!(
        batch.gauge_values.is_empty(),
        "a late gauge is not remembered"
    );
}

#[test]
fn one_counter_row_per_key() {
    let g = generation("c:1|c|#b,a\nc:2|c|#a,b\nc:5|c", 1_700_000_000);
    let (mut batch, _) = build4(g, 7, "h1", &mut GaugeMemory::new(10));
    batch.counters.sort_by(|a, b| a.tags.cmp(&b.tags));
    assert_eq!(
        batch.counters,
        vec![
            CounterRow {
                ts: 1_700_000_000,
                name: "c".into(),
                tags: vec![],
                host: "h1".into(),
                flush_id: 7,
                value: 5.0,
                samples: 1
            },
            CounterRow {
                ts: 1_700_000_000,
                name: "c".into(),
                tags: vec!["a".into(), "b".into()],
                host: "h1".into(),
                flush_id: 7,
                value: 3.0,
                samples: 2
            },
        ]
    );
    assert_eq!(batch.samples, 3);
}

#[test]
fn gauge_delta_applies_to_the_previous_flush() {
    let mut memory = GaugeMemory::new(10);
    let (first, _) = build4(generation("g:10|g", 1), 1, "h", &mut memory);
    assert_eq!(first.gauges[0].value, 10.0);
    let (second, _) = build4(generation("g:+5|g\ng:-1|g", 2), 2, "h", &mut memory);
    assert_eq!(
        (second.gauges[0].value, second.gauges[0].version),
        (14.0, 2)
    );
}

#[test]
fn gauge_memory_is_bounded() {
    let mut memory = GaugeMemory::new(1);
    let (_, forgotten) = build4(generation("a:1|g\nb:2|g", 1), 1, "h", &mut memory);
    assert_eq!(forgotten, 1);
}

#[test]
fn timer_row_has_summary_and_buckets() {
    let (batch, _) = build4(
        generation("t:10:20:30|ms|@0.5", 1),
        1,
        "h",
        &mut GaugeMemory::new(1),
    );
    let t = &batch.timers[0];
    assert_eq!(
        (t.kind.as_str(), t.count, t.sum, t.min, t.max, t.samples),
        ("ms", 6.0, 120.0, 10.0, 30.0, 3)
    );
    assert_eq!(t.bucket_counts.iter().sum::<f64>(), 6.0);
}

#[test]
fn set_row_counts_distinct_members() {
    let (batch, _) = build4(
        generation("s:a|s\ns:b|s\ns:a|s", 1),
        1,
        "h",
        &mut GaugeMemory::new(1),
    );
    assert_eq!((batch.sets[0].cardinality, batch.sets[0].samples), (2, 3));
    assert_eq!(batch.sets[0].member_hashes.len(), 2);
}

#[test]
fn rows_encoded_from_keys_carry_each_tables_tags_as_row_structs_would() {
    let g = generation(
        "c:1|c|#b:2,a:1\nc:1|c\ng:3|g|#z\nt:5|ms|#a:1\ns:m|s|#x,y\nd:1|d|#a:1,,b",
        1,
    );
    let (flush, _) = build(
        g,
        9,
        "host-a",
        1,
        &mut GaugeMemory::new(10),
        &mut || 2,
        Default::default(),
    );
    let batch = flush.clone().into_batch().expect("decodes");
    // The bodies are well-formed RowBinary of these rows: decoded and
    // encoded again through the row structs, the same bytes.
    assert_eq!(crate::outbox::rowbinary::encode(&batch), flush.tables);
    let mut counters: Vec<_> = batch
        .counters
        .iter()
        .map(|r| (r.name.as_str(), r.tags.clone(), r.host.as_str(), r.value))
        .collect();
    counters.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        counters,
        vec![
            ("c", vec![], "host-a", 1.0),
            ("c", vec!["a:1".to_owned(), "b:2".to_owned()], "host-a", 1.0),
        ]
    );
    assert_eq!(batch.gauges[0].tags, vec!["z".to_owned()]);
    let mut timers: Vec<_> = batch
        .timers
        .iter()
        .map(|r| (r.kind.as_str(), r.tags.clone()))
        .collect();
    timers.sort();
    assert_eq!(
        timers,
        vec![
            ("d", vec!["a:1".to_owned(), "b".to_owned()]),
            ("ms", vec!["a:1".to_owned()]),
        ]
    );
    assert_eq!(batch.sets[0].tags, vec!["x".to_owned(), "y".to_owned()]);
    assert_eq!(flush.tables.rows, [2, 1, 2, 1, 0, 0]);
}

#[test]
fn a_flush_into_the_last_flushs_buffers_has_the_same_bytes_and_a_burst_s_buffers_go() {
    let bigger: String = (0..40)
        .map(|i| format!("c{i}:1|c\nt{i}:{i}|ms\n"))
        .collect();
    let small = "c1:5|c\ng:3|g\nt1:7|ms\ns:a|s\n";
    let build_with = |block: &str, spare: Bodies| {
        let mut gauges = GaugeMemory::new(10);
        build(
            generation(block, 100),
            1,
            "h",
            1,
            &mut gauges,
            &mut || 2,
            spare,
        )
        .0
    };
    let fresh = build_with(small, Bodies::default());
    let spare = build_with(&bigger, Bodies::default()).tables;
    assert_eq!(
        build_with(small, spare),
        fresh,
        "the same rows, byte for byte"
    );
    // Past twice what it held and 1 MiB, a buffer goes; under, it is kept.
    let mut burst = Bodies::default();
    burst.bodies[0] = Vec::with_capacity(4 << 20);
    burst.bodies[0].extend_from_slice(&[1; 1024]);
    burst.bodies[2] = vec![2; 3 << 20];
    let kept = Bodies::recycle(burst);
    assert_eq!(kept.bodies[0].capacity(), 0, "the burst's buffer goes");
    assert!(kept.bodies[2].is_empty() && kept.bodies[2].capacity() >= 3 << 20);
}
