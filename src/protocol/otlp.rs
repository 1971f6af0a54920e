//! OTLP metrics in (the OpenTelemetry protocol,
//! <https://opentelemetry.io/docs/specs/otlp/>): an
//! `ExportMetricsServiceRequest` decoded from protobuf or JSON, optionally
//! gzip-compressed, and its data points flattened into [`Point`]s, each
//! with its series identity, tallyd name, tags and host.
//!
//! The messages are `opentelemetry-proto`'s (prost types, and its serde
//! mapping for OTLP/JSON: lowerCamelCase fields, 64-bit integers as
//! strings or numbers, enums as integers).
//!
//! # Attributes to tags
//!
//! A point's tags are its own attributes and the resource attributes whose
//! keys are in `resource_tags` (by default `service.name`,
//! `service.namespace`, `deployment.environment` and
//! `deployment.environment.name`; never, unless listed, high-cardinality
//! ones such as `k8s.pod.uid` or `process.pid`). The resource's
//! `host.name` becomes the row's `host`, not a tag. Tags are sorted by key;
//! a point attribute wins over a resource attribute of the same key.
//!
//! Values are written as text: strings as they are, booleans `true` /
//! `false`, integers in decimal, doubles in Rust's shortest form, bytes in
//! lowercase hex, arrays as their items joined by `;` in `[]`, maps as
//! `k=v` joined by `;` in `{}`. tallyd's tag syntax is `key:value,…`, so a
//! `,` in a key or value and a `:` in a key become `_`, as does a control
//! character. An attribute with an empty key is left out.
//!
//! # Series identity
//!
//! A point's series (its stream, in the data model's terms) is a 128-bit
//! SipHash-1-3 of everything that identifies it: every resource attribute
//! (promoted or not: two pods' cumulative counters are two series even
//! when their rows merge), the scope's name and version, the metric's name,
//! its kind, and every point attribute, each list sorted by key. It keys the
//! per-series state of [`crate::ledger::temporality`].
//!
//! Pure code: no sockets, no tokio.

use std::borrow::Cow;
use std::hash::Hasher;
use std::io::Read;

use prost::Message;
use siphasher::sip128::{Hasher128, SipHasher13};

use common::{AnyValue, KeyValue, any_value};
use metrics::metric::Data;
pub use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest as Request,
    ExportMetricsServiceResponse as Response,
};
pub use opentelemetry_proto::tonic::common::v1 as common;
pub use opentelemetry_proto::tonic::metrics::v1 as metrics;
pub use opentelemetry_proto::tonic::resource::v1 as resource;

/// The resource attributes promoted to tags by default.
pub const RESOURCE_TAGS: [&str; 4] = [
    "service.name",
    "service.namespace",
    "deployment.environment",
    "deployment.environment.name",
];

/// The resource attribute that becomes the row's `host`.
pub const HOST_ATTRIBUTE: &str = "host.name";

/// How a body is encoded (its `Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf` (and gRPC's messages).
    Protobuf,
    /// `application/json`.
    Json,
}

/// Why a body does not decode. Each is the client's fault (HTTP 400,
/// gRPC `INVALID_ARGUMENT`), except [`BodyError::TooLarge`] (413).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request is over the {0} byte limit (after decompression)")]
    TooLarge(usize),
    #[error("the body is not valid gzip: {0}")]
    Gzip(std::io::Error),
    #[error("undecodable protobuf ExportMetricsServiceRequest: {0}")]
    Protobuf(prost::DecodeError),
    #[error("undecodable JSON ExportMetricsServiceRequest: {0}")]
    Json(serde_json::Error),
}

/// Decodes a request body of at most `max` bytes (after decompression, so
/// that a small gzip bomb is refused too).
pub fn decode(
    body: &[u8],
    encoding: Encoding,
    gzip: bool,
    max: usize,
) -> Result<Request, BodyError> {
    let inflated;
    let raw = if gzip {
        let mut out = Vec::new();
        let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
        flate2::read::GzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out)
            .map_err(BodyError::Gzip)?;
        inflated = out;
        &inflated[..]
    } else {
        body
    };
    if raw.len() > max {
        return Err(BodyError::TooLarge(max));
    }
    match encoding {
        Encoding::Protobuf => Request::decode(raw).map_err(BodyError::Protobuf),
        Encoding::Json => serde_json::from_slice(raw).map_err(BodyError::Json),
    }
}

/// A metric's kind, as its table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonic Sum: `counters`.
    MonotonicSum,
    /// A non-monotonic Sum (an up-down counter): `gauges`.
    Sum,
    Gauge,
    /// Explicit bucket bounds: `timers`.
    Histogram,
    ExponentialHistogram,
    /// Count and sum only: `timers`.
    Summary,
}

/// `aggregation_temporality`. A Gauge's points are read as delta (each
/// stands alone); a Summary's as cumulative (the data model's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporality {
    Delta,
    Cumulative,
}

/// A point's value, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Number(f64),
    Histogram(&'a metrics::HistogramDataPoint),
    Exponential(&'a metrics::ExponentialHistogramDataPoint),
    Summary(&'a metrics::SummaryDataPoint),
}

/// A tag: its key and value.
pub type Tag<'a> = (Cow<'a, str>, Cow<'a, str>);

/// One data point, flattened.
#[derive(Debug, Clone)]
pub struct Point<'a> {
    /// Its series' identity (see the module doc).
    pub series: u128,
    pub name: &'a str,
    /// The resource's `host.name`, if it has one.
    pub host: Option<&'a str>,
    /// `(key, value)`, sorted by key, unique keys; borrowed from the
    /// request where they need no cleaning.
    pub tags: &'a [Tag<'a>],
    pub kind: Kind,
    pub temporality: Temporality,
    /// `start_time_unix_nano` (0: unknown).
    pub start: u64,
    /// `time_unix_nano`.
    pub time: u64,
    pub value: Value<'a>,
}

/// Why a point is refused before any rule of tallyd's applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A Sum or histogram whose temporality is unspecified (the spec calls
    /// it invalid).
    Temporality,
    /// `time_unix_nano` is 0.
    Time,
    /// A number point without a value.
    NoValue,
    /// A value that is not finite.
    NotFinite,
    /// A metric with an empty name.
    Name,
    /// A histogram whose bucket counts do not match its bounds.
    Buckets,
    /// A histogram of more than [`MAX_BUCKETS`] buckets.
    TooManyBuckets,
}

/// The most buckets a histogram point may have (SDKs default to 16
/// explicit bounds and 160 exponential buckets a side).
pub const MAX_BUCKETS: usize = 4096;

impl Invalid {
    pub fn text(self) -> &'static str {
        match self {
            Invalid::Temporality => "aggregation_temporality is unspecified",
            Invalid::Time => "time_unix_nano is 0",
            Invalid::NoValue => "a number data point has no value",
            Invalid::NotFinite => "a value is not finite",
            Invalid::Name => "a metric has an empty name",
            Invalid::Buckets => "bucket_counts do not match explicit_bounds",
            Invalid::TooManyBuckets => "a histogram point has more than 4096 buckets",
        }
    }
}

/// What the walk found besides valid points.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Points marked `FLAG_NO_RECORDED_VALUE` (staleness markers): skipped,
    /// not refused.
    pub no_recorded_value: u64,
}

const NO_RECORDED_VALUE: u32 = 1;

/// Calls `each` with every data point of `request` (or why it is invalid),
/// in order; tags and the host are described in the module doc.
pub fn for_each_point(
    request: &Request,
    resource_tags: &[String],
    mut each: impl FnMut(Result<Point<'_>, Invalid>),
) -> Walk {
    let mut walk = Walk::default();
    let mut tags: Vec<Tag<'_>> = Vec::new();
    let mut promoted: Vec<Tag<'_>> = Vec::new();
    let mut sorted: Vec<&KeyValue> = Vec::new();
    for rm in &request.resource_metrics {
        let attributes = rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
        let mut resource = SipHasher13::new_with_keys(0x6f74_6c70, 0x7365_7269_6573);
        sorted.clear();
        sorted.extend(attributes);
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        hash_attributes(&mut resource, &sorted);
        let mut host = None;
        promoted.clear();
        for kv in attributes {
            if kv.key == HOST_ATTRIBUTE {
                if let Some(any_value::Value::StringValue(s)) =
                    kv.value.as_ref().and_then(|v| v.value.as_ref())
                {
                    host = Some(s.as_str()).filter(|s| !s.is_empty());
                }
            } else if resource_tags.contains(&kv.key) {
                // One tag per key: a repeated (or, cleaned, equal) key's
                // last value wins.
                let key = clean_key(&kv.key);
                promoted.retain(|(k, _)| *k != key);
                promoted.push((key, render(kv.value.as_ref())));
            }
        }
        for sm in &rm.scope_metrics {
            let mut scope = resource;
            let (name, version) = sm
                .scope
                .as_ref()
                .map_or(("", ""), |s| (s.name.as_str(), s.version.as_str()));
            hash_str(&mut scope, name);
            hash_str(&mut scope, version);
            for metric in &sm.metrics {
                let Some(data) = &metric.data else { continue };
                let mut points = Points {
                    base: scope,
                    metric: &metric.name,
                    host,
                    promoted: &promoted,
                    tags: &mut tags,
                    sorted: Vec::new(),
                    walk: &mut walk,
                };
                points.data(data, &mut each);
            }
        }
    }
    walk
}

struct Points<'r, 'a> {
    base: SipHasher13,
    metric: &'a str,
    host: Option<&'a str>,
    promoted: &'r [Tag<'a>],
    tags: &'r mut Vec<Tag<'a>>,
    sorted: Vec<&'a KeyValue>,
    walk: &'r mut Walk,
}

fn temporality(t: i32) -> Option<Temporality> {
    match metrics::AggregationTemporality::try_from(t) {
        Ok(metrics::AggregationTemporality::Delta) => Some(Temporality::Delta),
        Ok(metrics::AggregationTemporality::Cumulative) => Some(Temporality::Cumulative),
        _ => None,
    }
}

impl<'a> Points<'_, 'a> {
    fn data(&mut self, data: &'a Data, each: &mut impl FnMut(Result<Point<'_>, Invalid>)) {
        match data {
            Data::Gauge(g) => {
                for p in &g.data_points {
                    self.number(p, Kind::Gauge, Some(Temporality::Delta), each);
                }
            }
            Data::Sum(s) => {
                let kind = if s.is_monotonic {
                    Kind::MonotonicSum
                } else {
                    Kind::Sum
                };
                let t = temporality(s.aggregation_temporality);
                for p in &s.data_points {
                    self.number(p, kind, t, each);
                }
            }
            Data::Histogram(h) => {
                let t = temporality(h.aggregation_temporality);
                for p in &h.data_points {
                    let valid = p.bucket_counts.is_empty()
                        || p.bucket_counts.len() == p.explicit_bounds.len() + 1;
                    let finite = p.explicit_bounds.iter().all(|b| b.is_finite())
                        && [p.sum, p.min, p.max]
                            .iter()
                            .flatten()
                            .all(|v| v.is_finite());
                    let value = match (valid, finite) {
                        _ if p.bucket_counts.len() > MAX_BUCKETS => Err(Invalid::TooManyBuckets),
                        (false, _) => Err(Invalid::Buckets),
                        (_, false) => Err(Invalid::NotFinite),
                        _ => Ok(Value::Histogram(p)),
                    };
                    let args = (p.flags, p.start_time_unix_nano, p.time_unix_nano);
                    self.point(&p.attributes, Kind::Histogram, t, args, value, each);
                }
            }
            Data::ExponentialHistogram(h) => {
                let t = temporality(h.aggregation_temporality);
                for p in &h.data_points {
                    let finite = [p.sum, p.min, p.max]
                        .iter()
                        .flatten()
                        .all(|v| v.is_finite())
                        && p.zero_threshold.is_finite();
                    let buckets = [&p.positive, &p.negative]
                        .iter()
                        .map(|b| b.as_ref().map_or(0, |b| b.bucket_counts.len()))
                        .sum::<usize>();
                    let value = if buckets > MAX_BUCKETS {
                        Err(Invalid::TooManyBuckets)
                    } else if finite {
                        Ok(Value::Exponential(p))
                    } else {
                        Err(Invalid::NotFinite)
                    };
                    let args = (p.flags, p.start_time_unix_nano, p.time_unix_nano);
                    let kind = Kind::ExponentialHistogram;
                    self.point(&p.attributes, kind, t, args, value, each);
                }
            }
            Data::Summary(s) => {
                for p in &s.data_points {
                    let value = if p.sum.is_finite() {
                        Ok(Value::Summary(p))
                    } else {
                        Err(Invalid::NotFinite)
                    };
                    let args = (p.flags, p.start_time_unix_nano, p.time_unix_nano);
                    let t = Some(Temporality::Cumulative);
                    self.point(&p.attributes, Kind::Summary, t, args, value, each);
                }
            }
        }
    }

    fn number(
        &mut self,
        p: &'a metrics::NumberDataPoint,
        kind: Kind,
        t: Option<Temporality>,
        each: &mut impl FnMut(Result<Point<'_>, Invalid>),
    ) {
        use metrics::number_data_point::Value as V;
        let value = match p.value {
            Some(V::AsDouble(v)) if v.is_finite() => Ok(Value::Number(v)),
            Some(V::AsDouble(_)) => Err(Invalid::NotFinite),
            Some(V::AsInt(v)) => Ok(Value::Number(v as f64)),
            None => Err(Invalid::NoValue),
        };
        let args = (p.flags, p.start_time_unix_nano, p.time_unix_nano);
        self.point(&p.attributes, kind, t, args, value, each);
    }

    fn point(
        &mut self,
        attributes: &'a [KeyValue],
        kind: Kind,
        temporality: Option<Temporality>,
        (flags, start, time): (u32, u64, u64),
        value: Result<Value<'a>, Invalid>,
        each: &mut impl FnMut(Result<Point<'_>, Invalid>),
    ) {
        if flags & NO_RECORDED_VALUE != 0 {
            self.walk.no_recorded_value += 1;
            return;
        }
        let checked = (|| {
            if self.metric.is_empty() {
                return Err(Invalid::Name);
            }
            let temporality = temporality.ok_or(Invalid::Temporality)?;
            if time == 0 {
                return Err(Invalid::Time);
            }
            Ok((temporality, value?))
        })();
        let (temporality, value) = match checked {
            Ok(ok) => ok,
            Err(e) => return each(Err(e)),
        };
        let mut h = self.base;
        hash_str(&mut h, self.metric);
        h.write_u8(kind as u8);
        self.sorted.clear();
        self.sorted.extend(attributes);
        self.sorted.sort_by(|a, b| a.key.cmp(&b.key));
        hash_attributes(&mut h, &self.sorted);
        let series = h.finish128().as_u128();
        self.tags.clear();
        self.tags.extend(self.promoted.iter().cloned());
        for kv in &self.sorted {
            if kv.key.is_empty() {
                continue;
            }
            let (k, v) = (clean_key(&kv.key), render(kv.value.as_ref()));
            self.tags.retain(|(key, _)| *key != k);
            self.tags.push((k, v));
        }
        self.tags.sort_by(|a, b| a.0.cmp(&b.0));
        each(Ok(Point {
            series,
            name: self.metric,
            host: self.host,
            tags: self.tags,
            kind,
            temporality,
            start,
            time,
            value,
        }));
    }
}

fn hash_str(h: &mut SipHasher13, s: &str) {
    h.write_usize(s.len());
    h.write(s.as_bytes());
}

/// Hashes attributes (sorted by key) by key and value, the value by its
/// protobuf encoding (so that `1` and `"1"` differ).
fn hash_attributes(h: &mut SipHasher13, sorted: &[&KeyValue]) {
    h.write_usize(sorted.len());
    let mut buf = Vec::new();
    for kv in sorted {
        hash_str(h, &kv.key);
        buf.clear();
        if let Some(v) = &kv.value {
            v.encode(&mut buf).unwrap_or_default();
        }
        h.write_usize(buf.len());
        h.write(&buf);
    }
}

/// A tag key: `,` and `:` (tallyd's separators) and control characters
/// become `_`; borrowed when there are none.
fn clean_key(k: &str) -> Cow<'_, str> {
    clean(Cow::Borrowed(k), |c| c == ',' || c == ':')
}

/// `text` with every character `sep` says and every control character
/// replaced by `_`.
fn clean<'a>(text: Cow<'a, str>, sep: impl Fn(char) -> bool) -> Cow<'a, str> {
    let bad = |c: char| sep(c) || c.is_control();
    if !text.chars().any(bad) {
        return text;
    }
    Cow::Owned(text.chars().map(|c| if bad(c) { '_' } else { c }).collect())
}

/// A tag value as text (see the module doc); a string borrowed when it
/// needs no cleaning.
fn render(v: Option<&AnyValue>) -> Cow<'_, str> {
    let text = match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Cow::Borrowed(s.as_str()),
        _ => {
            let mut out = String::new();
            write_value(&mut out, v, 0);
            Cow::Owned(out)
        }
    };
    clean(text, |c| c == ',')
}

fn write_value(out: &mut String, v: Option<&AnyValue>, depth: u32) {
    use std::fmt::Write;
    let Some(v) = v.and_then(|v| v.value.as_ref()) else {
        return;
    };
    if depth > 8 {
        return;
    }
    match v {
        any_value::Value::StringValue(s) => out.push_str(s),
        any_value::Value::BoolValue(b) => out.push_str(if *b { "true" } else { "false" }),
        any_value::Value::IntValue(i) => {
            let _ = write!(out, "{i}");
        }
        any_value::Value::DoubleValue(d) => {
            let _ = write!(out, "{d}");
        }
        any_value::Value::BytesValue(b) => {
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
        }
        any_value::Value::ArrayValue(a) => {
            out.push('[');
            for (i, item) in a.values.iter().enumerate() {
                if i > 0 {
                    out.push(';');
                }
                write_value(out, Some(item), depth + 1);
            }
            out.push(']');
        }
        any_value::Value::KvlistValue(l) => {
            out.push('{');
            for (i, kv) in l.values.iter().enumerate() {
                if i > 0 {
                    out.push(';');
                }
                out.push_str(&kv.key);
                out.push('=');
                write_value(out, kv.value.as_ref(), depth + 1);
            }
            out.push('}');
        }
        any_value::Value::StringValueStrindex(_) => {}
    }
}

#[cfg(test)]
mod tests;
