//! Unit tests of [`super`]: an edge's rows through the wire into an
//! aggregator, and out as rows again.

use std::sync::Arc;
use std::time::Duration;

use super::encode::{self, Shape};
use crate::aggregate::{AggregateLimits, Aggregator, Generation, Scratch};
use crate::outbox::gauges::GaugeMemory;
use crate::outbox::rowbinary::Bodies;
use crate::outbox::rows::{self, Batch as Rows};
use crate::protocol::batch::BatchView;
use crate::protocol::statsd::Limits;
use crate::telemetry::BlockStats;

fn aggregator(started: u64) -> Aggregator {
    Aggregator::new(
        AggregateLimits {
            max_keys: 1000,
            max_set_members: 1000,
            max_depth: 1_000_000,
            max_memory: u64::MAX,
            timestamp_window: Duration::from_secs(3600),
            interval: Duration::from_secs(1),
        },
        Limits::default(),
        Duration::from_secs(started),
    )
}

/// The rows a tallyd makes of `generation` (decoded again), and their bodies.
fn flush_of(generation: Generation, host: &str) -> (Rows, Bodies) {
    let mut next = 1000;
    let (flush, _) = rows::build(
        generation,
        7 << 20,
        host,
        1,
        &mut GaugeMemory::new(1000),
        &mut || {
            next += 1;
            next << 20
        },
        Default::default(),
    );
    let bodies = flush.tables.clone();
    (flush.into_batch().expect("decodes"), bodies)
}

fn rows_of(generation: Generation, host: &str) -> Rows {
    flush_of(generation, host).0
}

/// The rows an edge of `host` makes of `block`, in the interval at
/// `started`, and their bodies.
fn edge_rows(block: &str, started: u64, host: &str) -> (Rows, Bodies) {
    let a = aggregator(started);
    let mut stats = BlockStats::default();
    a.ingest_block(block.as_bytes(), &mut Scratch::default(), &mut stats);
    assert_eq!(stats.parse_error_total(), 0);
    let g = Arc::try_unwrap(a.swap(Duration::from_secs(started + 1))).expect("unique");
    flush_of(g, host)
}

/// `rows` of each edge forwarded (with its host kept or not) to one
/// aggregator whose interval starts at `started`; the aggregator's rows.
fn through_aggregator(edges: &[(&str, &(Rows, Bodies))], keep_host: bool, started: u64) -> Rows {
    through_aggregator_except(edges, keep_host, &[], started)
}

/// [`through_aggregator`] with `forward.host_except` globs.
fn through_aggregator_except(
    edges: &[(&str, &(Rows, Bodies))],
    keep_host: bool,
    host_except: &[String],
    started: u64,
) -> Rows {
    let agg = aggregator(started);
    let upstreams = vec!["agg:8126".to_string()];
    for (host, rows) in edges {
        let client_id = encode::client_id(host, 1);
        let shape = Shape {
            upstreams: &upstreams,
            lost: &[],
            client_id: &client_id,
            flush_id: 7 << 20,
            host,
            keep_host,
            host_except,
            batch_size: 4096,
        };
        let framed = &encode::frames(&rows.1, &shape).expect("frames")[0];
        for frame in &framed.frames {
            let (prefix, _) = crate::protocol::proto::frame_header(frame, usize::MAX)
                .expect("frame")
                .expect("whole");
            let view = BatchView::decode(&frame[prefix..]).expect("decodes");
            let mut stats = BlockStats::default();
            let rejected = agg.ingest_batch(&view, &mut Scratch::default(), &mut stats);
            assert_eq!(rejected, 0);
        }
    }
    let g = Arc::try_unwrap(agg.swap(Duration::from_secs(started + 1))).expect("unique");
    rows_of(g, "agg")
}

const MIXED: &str = "c:1|c\nc:2|c|@0.5\nc:1|c|#env:prod,b\ng:5|g\ng:+2|g\n\
    t:10|ms\nt:20|ms|@0.25\nt:0|ms\nh:-3|h\nh:4.5|h\nd:7|d\ns:a|s\ns:b|s\ns:a|s\n";

fn sorted(mut rows: Rows) -> Rows {
    rows.counters
        .sort_by(|a, b| (&a.name, &a.tags).cmp(&(&b.name, &b.tags)));
    rows.gauges.sort_by(|a, b| a.name.cmp(&b.name));
    rows.timers.sort_by(|a, b| a.name.cmp(&b.name));
    rows.sets.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

#[test]
fn an_aggregators_rows_of_one_edge_are_the_edges_rows_with_its_host() {
    let flushed = edge_rows(MIXED, 100, "web-1");
    let agg = sorted(through_aggregator(&[("web-1", &flushed)], true, 100));
    let edge = sorted(flushed.0);
    assert_eq!(agg.counters.len(), 2);
    for (a, e) in agg.counters.iter().zip(&edge.counters) {
        assert_eq!(
            (&a.name, &a.tags, &a.host, a.ts, a.value, a.samples),
            (&e.name, &e.tags, &e.host, e.ts, e.value, e.samples)
        );
    }
    let (a, e) = (&agg.gauges[0], &edge.gauges[0]);
    assert_eq!((a.value, a.samples, &a.host), (7.0, e.samples, &e.host));
    assert_eq!(agg.timers.len(), 3);
    for (a, e) in agg.timers.iter().zip(&edge.timers) {
        let mut a = a.clone();
        a.flush_id = e.flush_id;
        assert_eq!(
            &a, e,
            "a distribution's every column, buckets and percentiles too"
        );
    }
    let (a, e) = (&agg.sets[0], &edge.sets[0]);
    assert_eq!(
        (&a.member_hashes, a.cardinality, a.samples),
        (&e.member_hashes, 2, e.samples)
    );
}

#[test]
fn the_fleets_states_of_a_key_merge_into_one_row_when_the_host_is_dropped() {
    let one = edge_rows("c:1|c\nt:10|ms\nt:30|ms\ns:a|s\n", 100, "web-1");
    let two = edge_rows("c:2|c|@0.5\nt:20|ms\ns:b|s\ns:a|s\n", 100, "web-2");
    let merged = through_aggregator(&[("web-1", &one), ("web-2", &two)], false, 100);
    assert_eq!(merged.counters.len(), 1);
    let c = &merged.counters[0];
    assert_eq!((c.value, c.samples, c.host.as_str()), (5.0, 2, "agg"));
    let t = &merged.timers[0];
    assert_eq!(
        (t.count, t.sum, t.min, t.max, t.samples),
        (3.0, 60.0, 10.0, 30.0, 3)
    );
    assert_eq!(t.bucket_counts.iter().sum::<f64>(), 3.0);
    assert_eq!(merged.sets[0].cardinality, 2);
    assert_eq!(merged.sets[0].samples, 3);

    let kept = through_aggregator(&[("web-1", &one), ("web-2", &two)], true, 100);
    let mut hosts: Vec<&str> = kept.counters.iter().map(|c| c.host.as_str()).collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["web-1", "web-2"], "one row per edge under keep");
}

#[test]
fn a_state_keeps_its_interval_however_late_it_arrives() {
    let old = edge_rows("c:3|c\ng:9|g\n", 100, "web-1");
    let rows = through_aggregator(&[("web-1", &old)], true, 5000);
    assert_eq!((rows.counters[0].ts, rows.counters[0].value), (100, 3.0));
    assert_eq!((rows.gauges[0].ts, rows.gauges[0].value), (100, 9.0));
}

#[test]
fn events_and_service_checks_arrive_whole_in_their_edges_interval() {
    let flushed = edge_rows(
        "_e{5,4}:title|text|p:low|t:error|#b,a:1\n_sc|disk|2|d:90|m:full\nc:1|c\n",
        100,
        "web-1",
    );
    let edge = &flushed.0;
    assert_eq!((edge.events.len(), edge.service_checks.len()), (1, 1));
    let agg = through_aggregator(&[("web-1", &flushed)], true, 5000);
    let (a, e) = (&agg.events[0], &edge.events[0]);
    let mut a = a.clone();
    a.flush_id = e.flush_id;
    assert_eq!(&a, e, "the same row: interval, host, every field");
    let (a, c) = (&agg.service_checks[0], &edge.service_checks[0]);
    let mut a = a.clone();
    a.flush_id = c.flush_id;
    assert_eq!(&a, c);
    let dropped = through_aggregator(&[("web-1", &flushed)], false, 5000);
    assert_eq!(
        (
            dropped.events[0].host.as_str(),
            dropped.counters[0].host.as_str()
        ),
        ("web-1", "agg"),
        "events keep their edge's host when metric rows drop it"
    );
}

#[test]
fn names_in_host_except_take_the_other_mode() {
    let one = edge_rows("fleet.c:1|c\nc:1|c\n", 100, "web-1");
    let two = edge_rows("fleet.c:2|c\nc:2|c\n", 100, "web-2");
    let edges = [("web-1", &one), ("web-2", &two)];
    let rows = |keep: bool, except: &[&str]| {
        let except: Vec<String> = except.iter().map(|e| e.to_string()).collect();
        let mut r: Vec<(String, String, f64)> =
            through_aggregator_except(&edges, keep, &except, 100)
                .counters
                .into_iter()
                .map(|c| (c.name, c.host, c.value))
                .collect();
        r.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        r
    };
    let row = |n: &str, h: &str, v: f64| (n.to_string(), h.to_string(), v);
    assert_eq!(
        rows(true, &["fleet.*"]),
        [
            row("c", "web-1", 1.0),
            row("c", "web-2", 2.0),
            row("fleet.c", "agg", 3.0)
        ]
    );
    assert_eq!(
        rows(false, &["fleet.*"]),
        [
            row("c", "agg", 3.0),
            row("fleet.c", "web-1", 1.0),
            row("fleet.c", "web-2", 2.0)
        ]
    );
}
