use std::sync::Arc;
use std::time::Duration;

use metrics::exponential_histogram_data_point::Buckets;
use metrics::metric::Data;
use metrics::summary_data_point::ValueAtQuantile as Q;
use metrics::{AggregationTemporality as At, ExponentialHistogramDataPoint as ExpPoint};
use metrics::{HistogramDataPoint, Metric, NumberDataPoint, SummaryDataPoint};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::{Context, Converted, SPREAD, bucket_of, convert};
use crate::aggregate::sketch;
use crate::ledger::temporality::Temporality as State;
use crate::protocol::otlp::{Request, metrics};
use crate::protocol::proto::pb::{self, event::Value as Ev};
use crate::protocol::statsd::Limits;
use crate::telemetry::otlp::Outcome;

const NS: u64 = 1_000_000_000;
/// This run's start (the series state's), Unix seconds.
const RUN: u64 = 1_700_000_000;
/// The open interval's start (a multiple of `INTERVAL`).
const OPEN: u64 = 1_700_000_100;
/// A point's time in the open interval.
const T: u64 = OPEN + 1;
const WINDOW: u64 = 600;
const INTERVAL: u64 = 60;
const D: At = At::Delta;
const C: At = At::Cumulative;
/// A histogram point's sum, min and max, absent.
const NONE: [Option<f64>; 3] = [None; 3];

fn state() -> (crate::test_dir::TestDir, State) {
    let dir = crate::test_dir::test_dir("otlp-convert");
    let state = State::open(&dir, RUN * NS, Arc::new(crate::fs::RealFs)).expect("open");
    (dir, state)
}

/// Converts `r` and commits its marks (as after its WAL append).
fn run(state: &State, r: &Request) -> Converted {
    let cx = Context {
        resource_tags: &[],
        budget: u64::MAX,
        started: Duration::from_secs(OPEN),
        window: Duration::from_secs(WINDOW),
        interval: Duration::from_secs(INTERVAL),
        limits: Limits::default(),
        max_bytes: usize::MAX,
    };
    let mut guard = state.lock();
    let out = convert(r, &mut guard, &cx).expect("within max_bytes");
    guard.commit();
    out
}

/// Runs `metrics` of one resource, host `h1`.
fn send(state: &State, metrics: Vec<Metric>) -> Converted {
    run(state, &request(metrics))
}

fn request(metrics: Vec<Metric>) -> Request {
    let resource_metrics = vec![resource(Some("h1"), metrics)];
    Request { resource_metrics }
}

fn resource(host: Option<&str>, metrics: Vec<Metric>) -> metrics::ResourceMetrics {
    let attributes = host.map_or_else(Vec::new, |h| vec![kv("host.name", h)]);
    let resource = Some(Resource {
        attributes,
        ..Default::default()
    });
    let scope_metrics = vec![metrics::ScopeMetrics {
        metrics,
        ..Default::default()
    }];
    metrics::ResourceMetrics {
        resource,
        scope_metrics,
        ..Default::default()
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    let value = Some(AnyValue {
        value: Some(any_value::Value::StringValue(value.into())),
    });
    KeyValue {
        key: key.into(),
        value,
        ..Default::default()
    }
}

fn metric(name: &str, data: Data) -> Metric {
    Metric {
        name: name.into(),
        data: Some(data),
        ..Default::default()
    }
}

/// A number point started at `start`, at `time` (Unix seconds).
fn num(start: u64, time: u64, v: f64) -> NumberDataPoint {
    NumberDataPoint {
        start_time_unix_nano: start * NS,
        time_unix_nano: time * NS,
        value: Some(metrics::number_data_point::Value::AsDouble(v)),
        ..Default::default()
    }
}

fn sum(name: &str, is_monotonic: bool, t: At, data_points: Vec<NumberDataPoint>) -> Metric {
    let aggregation_temporality = t as i32;
    metric(
        name,
        Data::Sum(metrics::Sum {
            data_points,
            aggregation_temporality,
            is_monotonic,
        }),
    )
}

fn gauge(name: &str, data_points: Vec<NumberDataPoint>) -> Metric {
    metric(name, Data::Gauge(metrics::Gauge { data_points }))
}

/// A histogram point started at `times[0]`, at `times[1]`; `smm`: its
/// sum, min and max.
fn hp(
    times: [u64; 2],
    bounds: &[f64],
    counts: &[u64],
    smm: [Option<f64>; 3],
) -> HistogramDataPoint {
    HistogramDataPoint {
        start_time_unix_nano: times[0] * NS,
        time_unix_nano: times[1] * NS,
        count: counts.iter().sum(),
        bucket_counts: counts.to_vec(),
        explicit_bounds: bounds.to_vec(),
        sum: smm[0],
        min: smm[1],
        max: smm[2],
        ..Default::default()
    }
}

fn hist(name: &str, t: At, p: HistogramDataPoint) -> Metric {
    let (data_points, aggregation_temporality) = (vec![p], t as i32);
    metric(
        name,
        Data::Histogram(metrics::Histogram {
            data_points,
            aggregation_temporality,
        }),
    )
}

fn exp(name: &str, t: At, p: ExpPoint) -> Metric {
    let (data_points, aggregation_temporality) = (vec![p], t as i32);
    let h = metrics::ExponentialHistogram {
        data_points,
        aggregation_temporality,
    };
    metric(name, Data::ExponentialHistogram(h))
}

fn summary(name: &str, p: SummaryDataPoint) -> Metric {
    let data_points = vec![p];
    metric(name, Data::Summary(metrics::Summary { data_points }))
}

fn buckets(offset: i32, counts: &[u64]) -> Option<Buckets> {
    Some(Buckets {
        offset,
        bucket_counts: counts.to_vec(),
    })
}

fn batches(c: &Converted) -> Vec<pb::Batch> {
    let decode = |b: &Vec<u8>| pb::Batch::decode(&b[..]).expect("a Batch");
    c.record.batches.iter().map(decode).collect()
}

fn events(c: &Converted) -> Vec<pb::Event> {
    batches(c).into_iter().flat_map(|b| b.events).collect()
}

fn value(c: &Converted, name: &str) -> Ev {
    let mut found = events(c).into_iter().filter(|e| e.name == name);
    let e = found.next().unwrap_or_else(|| panic!("no event {name}"));
    assert!(found.next().is_none(), "one event {name}");
    e.value.expect("a value")
}

/// A counter's sum, or a gauge's value and `delta`, of one sample.
fn number(c: &Converted, name: &str) -> (f64, Option<bool>) {
    match value(c, name) {
        Ev::CounterState(s) if s.samples == 1 => (s.sum, None),
        Ev::GaugeState(g) if g.samples == 1 => (g.value, Some(g.delta)),
        v => panic!("{name}: {v:?}"),
    }
}

/// The distribution state of `name`: a histogram, buckets ascending,
/// weighing its count.
fn dist(c: &Converted, name: &str) -> pb::DistributionState {
    let Ev::DistributionState(d) = value(c, name) else {
        panic!("{name}: not a distribution state")
    };
    assert_eq!(d.kind, pb::distribution_state::Kind::Histogram as i32);
    assert_eq!(d.samples as f64, d.count);
    assert_eq!(d.bucket_values.len(), d.bucket_weights.len());
    assert!(d.bucket_values.windows(2).all(|w| w[0] < w[1]), "ascending");
    let total = d.bucket_weights.iter().sum();
    assert!(
        d.bucket_values.is_empty() || close(total, d.count),
        "{total}"
    );
    d
}

fn count(c: &Converted, o: Outcome) -> u64 {
    c.outcomes[o as usize]
}

/// count, sum, min and max.
fn totals(d: &pb::DistributionState) -> [f64; 4] {
    [d.count, d.sum, d.min, d.max]
}

/// The weight of the bucket values `keep` keeps.
fn weight(d: &pb::DistributionState, keep: impl Fn(f64) -> bool) -> f64 {
    let pairs = d.bucket_values.iter().zip(&d.bucket_weights);
    pairs.filter(|(v, _)| keep(**v)).map(|(_, w)| w).sum()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// Whether sketch value `v` stands for a value in `[lo, hi]` (within the
/// sketch's relative accuracy).
fn within(v: f64, lo: f64, hi: f64) -> bool {
    let (lo, hi) = (lo.min(hi), lo.max(hi));
    let alpha = sketch::RELATIVE_ACCURACY + 1e-9;
    (lo - alpha * lo.abs()..=hi + alpha * hi.abs()).contains(&v)
}

/// Asserts every bucket value of `d` stands for a value in `[lo, hi]`.
fn assert_within(d: &pb::DistributionState, lo: f64, hi: f64) {
    let out = d.bucket_values.iter().filter(|&&v| !within(v, lo, hi));
    assert_eq!(out.count(), 0, "{:?} outside [{lo}, {hi}]", d.bucket_values);
}

#[test]
fn delta_monotonic_sum_is_a_counter_in_its_interval_one_batch_per_host() {
    let (_dir, s) = state();
    let mut tagged = num(0, OPEN + 97, 7.5);
    tagged.attributes = vec![kv("route", "/x")];
    let reqs = |p| vec![sum("reqs", true, D, vec![p])];
    let r = Request {
        resource_metrics: vec![
            resource(Some("a"), reqs(tagged)),
            resource(Some("b"), reqs(num(0, OPEN - 5, 2.0))),
            resource(None, reqs(num(0, T, 3.0))),
        ],
    };
    let c = run(&s, &r);
    assert_eq!((count(&c, Outcome::Applied), c.rejected()), (3, 0));
    let batch = |host: &str, interval_start, sum, tags| pb::Batch {
        host: host.into(),
        version: crate::protocol::proto::VERSION,
        events: vec![pb::Event {
            name: "reqs".into(),
            tags,
            value: Some(Ev::CounterState(pb::CounterState { sum, samples: 1 })),
            interval_start,
            ..Default::default()
        }],
        ..Default::default()
    };
    let route = pb::Tag {
        key: "route".into(),
        value: "/x".into(),
    };
    let mut got = batches(&c);
    got.sort_by(|a, b| a.host.cmp(&b.host));
    // interval_start = floor(time / 60) * 60.
    let want = [
        batch("", OPEN, 3.0, vec![]),
        batch("a", OPEN + 60, 7.5, vec![route]),
        batch("b", OPEN - 60, 2.0, vec![]),
    ];
    assert_eq!(got, want);
}

#[test]
fn sums_and_gauges_become_gauge_states() {
    let (_dir, s) = state();
    let metrics = vec![
        sum("updown", false, D, vec![num(0, T, -4.0)]),
        sum("queue", false, C, vec![num(RUN - 99, T, 5.0)]),
        gauge("temp", vec![num(0, T, 21.5)]),
    ];
    let c = send(&s, metrics);
    assert_eq!(number(&c, "updown"), (-4.0, Some(true)));
    // A cumulative non-monotonic Sum is a value, even if it started before tallyd.
    assert_eq!(number(&c, "queue"), (5.0, Some(false)));
    assert_eq!(number(&c, "temp"), (21.5, Some(false)));
    assert_eq!(count(&c, Outcome::Applied), 3);
    // Its next point, lower, is a value again, not a decrease.
    let next = sum("queue", false, C, vec![num(RUN - 99, T + 1, 3.0)]);
    assert_eq!(number(&send(&s, vec![next]), "queue"), (3.0, Some(false)));
}

#[test]
fn cumulative_sum_first_point_whole_then_exact_delta_reference_before_start() {
    let (_dir, s) = state();
    let points = |t, new, old| {
        vec![
            sum("new", true, C, vec![num(RUN + 10, t, new)]),
            sum("old", true, C, vec![num(RUN - 100, t, old)]),
        ]
    };
    let c = send(&s, points(T, 10.5, 1000.0));
    assert_eq!(number(&c, "new"), (10.5, None));
    assert_eq!(events(&c).len(), 1, "the reference point is not applied");
    let outcomes = (count(&c, Outcome::Applied), count(&c, Outcome::Reference));
    assert_eq!(outcomes, (1, 1));
    assert_eq!(c.record.marks.len(), 2, "both series moved");
    assert!(c.record.marks.iter().all(|m| m.time == T * NS));
    let c = send(&s, points(T + 1, 17.25, 1004.0));
    assert_eq!(number(&c, "new"), (6.75, None));
    assert_eq!(number(&c, "old"), (4.0, None));
    // A decrease with the same start is counted, not applied; the next
    // delta is taken from it.
    let c = send(&s, points(T + 2, 17.0, 1005.0));
    assert_eq!((count(&c, Outcome::Decrease), c.record.marks.len()), (1, 2));
    assert_eq!((number(&c, "old"), events(&c).len()), ((1.0, None), 1));
    let c = send(&s, points(T + 3, 18.0, 1005.0));
    assert_eq!(number(&c, "new"), (1.0, None));
    assert_eq!(number(&c, "old"), (0.0, None));
}

#[test]
fn retries_are_counted_and_leave_no_mark() {
    let (_dir, s) = state();
    let r = request(vec![
        sum("d", true, D, vec![num(0, T, 1.0)]),
        sum("c", true, C, vec![num(RUN + 1, T, 9.0)]),
    ]);
    assert_eq!(run(&s, &r).record.marks.len(), 2);
    let again = run(&s, &r);
    assert_eq!(count(&again, Outcome::Retry), 2);
    assert_eq!((count(&again, Outcome::Applied), again.rejected()), (0, 0));
    assert!(again.record.batches.is_empty() && again.record.marks.is_empty());
}

#[test]
fn points_out_of_window_are_refused_without_a_mark() {
    let (_dir, s) = state();
    let points = vec![
        num(0, OPEN - WINDOW - 1, 1.0),
        num(0, OPEN + WINDOW + 1, 1.0),
        num(0, OPEN + WINDOW, 1.0),
    ];
    let c = send(&s, vec![sum("late", true, D, points)]);
    assert_eq!((count(&c, Outcome::OutOfWindow), c.rejected()), (2, 2));
    let message = c.message.clone().unwrap_or_default();
    assert!(message.contains("late"), "{message}");
    assert!(message.contains("timestamp_window"), "{message}");
    // The point at the window's edge is kept.
    assert_eq!(events(&c).len(), 1);
    assert_eq!(c.record.marks.len(), 1);
    assert_eq!(c.record.marks[0].time, (OPEN + WINDOW) * NS);
}

#[test]
fn invalid_points_are_refused_with_their_reason_and_valid_ones_kept() {
    let (_dir, s) = state();
    let mut no_value = num(0, T, 0.0);
    no_value.value = None;
    let metrics = vec![
        sum("m", true, D, vec![no_value, num(0, T, 2.0), num(0, 0, 1.0)]),
        sum("unspecified", true, At::Unspecified, vec![num(0, T, 1.0)]),
        gauge("nan", vec![num(0, T, f64::NAN)]),
        hist("h", D, hp([0, T], &[1.0], &[1, 2, 3], NONE)),
        gauge("", vec![num(0, T, 1.0)]),
    ];
    let c = send(&s, metrics);
    assert_eq!((count(&c, Outcome::Invalid), c.rejected()), (6, 6));
    let first = Some("a number data point has no value");
    assert_eq!(c.message.as_deref(), first, "the first reason");
    assert_eq!(count(&c, Outcome::Applied), 1);
    assert_eq!(number(&c, "m"), (2.0, None));
    assert_eq!((events(&c).len(), c.record.marks.len()), (1, 1));
    let h = vec![hist("h", D, hp([0, T], &[1.0], &[1], NONE))];
    let text = "bucket_counts do not match explicit_bounds";
    assert_eq!(send(&s, h).message.as_deref(), Some(text));
}

#[test]
fn delta_histogram_totals_exact_and_buckets_within_their_bounds() {
    let (_dir, s) = state();
    let bounds = [1.0, 5.0, 10.0, 50.0];
    let (min, max) = (0.5, 80.0);
    let counts = [2, 3, 0, 4, 1];
    let point = |counts: &[u64]| hp([0, T], &bounds, counts, [Some(123.5), Some(min), Some(max)]);
    let mut metrics = vec![hist("all", D, point(&counts))];
    for i in 0..counts.len() {
        let mut one = [0; 5];
        one[i] = 7;
        metrics.push(hist(&format!("b{i}"), D, point(&one)));
    }
    let c = send(&s, metrics);
    let d = dist(&c, "all");
    assert_eq!(totals(&d), [10.0, 123.5, min, max]);
    assert_within(&d, min, max);
    // Each bucket alone (weighing its count, see `dist`): within its bounds
    // (the outer ones to min and max), over at most SPREAD values.
    for i in 0..counts.len() {
        let lo = if i == 0 { min } else { bounds[i - 1] };
        let d = dist(&c, &format!("b{i}"));
        assert_within(&d, lo, bounds.get(i).copied().unwrap_or(max));
        let spread = d.bucket_values.len();
        assert!(spread <= SPREAD && spread > 1, "b{i}: {spread}");
    }
    // Without min and max, the outer buckets are put at their finite bound.
    let open = hist("open", D, hp([0, T], &[1.0, 5.0], &[3, 0, 2], NONE));
    let d = dist(&send(&s, vec![open]), "open");
    let (one, five) = (bucket_of(1.0), bucket_of(5.0));
    assert_eq!(d.bucket_values, [one, five]);
    assert_eq!(d.bucket_weights, [3.0, 2.0]);
    assert_eq!(totals(&d), [5.0, 3.0 * one + 2.0 * five, 1.0, 5.0]);
}

#[test]
fn cumulative_histogram_applies_exact_deltas() {
    let (_dir, s) = state();
    let send = |t, counts: &[u64], sum| {
        let smm = [Some(sum), Some(12.0), Some(400.0)];
        let p = hp([RUN + 1, t], &[10.0, 100.0], counts, smm);
        send(&s, vec![hist("lat", C, p)])
    };
    let d = dist(&send(T, &[0, 2, 1], 250.0), "lat");
    assert_eq!(totals(&d), [3.0, 250.0, 12.0, 400.0], "whole");
    let d = dist(&send(T + 1, &[0, 5, 5], 1250.0), "lat");
    // The changed buckets are (10, 100] (+3) and (100, max] (+4); min and
    // max are their bounds, clamped to the point's.
    assert_eq!(totals(&d), [7.0, 1000.0, 12.0, 400.0]);
    assert!(close(weight(&d, |v| v < 101.0), 3.0));
    assert!(close(weight(&d, |v| v > 101.0), 4.0));
    assert_within(&d, 12.0, 400.0);
    // No new observation: applied, no event.
    let c = send(T + 2, &[0, 5, 5], 1250.0);
    assert_eq!((count(&c, Outcome::Applied), events(&c).len()), (1, 0));
}

#[test]
fn cumulative_histogram_without_sum_estimates_the_delta_sum() {
    let (_dir, s) = state();
    let send = |t, counts: &[u64]| {
        let p = hp([RUN + 1, t], &[10.0, 100.0], counts, NONE);
        send(&s, vec![hist("nosum", C, p)])
    };
    // A whole point's sum is estimated from its buckets.
    let first = dist(&send(T, &[0, 2, 0]), "nosum");
    assert!(first.sum >= 2.0 * 10.0, "{}", first.sum);
    // A delta's sum is estimated too, not 0.
    let d = dist(&send(T + 1, &[0, 4, 0]), "nosum");
    assert_eq!(d.count, 2.0);
    assert!(d.sum >= 2.0 * 10.0, "{}", d.sum);
}

#[test]
fn exponential_histogram_zero_negative_and_positive_buckets() {
    let (_dir, s) = state();
    // Scale 2: base 2^(1/4); positive buckets 4 and 6, negative bucket 0.
    let base = 2f64.powf(0.25);
    let point = |min, max| ExpPoint {
        time_unix_nano: T * NS,
        count: 11,
        sum: Some(4.0),
        scale: 2,
        zero_count: 3,
        positive: buckets(4, &[1, 0, 2]),
        negative: buckets(0, &[5]),
        min,
        max,
        ..Default::default()
    };
    let metrics = vec![
        exp("e", D, point(None, None)),
        exp("clamped", D, point(Some(-1.1), Some(3.0))),
    ];
    let c = send(&s, metrics);
    let d = dist(&c, "e");
    assert_eq!((d.count, d.sum), (11.0, 4.0));
    assert_eq!(weight(&d, |v| v == 0.0), 3.0, "the zero bucket at 0");
    let (b4, b5, b6, b7) = (base.powi(4), base.powi(5), base.powi(6), base.powi(7));
    let negative = weight(&d, |v| v < 0.0 && within(v, -base, -1.0));
    assert!(close(negative, 5.0), "{negative}");
    assert!(close(weight(&d, |v| v > 0.0 && within(v, b4, b5)), 1.0));
    assert!(close(weight(&d, |v| within(v, b6, b7)), 2.0));
    assert!(within(d.min, -base, -1.0) && within(d.max, b6, b7));
    let d = dist(&c, "clamped");
    assert_eq!((d.min, d.max), (-1.1, 3.0));
    assert_within(&d, -1.1, 3.0);
    assert!(close(weight(&d, |v| v < 0.0), 5.0));
}

#[test]
fn summary_cumulative_count_and_sum_deltas_min_max_from_quantiles() {
    let (_dir, s) = state();
    let q = |quantile, value| Q { quantile, value };
    let point = |t: u64, count, sum, quantile_values| SummaryDataPoint {
        start_time_unix_nano: (RUN + 1) * NS,
        time_unix_nano: t * NS,
        count,
        sum,
        quantile_values,
        ..Default::default()
    };
    let send = |p, bare| send(&s, vec![summary("rt", p), summary("bare", bare)]);
    let first = point(T, 10, 100.0, vec![q(0.0, 1.0), q(1.0, 30.0)]);
    let c = send(first, point(T, 4, 8.0, vec![]));
    assert_eq!(totals(&dist(&c, "rt")), [10.0, 100.0, 1.0, 30.0]);
    let quantiles = vec![q(0.0, 0.5), q(0.5, 12.0), q(1.0, 50.0)];
    let c = send(
        point(T + 1, 25, 400.0, quantiles),
        point(T + 1, 6, 20.0, vec![]),
    );
    let d = dist(&c, "rt");
    assert_eq!(totals(&d), [15.0, 300.0, 0.5, 50.0]);
    assert!(d.bucket_values.is_empty() && d.bucket_weights.is_empty());
    // Without quantiles, min and max are the mean.
    assert_eq!(totals(&dist(&c, "bare")), [2.0, 12.0, 6.0, 6.0]);
}

/// `n` values in [1, 10 000], log-normal around 100 (an LCG and Box-Muller).
fn lognormal(n: usize) -> Vec<f64> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut uniform = || {
        x = x.wrapping_mul(6_364_136_223_846_793_005);
        x = x.wrapping_add(1_442_695_040_888_963_407);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let v = (4.6 + 1.3 * z).exp();
        if (1.0..=10_000.0).contains(&v) {
            out.push(v);
        }
    }
    out
}

/// The OTel spec's exponential histogram of `values` (> 0) at `scale`:
/// bucket `ceil(log2(v) * 2^scale) - 1` holds `(base^i, base^(i+1)]`.
fn exponential_of(values: &[f64], scale: i32) -> ExpPoint {
    let index = |v: f64| (v.log2() * f64::from(scale).exp2()).ceil() as i32 - 1;
    let lowest = values.iter().map(|&v| index(v)).min().unwrap_or(0);
    let highest = values.iter().map(|&v| index(v)).max().unwrap_or(0);
    let mut counts = vec![0u64; (highest - lowest + 1) as usize];
    for &v in values {
        counts[(index(v) - lowest) as usize] += 1;
    }
    ExpPoint {
        time_unix_nano: T * NS,
        count: values.len() as u64,
        sum: Some(values.iter().sum()),
        scale,
        positive: buckets(lowest, &counts),
        min: values.iter().copied().reduce(f64::min),
        max: values.iter().copied().reduce(f64::max),
        ..Default::default()
    }
}

/// The measurement: percentiles of 20,000 exact values against
/// those of their exponential histogram at scales 0 to 8, converted.
#[test]
fn exponential_histogram_percentile_error_by_scale() {
    let (_dir, s) = state();
    let values = lognormal(20_000);
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    // Nearest rank: the smallest value with at least q × n values at or below it.
    let exact = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
    let scales = 0..=8;
    let histogram = |scale| exp(&format!("s{scale}"), D, exponential_of(&values, scale));
    let c = send(&s, scales.clone().map(histogram).collect());
    assert_eq!(count(&c, Outcome::Applied), 9);
    eprintln!("scale  base-1    p50       p90       p99       max p1..p99  (n = 20000)");
    for scale in scales {
        let base = (-f64::from(scale)).exp2().exp2();
        // Its weights sum to the count (see `dist`).
        let d = dist(&c, &format!("s{scale}"));
        assert_eq!(d.count, values.len() as f64);
        let error = |q: f64| {
            let got = sketch::quantile(&d.bucket_values, &d.bucket_weights, q);
            (got.expect("a percentile") - exact(q)).abs() / exact(q)
        };
        let [p50, p90, p99] = [0.5, 0.9, 0.99].map(error);
        let all = (1..100).map(|p| error(f64::from(p) / 100.0));
        let all = all.fold(0.0, f64::max);
        let row = [base - 1.0, p50, p90, p99, all].map(|e| format!("{e:<8.4}"));
        eprintln!("{scale:>5}  {}", row.join("  "));
        let bound = base - 1.0 + 0.02;
        let worst = p50.max(p90).max(p99).max(all);
        assert!(worst <= bound, "scale {scale}: {worst} over {bound}");
    }
}

#[test]
fn events_are_written_straight_and_read_back_by_prost_and_the_wal_reader() {
    let (_dir, s) = state();
    let mut point = num(T - 1, T, 2.5);
    // A tag with an empty value is a bare key, as a StatsD `|#bare` tag.
    point.attributes = vec![kv("k", "v"), kv("bare", "")];
    let c = send(&s, vec![sum("enc", true, D, vec![point])]);
    let [bytes] = &c.record.batches[..] else {
        panic!("one batch: {:?}", c.record.batches.len());
    };
    let want = pb::Event {
        name: "enc".into(),
        tags: vec![
            pb::Tag {
                key: "bare".into(),
                value: String::new(),
            },
            pb::Tag {
                key: "k".into(),
                value: "v".into(),
            },
        ],
        value: Some(Ev::CounterState(pb::CounterState {
            sum: 2.5,
            samples: 1,
        })),
        interval_start: OPEN,
        ..Default::default()
    };
    let decoded = pb::Batch::decode(&bytes[..]).expect("prost decodes it");
    assert_eq!(
        (decoded.host.as_str(), &decoded.events[..]),
        ("h1", &[want][..])
    );
    let view = crate::protocol::batch::BatchView::decode(bytes).expect("the WAL reader too");
    let events: Vec<_> = view.events().collect();
    let tags: Vec<_> = events[0].tags().collect();
    assert_eq!(tags, [(&b"bare"[..], &b""[..]), (b"k", b"v")]);
}

#[test]
fn points_past_the_name_and_tag_limits_are_refused_before_they_are_judged() {
    let (_dir, s) = state();
    let long = "n".repeat(Limits::default().max_name_len + 1);
    let mut tagged = num(T - 1, T, 1.0);
    tagged.attributes = vec![kv("k", &"v".repeat(Limits::default().max_tag_len))];
    let c = send(
        &s,
        vec![
            sum(&long, true, D, vec![num(T - 1, T, 1.0)]),
            sum("tagged", true, D, vec![tagged]),
            sum("fine", true, D, vec![num(T - 1, T, 1.0)]),
        ],
    );
    assert_eq!((count(&c, Outcome::Limits), c.rejected()), (2, 2));
    assert!(
        c.message
            .as_deref()
            .is_some_and(|m| m.contains("statsd.max_name_len"))
    );
    // Neither moved its series: only the fine point's mark is recorded.
    assert_eq!((c.record.marks.len(), events(&c).len()), (1, 1));
}

#[test]
fn a_request_whose_conversion_passes_max_bytes_is_not_converted() {
    let (_dir, s) = state();
    let points = (0..1000)
        .map(|i| {
            let mut p = num(T - 1, T, f64::from(i));
            p.attributes = vec![kv("i", &i.to_string())];
            p
        })
        .collect();
    let r = request(vec![gauge("big", points)]);
    let cx = Context {
        resource_tags: &[],
        budget: u64::MAX,
        started: Duration::from_secs(OPEN),
        window: Duration::from_secs(WINDOW),
        interval: Duration::from_secs(INTERVAL),
        limits: Limits::default(),
        max_bytes: 10_000,
    };
    let mut guard = s.lock();
    assert!(convert(&r, &mut guard, &cx).is_none());
    drop(guard);
    // Nothing was staged for good: the same points are judged anew.
    let c = run(&s, &request(vec![gauge("big", vec![num(T - 1, T, 1.0)])]));
    assert_eq!(count(&c, Outcome::Applied), 1);
}
