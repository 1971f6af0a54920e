//! An OTLP request converted into what tallyd records and applies: each
//! point judged against its series' state ([`crate::ledger::temporality`]),
//! then turned into the aggregate state of one key over the interval of
//! its `time_unix_nano` (the `*_state` events of `proto/tallyd.proto`,
//! which an edge forwards too), in one `Batch` per host.
//!
//! # Points to tables
//!
//! - monotonic Sum → `counters`: its delta (a cumulative point's change
//!   since the last);
//! - non-monotonic Sum → `gauges`: a cumulative point's value, a delta
//!   point as a gauge delta (`+N|g`), applied to the open interval however
//!   old its time (a change applies to the current value);
//! - Gauge → `gauges`;
//! - Histogram → `timers` (type `h`): count and sum exact (a cumulative
//!   point's changes), min and max exact when the point has them and its
//!   delta is its own (else the bounds of the outermost buckets that
//!   changed, clamped to the point's min and max); each bucket's count is
//!   spread evenly (linearly, as Prometheus' `histogram_quantile` assumes)
//!   over its bounds into the DDSketch, at most [`SPREAD`] values per
//!   bucket. A percentile is then within its bucket's bounds, and its
//!   error is that of the linear assumption inside the bucket, not the
//!   sketch's 1 %. The outer buckets reach to the point's min and max, or
//!   are put at their finite bound when it has none;
//! - ExponentialHistogram → `timers` (type `h`): the same, each bucket
//!   `(base^i, base^(i+1)]`, `base = 2^(2^-scale)`, spread over its
//!   bounds; the zero bucket at 0. Measured against exact values in the
//!   tests: at scale 0 a percentile is within a factor 2 at worst (the
//!   bucket's width), at scale 3 within 9 %, from scale 6 on within the
//!   sketch's 1 % and the bucket's width together;
//! - Summary → `timers`: count and sum only (as deltas); min and max are
//!   its 0 and 1 quantiles when it has them, else the mean; no buckets, so
//!   no percentiles;
//! - exemplars are dropped.
//!
//! A point is counted as `samples` once (a histogram as its count).

use std::collections::HashMap;
use std::time::Duration;

use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use crate::aggregate::{self, sketch};
use crate::ledger::temporality::{Delta, Guard, Mark, Verdict};
use crate::protocol::otlp::{self, Kind, Point, Temporality, Value, metrics};
use crate::protocol::proto::pb;
use crate::protocol::statsd::Limits;
use crate::telemetry::otlp::Outcome;

/// Most sketch values one bucket is spread over.
pub const SPREAD: usize = 64;

/// The WAL record of a request ([`crate::wal::format::Kind::Otlp`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Encoded `Batch`es, one per host.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub batches: Vec<Vec<u8>>,
    /// The new state of every series the request moved.
    #[prost(message, repeated, tag = "2")]
    pub marks: Vec<Mark>,
}

/// What the conversion needs to know of tallyd.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub resource_tags: &'a [String],
    /// Bytes the series state may grow to.
    pub budget: u64,
    /// The open interval's start (wall clock).
    pub started: Duration,
    pub window: Duration,
    pub interval: Duration,
    /// Name and tag limits (`statsd.*`): a point past them is refused
    /// before it is judged or copied.
    pub limits: Limits,
    /// The most bytes the converted request may take (a WAL record's):
    /// past them the conversion stops.
    pub max_bytes: usize,
}

/// A request, converted.
#[derive(Debug, Default)]
pub struct Converted {
    pub record: Record,
    /// Points by [`Outcome`] (`Limits` is counted when applied).
    pub outcomes: [u64; 9],
    /// The first reason a point was refused, for the partial success.
    pub message: Option<String>,
}

impl Converted {
    /// Points refused (the partial success's `rejected_data_points`).
    pub fn rejected(&self) -> u64 {
        [
            Outcome::Invalid,
            Outcome::OutOfWindow,
            Outcome::Memory,
            Outcome::Limits,
        ]
        .iter()
        .map(|o| self.outcomes[*o as usize])
        .sum()
    }

    fn refuse(&mut self, o: Outcome, why: impl FnOnce() -> String) {
        self.outcomes[o as usize] += 1;
        if self.message.is_none() {
            self.message = Some(why());
        }
    }
}

/// Converts `request`, judging and staging its points in `guard`; `None`
/// when the converted request would pass `cx.max_bytes`.
pub fn convert(
    request: &otlp::Request,
    guard: &mut Guard<'_>,
    cx: &Context<'_>,
) -> Option<Converted> {
    let mut out = Converted::default();
    // Encoded `Batch`es, one per host, found by host; one event's bytes.
    let mut batches: Vec<Vec<u8>> = Vec::new();
    let mut hosts: HashMap<Option<String>, usize> = HashMap::new();
    let mut last: Option<(Option<String>, usize)> = None;
    let (mut bytes, mut too_large) = (0usize, false);
    let mut event = Vec::new();
    let walk = otlp::for_each_point(request, cx.resource_tags, |p| {
        if too_large {
            return;
        }
        let p = match p {
            Ok(p) => p,
            Err(e) => return out.refuse(Outcome::Invalid, || e.text().to_owned()),
        };
        if let Err(why) = within_limits(&p, &cx.limits) {
            return out.refuse(Outcome::Limits, || why);
        }
        // The interval of its time, within the window, as a `|T` sample's.
        let secs = p.time / 1_000_000_000;
        if !aggregate::within_window(secs, cx.started.as_secs(), cx.window) {
            return out.refuse(Outcome::OutOfWindow, || {
                format!(
                    "a point of {} is further than aggregate.timestamp_window ({} s) from now",
                    p.name,
                    cx.window.as_secs()
                )
            });
        }
        let interval_start = aggregate::interval_start(secs, cx.interval);
        let verdict = guard.judge(&p, cx.budget);
        if verdict.moves() {
            guard.stage(&p);
        }
        let value = match verdict {
            Verdict::Whole => whole(&p),
            Verdict::Delta(d) => delta(&p, d),
            Verdict::Retry => return out.outcomes[Outcome::Retry as usize] += 1,
            Verdict::Decrease => return out.outcomes[Outcome::Decrease as usize] += 1,
            Verdict::Reference => return out.outcomes[Outcome::Reference as usize] += 1,
            Verdict::Full => {
                return out.refuse(Outcome::Memory, || {
                    "tallyd's memory budget for OTLP series is spent (aggregate.max_memory)".into()
                });
            }
        };
        out.outcomes[Outcome::Applied as usize] += 1;
        // A histogram whose delta has no observations changed nothing.
        let Some(value) = value else { return };
        encode_event(&mut event, &p, &value, interval_start);
        // A mark, its event and their framing, about.
        bytes = bytes.saturating_add(event.len() + 64);
        if bytes > cx.max_bytes {
            too_large = true;
            return;
        }
        let at = match &last {
            Some((host, at)) if host.as_deref() == p.host => *at,
            _ => {
                let host = p.host.map(str::to_owned);
                let at = *hosts.entry(host.clone()).or_insert_with(|| {
                    batches.push(batch_header(p.host));
                    batches.len() - 1
                });
                last = Some((host, at));
                at
            }
        };
        let batch = &mut batches[at];
        encode_key(BATCH_EVENTS, WireType::LengthDelimited, batch);
        encode_varint(event.len() as u64, batch);
        batch.extend_from_slice(&event);
    });
    if too_large {
        return None;
    }
    out.outcomes[Outcome::NoRecordedValue as usize] += walk.no_recorded_value;
    out.record.batches = batches;
    out.record.marks = guard.staged().cloned().collect();
    Some(out)
}

/// Whether `p`'s name and tags are within tallyd's limits, as a StatsD
/// line's must be; else why not.
fn within_limits(p: &Point<'_>, limits: &Limits) -> Result<(), String> {
    if p.name.len() > limits.max_name_len {
        return Err(format!(
            "a metric name is longer than {} bytes (statsd.max_name_len)",
            limits.max_name_len
        ));
    }
    if p.tags.len() > limits.max_tags {
        return Err(format!(
            "a point of {} has more than {} tags (statsd.max_tags)",
            p.name, limits.max_tags
        ));
    }
    let tag_len = |(k, v): &otlp::Tag<'_>| k.len() + if v.is_empty() { 0 } else { 1 + v.len() };
    let long = p.tags.iter().any(|t| tag_len(t) > limits.max_tag_len);
    if long {
        return Err(format!(
            "a tag of {} is longer than {} bytes (statsd.max_tag_len)",
            p.name, limits.max_tag_len
        ));
    }
    Ok(())
}

type EventValue = pb::event::Value;

/// Field numbers of `proto/tallyd.proto` the encoding below writes (a test
/// checks that prost decodes the bytes to the `Batch` meant).
const BATCH_EVENTS: u32 = 3;
const BATCH_HOST: u32 = 4;
const BATCH_VERSION: u32 = 5;
const EVENT_NAME: u32 = 1;
const EVENT_TAGS: u32 = 2;
const EVENT_INTERVAL_START: u32 = 15;
const TAG_KEY: u32 = 1;
const TAG_VALUE: u32 = 2;

/// A `Batch`'s host and version, its events to follow.
fn batch_header(host: Option<&str>) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    if let Some(h) = host {
        put_str(&mut b, BATCH_HOST, h);
    }
    encode_key(BATCH_VERSION, WireType::Varint, &mut b);
    encode_varint(u64::from(crate::protocol::proto::VERSION), &mut b);
    b
}

fn put_str(out: &mut Vec<u8>, field: u32, s: &str) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// The bytes of a string field of a small field number (a one-byte key).
fn str_len(s: &str) -> usize {
    1 + encoded_len_varint(s.len() as u64) + s.len()
}

/// Writes an `Event` of `p`'s name and tags with `value` at
/// `interval_start` into `out` (cleared first), straight from the
/// request's strings.
fn encode_event(out: &mut Vec<u8>, p: &Point<'_>, value: &EventValue, interval_start: u64) {
    out.clear();
    put_str(out, EVENT_NAME, p.name);
    for (k, v) in p.tags {
        let len = str_len(k) + if v.is_empty() { 0 } else { str_len(v) };
        encode_key(EVENT_TAGS, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        put_str(out, TAG_KEY, k);
        if !v.is_empty() {
            put_str(out, TAG_VALUE, v);
        }
    }
    value.encode(out);
    if interval_start != 0 {
        encode_key(EVENT_INTERVAL_START, WireType::Varint, out);
        encode_varint(interval_start, out);
    }
}

fn counter(sum: f64) -> EventValue {
    EventValue::CounterState(pb::CounterState { sum, samples: 1 })
}

fn gauge(value: f64, delta: bool) -> EventValue {
    EventValue::GaugeState(pb::GaugeState {
        value,
        samples: 1,
        delta,
    })
}

/// The event of a point applied as it is.
fn whole(p: &Point<'_>) -> Option<EventValue> {
    Some(match (p.kind, p.value) {
        (Kind::MonotonicSum, Value::Number(v)) => counter(v),
        (Kind::Sum, Value::Number(v)) => gauge(v, p.temporality == Temporality::Delta),
        (Kind::Gauge, Value::Number(v)) => gauge(v, false),
        (_, Value::Histogram(h)) => {
            let mut d = Dist::default();
            d.explicit(&h.explicit_bounds, &h.bucket_counts, h.min, h.max);
            return d.state(h.count, h.sum, h.min.zip(h.max));
        }
        (_, Value::Exponential(e)) => {
            let mut d = Dist::default();
            d.exponential(e.scale, e.zero_count, &sides(e), e.min, e.max);
            return d.state(e.count, e.sum, e.min.zip(e.max));
        }
        (_, Value::Summary(s)) => return summary(s, s.count, s.sum),
        _ => return None,
    })
}

/// The event of a cumulative point's delta.
fn delta(p: &Point<'_>, d: Delta) -> Option<EventValue> {
    match (d, p.value) {
        (Delta::Number(v), _) => Some(counter(v)),
        (Delta::Histogram { count, sum, .. }, Value::Summary(s)) => {
            summary(s, count, sum.unwrap_or(0.0))
        }
        (Delta::Histogram { count, sum, counts }, Value::Histogram(h)) => {
            let mut dist = Dist::default();
            dist.explicit(&h.explicit_bounds, &counts, h.min, h.max);
            dist.state(count, sum, None)
        }
        (
            Delta::Exponential {
                count,
                sum,
                zero,
                positive,
                negative,
            },
            Value::Exponential(e),
        ) => {
            let mut dist = Dist::default();
            let sides = [
                (positive.0, &positive.1[..], 1.0),
                (negative.0, &negative.1[..], -1.0),
            ];
            dist.exponential(e.scale, zero, &sides, e.min, e.max);
            dist.state(count, sum, None)
        }
        _ => None,
    }
}

fn summary(s: &metrics::SummaryDataPoint, count: u64, sum: f64) -> Option<EventValue> {
    if count == 0 {
        return None;
    }
    let mean = sum / count as f64;
    let at = |q: f64| {
        s.quantile_values
            .iter()
            .find(|v| v.quantile == q && v.value.is_finite())
            .map(|v| v.value)
    };
    let (min, max) = (at(0.0).unwrap_or(mean), at(1.0).unwrap_or(mean));
    Some(EventValue::DistributionState(pb::DistributionState {
        kind: pb::distribution_state::Kind::Histogram as i32,
        count: count as f64,
        sum,
        min: min.min(max),
        max: max.max(min),
        samples: count,
        ..Default::default()
    }))
}

type Side<'a> = (i32, &'a [u64], f64);

fn sides(e: &metrics::ExponentialHistogramDataPoint) -> [Side<'_>; 2] {
    fn side(b: Option<&metrics::exponential_histogram_data_point::Buckets>, sign: f64) -> Side<'_> {
        b.map_or((0, &[][..], sign), |b| {
            (b.offset, &b.bucket_counts[..], sign)
        })
    }
    [
        side(e.positive.as_ref(), 1.0),
        side(e.negative.as_ref(), -1.0),
    ]
}

/// Sketch buckets being built, with the range the spread values cover.
#[derive(Default)]
struct Dist {
    /// (bucket value, weight).
    buckets: Vec<(f64, f64)>,
    lowest: Option<f64>,
    highest: Option<f64>,
}

impl Dist {
    /// Spreads `weight` evenly over `[lo, hi]` (see the module doc).
    fn spread(&mut self, lo: f64, hi: f64, weight: f64) {
        if weight <= 0.0 || !lo.is_finite() || !hi.is_finite() {
            return;
        }
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        self.lowest = Some(self.lowest.map_or(lo, |l| l.min(lo)));
        self.highest = Some(self.highest.map_or(hi, |h| h.max(hi)));
        let k = if lo == hi {
            1
        } else if lo > 0.0 || hi < 0.0 {
            let (a, b) = (lo.abs().min(hi.abs()), lo.abs().max(hi.abs()));
            let span = sketch::index(b).abs_diff(sketch::index(a.max(f64::MIN_POSITIVE)));
            (span as usize + 1).min(SPREAD)
        } else {
            SPREAD
        };
        let w = weight / k as f64;
        for j in 0..k {
            // lo(1 - t) + hi t: finite for any finite lo and hi.
            let t = if k == 1 {
                0.5
            } else {
                (j as f64 + 0.5) / k as f64
            };
            let v = lo * (1.0 - t) + hi * t;
            self.buckets.push((bucket_of(v), w));
        }
    }

    /// [`Dist::spread`] over `[lo, hi]` clamped to the point's min and max
    /// (what it has of them): no value lies outside them.
    fn spread_within(&mut self, lo: f64, hi: f64, (min, max): (Option<f64>, Option<f64>), w: f64) {
        let clamp = |v: f64| {
            let v = min.map_or(v, |m| v.max(m));
            max.map_or(v, |m| v.min(m))
        };
        self.spread(clamp(lo), clamp(hi), w);
    }

    /// Explicit bounds: bucket `i` is `(bounds[i-1], bounds[i]]`, the
    /// first from `min` (else at its bound), the last to `max` (else at
    /// its bound).
    fn explicit(&mut self, bounds: &[f64], counts: &[u64], min: Option<f64>, max: Option<f64>) {
        let n = bounds.len();
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let upper = bounds.get(i).copied();
            let lower = i.checked_sub(1).and_then(|j| bounds.get(j)).copied();
            let (lo, hi) = match (lower, upper) {
                (Some(l), Some(u)) => (l, u),
                (None, Some(u)) => (min.unwrap_or(u), u),
                (Some(l), None) => (l, max.unwrap_or(l)),
                (None, None) if n == 0 => {
                    let (l, u) = (min.unwrap_or(0.0), max.unwrap_or(0.0));
                    (l, u)
                }
                (None, None) => continue,
            };
            self.spread_within(lo, hi, (min, max), c as f64);
        }
    }

    /// Exponential buckets of `scale`, each side `(offset, counts, sign)`.
    fn exponential(
        &mut self,
        scale: i32,
        zero: u64,
        sides: &[Side<'_>; 2],
        min: Option<f64>,
        max: Option<f64>,
    ) {
        if zero > 0 {
            self.spread(0.0, 0.0, zero as f64);
        }
        let step = (-f64::from(scale)).exp2();
        for &(offset, counts, sign) in sides {
            for (j, &c) in counts.iter().enumerate() {
                if c == 0 {
                    continue;
                }
                let index = f64::from(offset) + j as f64;
                let clamp = |v: f64| v.min(f64::MAX);
                let (lo, hi) = (
                    sign * clamp((index * step).exp2()),
                    sign * clamp(((index + 1.0) * step).exp2()),
                );
                self.spread_within(lo, hi, (min, max), c as f64);
            }
        }
    }

    /// The state of `count` observations summing to `sum` (estimated
    /// from the buckets when absent), with `exact` min and max if known.
    fn state(
        mut self,
        count: u64,
        sum: Option<f64>,
        exact: Option<(f64, f64)>,
    ) -> Option<EventValue> {
        if count == 0 {
            return None;
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut values, mut weights) = (Vec::new(), Vec::new());
        for (v, w) in self.buckets {
            if values.last() == Some(&v) {
                if let Some(last) = weights.last_mut() {
                    *last += w;
                }
            } else {
                values.push(v);
                weights.push(w);
            }
        }
        let estimated = || values.iter().zip(&weights).map(|(v, w)| v * w).sum::<f64>();
        let sum = sum.filter(|s| s.is_finite()).unwrap_or_else(estimated);
        let mean = sum / count as f64;
        let (min, max) =
            exact.unwrap_or((self.lowest.unwrap_or(mean), self.highest.unwrap_or(mean)));
        Some(EventValue::DistributionState(pb::DistributionState {
            kind: pb::distribution_state::Kind::Histogram as i32,
            count: count as f64,
            sum,
            min: min.min(max),
            max: max.max(min),
            samples: count,
            bucket_values: values,
            bucket_weights: weights,
        }))
    }
}

/// The sketch bucket value of `v` (0 for zero).
fn bucket_of(v: f64) -> f64 {
    if v.abs() < f64::MIN_POSITIVE {
        0.0
    } else if v > 0.0 {
        sketch::bucket_value(sketch::index(v))
    } else {
        -sketch::bucket_value(sketch::index(-v))
    }
}

#[cfg(test)]
mod tests;
