//! Unit tests of [`super`].

use super::*;
use crate::protocol::proto;
use crate::protocol::statsd::{MetricType, ParseError};

#[test]
fn a_value_slot_is_24_bytes() {
    // No larger than a gauge's accumulator, with room for "none": timers
    // and sets are boxed (with a set inline it was 48).
    assert_eq!(size_of::<Acc>(), 24);
    assert_eq!(size_of::<Option<Acc>>(), 24);
}

#[test]
fn same_key_compares_every_byte_at_every_length() {
    let a: Vec<u8> = (0..40).collect();
    for len in 0..40 {
        assert!(same_key(&a[..len], &a[..len]));
        assert!(!same_key(&a[..len], &a[..len + 1]));
        for at in 0..len {
            let mut b = a[..len].to_vec();
            b[at] ^= 0x80;
            assert!(!same_key(&a[..len], &b), "len {len}, byte {at}");
        }
    }
}

fn aggregator(max_keys: usize) -> Aggregator {
    Aggregator::new(
        AggregateLimits {
            max_keys,
            max_set_members: 1000,
            max_depth: 1_000_000,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    )
}

fn ingest(a: &Aggregator, block: &str) -> BlockStats {
    let mut stats = BlockStats::default();
    a.ingest_block(block.as_bytes(), &mut Scratch::default(), &mut stats);
    stats
}

fn acc<'a>(g: &'a Generation, kind: MetricType, name: &str, tags: &str) -> series::ValueRef<'a> {
    let k = KeyBuf::default()
        .build(kind, name.as_bytes(), tags.as_bytes())
        .to_vec();
    g.get(&k[..]).expect("key present")
}

#[test]
fn counters_sum_scaled_values_and_count_samples() {
    let a = aggregator(100);
    ingest(&a, "hits:1|c\nhits:2|c|@0.5\nhits:1:1|c");
    let g = a.current();
    match &*acc(&g, MetricType::Counter, "hits", "") {
        Acc::Counter { sum, samples } => assert_eq!((*sum, *samples), (7.0, 4)),
        other => panic!("{other:?}"),
    }
    assert_eq!(g.pending.load(Relaxed), 4);
}

#[test]
fn a_keys_lines_apply_in_arrival_order_whether_new_or_live() {
    let a = aggregator(100);
    let gauge = |a: &Aggregator| match &*acc(&a.current(), MetricType::Gauge, "g", "") {
        Acc::Gauge(g) => g.value,
        other => panic!("{other:?}"),
    };
    // New key: all its lines take the one-by-one path.
    ingest(&a, "g:1|g\nother:1|c\ng:7|g\ng:+2|g");
    assert_eq!(gauge(&a), 9.0);
    // Live key; the timestamped line (same interval) comes last and
    // waits in the block's batch like the others.
    ingest(&a, "g:3|g\ng:-1|g\nother:1|c\ng:4|g|T0");
    assert_eq!(gauge(&a), 4.0);
    let g = a.current();
    match &*acc(&g, MetricType::Counter, "other", "") {
        Acc::Counter { sum, .. } => assert_eq!(*sum, 2.0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_protobuf_batchs_events_apply_in_order_with_their_tags_and_members() {
    use crate::protocol::proto::pb::{self, event::Value};
    use prost::Message;
    let event =
        |name: &str, tags: &[(&str, &str)], value| proto::test_event(name, Some(value), tags, 0.0);
    let bytes = pb::Batch {
        client_id: String::new(),
        sequence: 1,
        events: vec![
            event("g", &[("b", "2"), ("a", "1")], Value::Gauge(1.0)),
            event("u", &[], Value::SetMember("alice".into())),
            event("g", &[("a", "1"), ("b", "2")], Value::Gauge(7.0)),
            event("bad", &[], Value::Counter(f64::NAN)),
            event("u", &[], Value::SetMember("bob".into())),
            event("g", &[("a", "1"), ("b", "2")], Value::GaugeDelta(2.0)),
        ],
        ..Default::default()
    }
    .encode_to_vec();
    let batch = BatchView::decode(&bytes).expect("decodes");
    let a = aggregator(100);
    let mut stats = BlockStats::default();
    let rejected = a.apply_batch(&a.current(), &batch, &mut Scratch::default(), &mut stats);
    assert_eq!((rejected, stats.lines, stats.samples), (1, 6, 5));
    let g = a.current();
    match &*acc(&g, MetricType::Gauge, "g", "a:1,b:2") {
        Acc::Gauge(g) => assert_eq!(g.value, 9.0),
        other => panic!("{other:?}"),
    }
    match &*acc(&g, MetricType::Set, "u", "") {
        Acc::Set(s) => assert_eq!(s.members.len(), 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_pending_buffer_is_reused_across_blocks() {
    let v: Vec<Pending<'static>> = Vec::with_capacity(64);
    assert!(relabel(v).capacity() >= 64);
}

#[test]
fn malformed_line_does_not_stop_its_neighbours() {
    let a = aggregator(100);
    let stats = ingest(&a, "a:1|c\nbad line\nb:1|q\na:1|c\n");
    assert_eq!(stats.lines, 4);
    assert_eq!(stats.samples, 2);
    assert_eq!(stats.parse_errors[ParseError::MissingValue.index()], 1);
    assert_eq!(stats.parse_errors[ParseError::UnknownType.index()], 1);
    match &*acc(&a.current(), MetricType::Counter, "a", "") {
        Acc::Counter { sum, .. } => assert_eq!(*sum, 2.0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_sum_past_the_range_of_f64_is_refused_and_the_key_keeps_its_value() {
    let a = aggregator(100);
    let stats = ingest(
        &a,
        "o:1e308|c\no:1e308|c\no:1|c\ng:1e308|g\ng:+1e308|g\nt:1e308|ms\nt:1e308|ms\nr:1e300|c|@1e-10",
    );
    assert_eq!((stats.dropped_overflow, stats.samples), (4, 4));
    let g = a.current();
    match &*acc(&g, MetricType::Counter, "o", "") {
        Acc::Counter { sum, samples } => assert_eq!((*sum, *samples), (1e308 + 1.0, 2)),
        other => panic!("{other:?}"),
    }
    match &*acc(&g, MetricType::Gauge, "g", "") {
        Acc::Gauge(gauge) => assert_eq!(gauge.value, 1e308),
        other => panic!("{other:?}"),
    }
    match &*acc(&g, MetricType::Timer, "t", "") {
        Acc::Dist(d) => assert_eq!((d.count, d.sum, d.max), (1.0, 1e308, 1e308)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_replayed_generation_routes_stamped_samples_without_the_window() {
    let a = aggregator(100);
    let mut g = Generation::new(9, Duration::from_secs(1_700_100_000));
    g.replayed = true;
    let mut stats = BlockStats::default();
    a.apply_block(
        &g,
        b"r:1|c|T1700000000",
        &mut Scratch::default(),
        &mut stats,
    );
    assert_eq!((stats.dropped_timestamp, g.late.len()), (0, 1));
    g.replayed = false;
    a.apply_block(
        &g,
        b"r:1|c|T1700000000",
        &mut Scratch::default(),
        &mut stats,
    );
    assert_eq!(stats.dropped_timestamp, 1, "live, it is out of the window");
}

#[test]
fn an_event_is_charged_its_whole_line() {
    let limits = AggregateLimits {
        max_keys: 100,
        max_set_members: 10,
        max_depth: 1000,
        max_memory: 10_000,
        timestamp_window: Duration::from_secs(3600),
        interval: Duration::from_secs(1),
    };
    let a = Aggregator::new(limits, Limits::default(), Duration::ZERO);
    let key = "k".repeat(3000);
    let line = format!("_e{{1,1}}:a|b|k:{key}");
    let stats = ingest(&a, &format!("{line}\n{line}\n{line}"));
    assert_eq!((stats.events, stats.dropped_memory), (1, 2), "6 KB each");
}

#[test]
fn unknown_dogstatsd_fields_are_counted_and_their_lines_count() {
    let a = aggregator(100);
    let stats = ingest(&a, "x:1|c|card:low|e:ext\nx:2|c|zz:1|\nx:4|c|#a|new:field");
    assert_eq!((stats.skipped_fields, stats.parse_error_total()), (3, 0));
    match &*acc(&a.current(), MetricType::Counter, "x", "") {
        Acc::Counter { sum, .. } => assert_eq!(*sum, 3.0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reordered_tags_are_one_key() {
    let a = aggregator(100);
    ingest(&a, "x:1|c|#a:1,b:2\nx:1|c|#b:2,a:1\nx:1|c|#b:2,a:1,a:1");
    assert_eq!(a.current().keys(), 1);
}

#[test]
fn key_limit_drops_new_keys_only() {
    let a = aggregator(2);
    let stats = ingest(&a, "a:1|c\nb:1|c\nc:1|c\na:1|c\nd:1:2|ms");
    assert_eq!(stats.dropped_key_limit, 3);
    assert_eq!(stats.samples, 3);
    assert_eq!(a.current().keys(), 2);
}

#[test]
fn the_key_limit_meets_lines_in_arrival_order_across_a_batch() {
    // Two datagrams: a live line, then another interval's (applied at
    // once, into `late`). The first arrived first, so it takes the
    // only key.
    let a = aggregator(1);
    let joined = b"a:1|c\nb:1|c|T5\n";
    let mut stats = BlockStats::default();
    a.ingest_datagrams(joined, &[0..5, 6..14], &mut Scratch::default(), &mut stats);
    assert_eq!((stats.samples, stats.dropped_key_limit), (1, 1));
    assert_eq!(
        (
            a.current().keys() - a.current().late.len(),
            a.current().late.len()
        ),
        (1, 0)
    );
}

#[test]
fn swap_starts_a_fresh_generation() {
    let a = aggregator(100);
    ingest(&a, "a:1|c");
    let old = a.swap(Duration::from_secs(5));
    ingest(&a, "a:1|c\nb:1|c");
    assert_eq!(old.keys(), 1);
    assert_eq!(a.current().keys(), 2);
    assert_eq!(a.current().started, Duration::from_secs(5));
}

#[test]
fn events_and_service_checks_are_counted_not_errors() {
    let a = aggregator(100);
    let stats = ingest(&a, "_e{1,1}:a|b\n_sc|chk|0");
    assert_eq!(
        (
            stats.events,
            stats.service_checks,
            stats.parse_error_total()
        ),
        (1, 1, 0)
    );
}

#[test]
fn set_member_limit_is_counted() {
    let a = Aggregator::new(
        AggregateLimits {
            max_keys: 10,
            max_set_members: 2,
            max_depth: 100,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    );
    let stats = ingest(&a, "u:a|s\nu:b|s\nu:c|s\nu:a|s");
    assert_eq!((stats.dropped_set_members, stats.samples), (1, 3));
}

#[tokio::test]
async fn reaching_max_depth_notifies_once() {
    let a = Aggregator::new(
        AggregateLimits {
            max_keys: 10,
            max_set_members: 2,
            max_depth: 3,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    );
    ingest(&a, "a:1|c\na:1|c");
    let waiting = tokio::time::timeout(Duration::from_millis(1), a.depth_reached()).await;
    assert!(waiting.is_err(), "notified below max depth");
    ingest(&a, "a:1|c\na:1|c");
    tokio::time::timeout(Duration::from_millis(100), a.depth_reached())
        .await
        .expect("notified at max depth");
}

#[test]
fn concurrent_ingest_loses_nothing() {
    let a = Arc::new(aggregator(100_000));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let a = Arc::clone(&a);
            std::thread::spawn(move || {
                let mut scratch = Scratch::default();
                for i in 0..2000 {
                    let block = format!("k{}:1|c\nshared:1|c", i % 50);
                    a.ingest_block(block.as_bytes(), &mut scratch, &mut BlockStats::default());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker");
    }
    match &*acc(&a.current(), MetricType::Counter, "shared", "") {
        Acc::Counter { sum, samples } => assert_eq!((*sum, *samples), (8000.0, 8000)),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.current().keys(), 51);
}

#[test]
fn keys_the_key_limit_refused_leave_the_table_as_idle_keys_do() {
    let a = aggregator(2);
    let interval = |a: &Aggregator, block: &str, at: u64| {
        ingest(a, block);
        let mut g = Arc::try_unwrap(a.swap(Duration::from_secs(at))).expect("unique");
        let mut kept = 0;
        g.drain(|_, _| kept += 1);
        kept
    };
    assert_eq!(interval(&a, "a:1|c\nb:1|c\nc:1|c\nd:1|c", 1), 2);
    // This time c and d come first: a and b are looked up and refused.
    assert_eq!(interval(&a, "c:1|c\nd:1|c\na:1|c\nb:1|c", 2), 2);
    assert_eq!(
        a.series_len(),
        2,
        "only the keys admitted in the last interval"
    );
}

/// Counters of `g` whose key is named `name`, as (tags, sum), sorted.
fn counters(g: &Generation, name: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    g.series.scan((g.id & 1) as usize, |k, v| {
        if let (Some(p), Some(Acc::Counter { sum, .. })) = (key::split(k), v)
            && p.name == name
        {
            out.push((p.tags.join(","), *sum));
        }
    });
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn a_metric_past_its_key_budget_folds_new_keys_into_its_overflow_series() {
    let a = aggregator(1000);
    a.set_budgets(Arc::new(budget::Budgets {
        default: 100,
        rules: vec![("req".into(), 3)],
    }));
    // The budget applies from the next interval.
    a.swap(Duration::from_secs(1_700_000_000));
    let lines: String = (0..10)
        .map(|u| format!("req:{u}|c|#user:{u},env:prod\nok.{u}:1|c\n"))
        .collect();
    let stats = ingest(&a, &lines);
    assert_eq!(stats.dropped_key_limit + stats.dropped_memory, 0);
    let g = a.current();
    let over = "env:tallyd_overflow,user:tallyd_overflow";
    assert_eq!(
        counters(&g, "req"),
        vec![
            ("env:prod,user:0".into(), 0.0),
            ("env:prod,user:1".into(), 1.0),
            ("env:prod,user:2".into(), 2.0),
            (over.into(), (3..10).sum::<u32>() as f64),
        ]
    );
    assert_eq!(
        counters(&g, "ok.9"),
        vec![(String::new(), 1.0)],
        "others admitted"
    );
    // A key admitted within the budget keeps counting as itself.
    ingest(&a, "req:5|c|#env:prod,user:1");
    assert_eq!(counters(&g, "req")[1], ("env:prod,user:1".into(), 6.0));
    let folded = g.folded();
    assert_eq!(folded.len(), 1);
    assert_eq!(
        (folded[0].name(), folded[0].values, folded[0].keys),
        ("req", 7, 3)
    );
}

/// An aggregator whose metrics may write `keys` keys an interval, in the
/// interval after the one the budget was set in.
fn budgeted(keys: u32) -> Aggregator {
    let a = aggregator(1000);
    a.set_budgets(Arc::new(budget::Budgets {
        default: keys,
        rules: vec![],
    }));
    a.swap(Duration::from_secs(1_700_000_000));
    a
}

#[test]
fn a_metric_s_bare_key_takes_no_place_in_its_budget() {
    let a = budgeted(1);
    ingest(
        &a,
        "req:1|c\nreq:2|c|#u:1\nreq:4|c|#u:2\nreq:8|c\nreq:16|c|#u:1|T1699999990\nreq:32|c|T1699999990",
    );
    let g = a.current();
    assert_eq!(
        counters(&g, "req"),
        vec![
            (String::new(), 9.0),
            ("u:1".into(), 2.0),
            ("u:tallyd_overflow".into(), 4.0),
        ]
    );
    let folded = g.folded();
    // u:2, and the late u:1 (the interval's budget is spent by then).
    assert_eq!((folded.len(), folded[0].values, folded[0].keys), (1, 2, 1));
    let mut late: Vec<_> = g
        .late
        .iter()
        .filter_map(|e| key::split(&e.key()[4..]).map(|p| p.tags.join(",")))
        .collect();
    late.sort();
    assert_eq!(
        late,
        vec!["", "u:tallyd_overflow"],
        "the bare key is not folded"
    );
}

#[test]
fn late_samples_fold_past_the_budget_too() {
    let a = budgeted(1);
    ingest(&a, "late:1|c|#u:1|T1699999990\nlate:2|c|#u:2|T1699999990");
    let g = a.current();
    let mut late: Vec<_> = g
        .late
        .iter()
        .map(|e| {
            let p = key::split(&e.key()[4..]).expect("key");
            let Acc::Counter { sum, .. } = *e.value() else {
                panic!("not a counter")
            };
            (p.tags.join(","), sum)
        })
        .collect();
    late.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        late,
        vec![("u:1".into(), 1.0), ("u:tallyd_overflow".into(), 2.0)]
    );
    assert_eq!(g.folded()[0].values, 1);
}

#[test]
fn the_folded_row_is_one_row_with_a_key_of_the_same_name_in_the_interval() {
    // A client (or an edge) sent the meta row's key itself: the flush
    // must not make two rows of one key.
    let a = budgeted(1);
    ingest(
        &a,
        "req:1|c|#u:1\nreq:1|c|#u:2\nreq:1|c|#u:3\ntallyd.cardinality.folded:5|c|#type:c,metric:req",
    );
    let g = a.current();
    g.put_folded_rows();
    assert_eq!(
        counters(&g, budget::FOLDED_METRIC),
        vec![("metric:req,type:c".into(), 7.0)]
    );
}

#[test]
fn merged_gauges_do_not_depend_on_the_order_they_meet_in() {
    let gauge = |value: f64, absolute: bool| {
        Acc::Gauge(acc::GaugeAcc {
            value,
            absolute,
            samples: 1,
        })
    };
    let cases = [
        (gauge(5.0, true), gauge(2.0, false), 7.0, true),
        (gauge(5.0, true), gauge(9.0, true), 9.0, true),
        (gauge(1.0, false), gauge(2.0, false), 3.0, false),
    ];
    for (a, b, value, absolute) in cases {
        let (a2, b2) = (clone_gauge(&a), clone_gauge(&b));
        let mut x = a;
        x.absorb(b);
        let mut y = b2;
        y.absorb(a2);
        for m in [x, y] {
            let Acc::Gauge(g) = m else { panic!("a gauge") };
            assert_eq!((g.value, g.absolute, g.samples), (value, absolute, 2));
        }
    }
}

fn clone_gauge(a: &Acc) -> Acc {
    match a {
        Acc::Gauge(g) => Acc::Gauge(*g),
        _ => panic!("a gauge"),
    }
}
