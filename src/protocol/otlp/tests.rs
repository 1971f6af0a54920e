//! Unit tests of [`super`].

use super::*;
use Temporality::{Cumulative, Delta};
use any_value::Value as Any;
use metrics::exponential_histogram_data_point::Buckets;
use metrics::{AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint};
use metrics::{Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, number_data_point};
use metrics::{ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint};
use opentelemetry_proto::tonic::common::v1::{ArrayValue, InstrumentationScope, KeyValueList};
use opentelemetry_proto::tonic::resource::v1::Resource;
use proptest::prelude::{any, prop_assert, prop_assert_eq};
use proptest::{collection::btree_map, collection::vec, sample, sample::Index};
use std::io::Write;

const CUMULATIVE: i32 = AggregationTemporality::Cumulative as i32;
const DELTA: i32 = AggregationTemporality::Delta as i32;
const TIME: u64 = 1_700_000_000_000_000_000;
const MB: usize = 1 << 20;

fn kv(key: &str, value: Any) -> KeyValue {
    let mut kv = KeyValue::default();
    (kv.key, kv.value) = (key.to_owned(), Some(AnyValue { value: Some(value) }));
    kv
}

fn text(key: &str, value: &str) -> KeyValue {
    kv(key, Any::StringValue(value.into()))
}

fn array(values: Vec<Any>) -> Any {
    let wrap = |v| AnyValue { value: Some(v) };
    Any::ArrayValue(ArrayValue {
        values: values.into_iter().map(wrap).collect(),
    })
}

/// A number point at `TIME`, started at 1.
fn dp(attributes: Vec<KeyValue>, v: f64) -> NumberDataPoint {
    let mut p = NumberDataPoint {
        attributes,
        ..Default::default()
    };
    (p.start_time_unix_nano, p.time_unix_nano) = (1, TIME);
    p.value = Some(number_data_point::Value::AsDouble(v));
    p
}

fn metric(name: &str, data: Data) -> Metric {
    let mut m = Metric::default();
    (m.name, m.data) = (name.to_owned(), Some(data));
    m
}

fn sum(name: &str, aggregation_temporality: i32, is_monotonic: bool, p: NumberDataPoint) -> Metric {
    let (data_points, t, m) = (vec![p], aggregation_temporality, is_monotonic);
    let sum = Sum {
        data_points,
        aggregation_temporality: t,
        is_monotonic: m,
    };
    metric(name, Data::Sum(sum))
}

/// A cumulative monotonic Sum of one point.
fn counter(name: &str, p: NumberDataPoint) -> Metric {
    sum(name, CUMULATIVE, true, p)
}

fn gauge(name: &str, p: NumberDataPoint) -> Metric {
    let data_points = vec![p];
    metric(name, Data::Gauge(Gauge { data_points }))
}

/// A gauge of one point at `TIME`, changed by `f`.
fn num(f: impl FnOnce(&mut NumberDataPoint)) -> Metric {
    let mut p = dp(vec![], 1.0);
    f(&mut p);
    gauge("g", p)
}

/// A histogram of one point (bounds `[1]`, counts `[1, 2]`), changed by `f`.
fn histo(aggregation_temporality: i32, f: impl FnOnce(&mut HistogramDataPoint)) -> Metric {
    let mut p = HistogramDataPoint::default();
    (p.explicit_bounds, p.bucket_counts, p.time_unix_nano) = (vec![1.0], vec![1, 2], TIME);
    f(&mut p);
    let (data_points, t) = (vec![p], aggregation_temporality);
    metric(
        "h",
        Data::Histogram(Histogram {
            data_points,
            aggregation_temporality: t,
        }),
    )
}

fn expo(t: i32, f: impl FnOnce(&mut ExponentialHistogramDataPoint)) -> Metric {
    let time_unix_nano = TIME;
    let mut p = ExponentialHistogramDataPoint {
        time_unix_nano,
        ..Default::default()
    };
    f(&mut p);
    let (data_points, aggregation_temporality) = (vec![p], t);
    let h = ExponentialHistogram {
        data_points,
        aggregation_temporality,
    };
    metric("e", Data::ExponentialHistogram(h))
}

fn summary(f: impl FnOnce(&mut SummaryDataPoint)) -> Metric {
    let time_unix_nano = TIME;
    let mut p = SummaryDataPoint {
        time_unix_nano,
        ..Default::default()
    };
    f(&mut p);
    let data_points = vec![p];
    metric("s", Data::Summary(Summary { data_points }))
}

/// One resource of `attributes`, one scope `lib` 1, its `metrics`.
fn request(attributes: Vec<KeyValue>, metrics: Vec<Metric>) -> Request {
    let mut scope = InstrumentationScope::default();
    (scope.name, scope.version) = ("lib".to_owned(), "1".to_owned());
    let mut sm = ScopeMetrics::default();
    (sm.scope, sm.metrics) = (Some(scope), metrics);
    let resource = Resource {
        attributes,
        ..Default::default()
    };
    let mut rm = ResourceMetrics::default();
    (rm.resource, rm.scope_metrics) = (Some(resource), vec![sm]);
    let resource_metrics = vec![rm];
    Request { resource_metrics }
}

/// A point, owned and comparable (its value by its `Debug`).
#[derive(Debug, Clone, PartialEq)]
struct Flat {
    series: u128,
    name: String,
    host: Option<String>,
    tags: Vec<(String, String)>,
    kind: Kind,
    temporality: Temporality,
    start: u64,
    time: u64,
    value: String,
}

type Flats = Vec<Result<Flat, Invalid>>;

fn flatten_with(request: &Request, resource_tags: &[String]) -> (Flats, Walk) {
    let mut out = Vec::new();
    let walk = for_each_point(request, resource_tags, |p| {
        out.push(p.map(|p| {
            Flat {
                series: p.series,
                name: p.name.to_owned(),
                host: p.host.map(str::to_owned),
                tags: p
                    .tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                kind: p.kind,
                temporality: p.temporality,
                start: p.start,
                time: p.time,
                value: format!("{:?}", p.value),
            }
        }))
    });
    (out, walk)
}

fn defaults() -> Vec<String> {
    RESOURCE_TAGS.map(String::from).to_vec()
}

fn flatten(request: &Request) -> Flats {
    let (points, walk) = flatten_with(request, &defaults());
    assert_eq!(walk, Walk::default());
    points
}

/// The one point of `request`, or why it is invalid.
fn why(request: &Request) -> Result<Flat, Invalid> {
    match &flatten(request)[..] {
        [p] => p.clone(),
        other => panic!("not one point: {other:?}"),
    }
}

/// The one point of a request of `metric` alone.
fn alone(metric: Metric) -> Result<Flat, Invalid> {
    why(&request(vec![], vec![metric]))
}

/// The one valid point of `request`.
fn one(request: &Request) -> Flat {
    why(request).expect("valid")
}

/// The tags of a gauge point of `attributes` under `resource`.
fn tags_of(resource: Vec<KeyValue>, attributes: Vec<KeyValue>) -> Vec<(String, String)> {
    one(&request(resource, vec![gauge("g", dp(attributes, 1.0))])).tags
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|&(k, v)| (k.into(), v.into())).collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("compress");
    e.finish().expect("compress")
}

fn sample() -> Request {
    let resource = vec![text("service.name", "api"), text("host.name", "web-1")];
    let points = dp(vec![text("code", "200")], 42.0);
    request(resource, vec![counter("requests", points)])
}

#[test]
fn a_body_decodes_to_the_request_plain_or_gzipped_protobuf_or_json() {
    let req = sample();
    for (body, encoding) in [
        (req.encode_to_vec(), Encoding::Protobuf),
        (serde_json::to_vec(&req).expect("json"), Encoding::Json),
    ] {
        let n = body.len();
        assert_eq!(decode(&body, encoding, false, n).expect("decodes"), req);
        let zipped = gzip(&body);
        assert_eq!(decode(&zipped, encoding, true, n).expect("decodes"), req);
    }
}

#[test]
fn otlp_json_with_string_integers_decodes_to_the_points_of_its_protobuf_form() {
    let json = br#"{"resourceMetrics":[{"resource":{"attributes":[
        {"key":"service.name","value":{"stringValue":"api"}},
        {"key":"host.name","value":{"stringValue":"web-1"}}]},
      "scopeMetrics":[{"scope":{"name":"lib","version":"1"},"metrics":[
        {"name":"requests","sum":{"aggregationTemporality":2,"isMonotonic":true,"dataPoints":[
          {"attributes":[{"key":"code","value":{"intValue":"200"}}],
           "startTimeUnixNano":"1","timeUnixNano":"1700000000000000000","asInt":"42"}]}},
        {"name":"temp","gauge":{"dataPoints":[
          {"startTimeUnixNano":"1","timeUnixNano":"1700000000000000000","asDouble":21.5}]}},
        {"name":"h","histogram":{"aggregationTemporality":2,"dataPoints":[
          {"timeUnixNano":"1700000000000000000","count":"3","sum":7.5,
           "bucketCounts":["1","2"],"explicitBounds":[1.0]}]}}]}]}]}"#;
    let code = vec![kv("code", Any::IntValue(200))];
    let requests = NumberDataPoint {
        value: Some(number_data_point::Value::AsInt(42)),
        ..dp(code, 0.0)
    };
    let metrics = vec![
        counter("requests", requests),
        gauge("temp", dp(vec![], 21.5)),
        histo(CUMULATIVE, |h| (h.count, h.sum) = (3, Some(7.5))),
    ];
    let resource = vec![text("service.name", "api"), text("host.name", "web-1")];
    let proto = request(resource, metrics).encode_to_vec();
    let from_json = decode(json, Encoding::Json, false, MB).expect("decodes");
    let from_proto = decode(&proto, Encoding::Protobuf, false, MB).expect("decodes");
    assert_eq!(from_json, from_proto);
    let points = flatten(&from_json);
    assert_eq!(points, flatten(&from_proto));
    let p = points[0].clone().expect("valid");
    let got = (p.name.as_str(), p.value.as_str(), p.time, p.host.as_deref());
    assert_eq!(got, ("requests", "Number(42.0)", TIME, Some("web-1")));
    assert_eq!(p.tags, pairs(&[("code", "200"), ("service.name", "api")]));
    assert_eq!(points.len(), 3);
}

#[test]
fn a_body_over_the_limit_is_too_large_before_or_after_inflating() {
    let body = sample().encode_to_vec();
    let n = body.len();
    let too_large = |r: Result<Request, BodyError>, max| match r {
        Err(BodyError::TooLarge(m)) => assert_eq!(m, max),
        other => panic!("{other:?}"),
    };
    too_large(decode(&body, Encoding::Protobuf, false, n - 1), n - 1);
    let zipped = gzip(&body);
    assert!(decode(&zipped, Encoding::Protobuf, true, n).is_ok()); // exactly at it
    too_large(decode(&zipped, Encoding::Protobuf, true, n - 1), n - 1);
    let bomb = gzip(&vec![0u8; 16 * MB]);
    assert!(bomb.len() < MB / 8, "{} bytes", bomb.len());
    too_large(decode(&bomb, Encoding::Protobuf, true, MB), MB);
    too_large(decode(&bomb, Encoding::Json, true, MB), MB);
}

#[test]
fn bodies_that_do_not_decode_say_which_layer_failed() {
    let r = decode(b"\xff\xff\xff", Encoding::Protobuf, false, MB);
    assert!(matches!(r, Err(BodyError::Protobuf(_))), "{r:?}");
    for json in [
        &b"{\"resourceMetrics\": ["[..],
        b"{\"resourceMetrics\": 5}",
        b"\xff",
    ] {
        let r = decode(json, Encoding::Json, false, MB);
        assert!(matches!(r, Err(BodyError::Json(_))), "{r:?}");
    }
    let zipped = gzip(&sample().encode_to_vec());
    let n = zipped.len();
    for body in [
        &zipped[..n - 4],
        &zipped[..n / 2],
        &zipped[..5],
        b"not gzip at all",
    ] {
        let r = decode(body, Encoding::Protobuf, true, MB);
        assert!(matches!(r, Err(BodyError::Gzip(_))), "{body:?}: {r:?}");
    }
}

#[test]
fn tags_are_point_attributes_and_promoted_resource_ones_sorted_a_point_attribute_winning() {
    let resource = vec![
        text("service.name", "api"),
        text("k8s.pod.uid", "pod-1"),
        text("deployment.environment", "prod"),
        text("host.name", "web-1"),
    ];
    let attributes = vec![
        text("zone", "b"),
        text("service.name", "worker"),
        text("az", "1"),
    ];
    let p = one(&request(resource, vec![gauge("g", dp(attributes, 1.0))]));
    let want = [
        ("az", "1"),
        ("deployment.environment", "prod"),
        ("service.name", "worker"),
        ("zone", "b"),
    ];
    assert_eq!((p.tags, p.host.as_deref()), (pairs(&want), Some("web-1")));
}

#[test]
fn host_name_is_the_host_never_a_tag_and_stays_with_its_resource() {
    let g = || vec![gauge("g", dp(vec![], 1.0))];
    let req = request(vec![text("host.name", "web-1")], g());
    let (points, _) = flatten_with(&req, &["host.name".to_owned()]);
    let p = points[0].clone().expect("valid");
    assert_eq!((p.host.as_deref(), p.tags), (Some("web-1"), vec![])); // even when listed
    for host in [text("host.name", ""), kv("host.name", Any::IntValue(7))] {
        let p = one(&request(vec![host], g()));
        assert_eq!((p.host, p.tags), (None, vec![]));
    }
    // A second resource without one has none, nor the first one's tags.
    let mut req = request(
        vec![text("service.name", "api"), text("host.name", "web-1")],
        g(),
    );
    let mut second = req.resource_metrics[0].clone();
    second.resource = None;
    req.resource_metrics.push(second);
    let host_and_tags = |p: Result<Flat, _>| p.map(|p| (p.host, p.tags));
    let hosts: Vec<_> = flatten(&req).into_iter().map(host_and_tags).collect();
    let api = pairs(&[("service.name", "api")]);
    assert_eq!(hosts, [Ok((Some("web-1".into()), api)), Ok((None, vec![]))]);
}

#[test]
fn a_resource_attribute_not_promoted_is_no_tag_but_makes_another_series() {
    let c = || vec![counter("c", dp(vec![], 1.0))];
    let pod = |uid| request(vec![text("k8s.pod.uid", uid)], c());
    let (a, b) = (one(&pod("pod-1")), one(&pod("pod-2")));
    assert_eq!((&a.tags, &b.tags), (&vec![], &vec![]));
    assert_ne!(a.series, b.series);
    let (points, _) = flatten_with(&pod("pod-1"), &["k8s.pod.uid".to_owned()]);
    let listed = points[0].clone().expect("valid");
    assert_eq!(listed.tags, pairs(&[("k8s.pod.uid", "pod-1")])); // unless listed
    assert_eq!(listed.series, a.series); // promotion is no part of the series
}

#[test]
fn a_point_s_series_is_its_resource_scope_name_kind_and_attributes() {
    let c = |m: Metric| one(&request(vec![], vec![m])).series;
    let mut scoped = request(vec![], vec![counter("x", dp(vec![], 1.0))]);
    scoped.resource_metrics[0].scope_metrics[0].scope = None;
    let series = [
        c(counter("x", dp(vec![], 1.0))),
        c(sum("x", CUMULATIVE, false, dp(vec![], 1.0))),
        c(gauge("x", dp(vec![], 1.0))),
        c(counter("y", dp(vec![], 1.0))),
        c(counter("x", dp(vec![kv("a", Any::IntValue(1))], 1.0))),
        c(counter("x", dp(vec![text("a", "1")], 1.0))),
        c(counter("x", dp(vec![text("", "1")], 1.0))), // no tag, but part of it
        one(&scoped).series,
    ];
    let distinct: std::collections::HashSet<u128> = series.iter().copied().collect();
    assert_eq!(distinct.len(), series.len(), "{series:x?}");
    assert_eq!(c(sum("x", DELTA, true, dp(vec![], 1.0))), series[0]); // the same kind
    let mut later = dp(vec![], 9.0);
    later.time_unix_nano += 1;
    assert_eq!(c(counter("x", later)), series[0]); // neither time nor value
}

#[test]
fn separators_and_control_characters_in_keys_and_values_become_underscores() {
    let tags = tags_of(vec![], vec![text("a,b:c\td", "x,y:z\n")]);
    assert_eq!(tags, pairs(&[("a_b_c_d", "x_y:z_")])); // a `:` stays in a value
}

#[test]
fn attribute_values_are_written_as_text_and_an_empty_key_left_out() {
    let map = vec![text("k", "v"), kv("n", Any::IntValue(2)), text("c", "1,2")];
    let nested = array(vec![
        array(vec![Any::IntValue(1), Any::IntValue(2)]),
        Any::IntValue(3),
    ]);
    let attributes = vec![
        kv("a", Any::IntValue(-7)),
        kv("b", Any::BoolValue(true)),
        kv("c", Any::BoolValue(false)),
        kv("d", Any::DoubleValue(2.5)),
        kv("e", Any::DoubleValue(1.0)),
        kv("f", Any::BytesValue(vec![0x0a, 0xff])),
        kv("g", array(vec![Any::IntValue(1), Any::BoolValue(false)])),
        kv("h", Any::KvlistValue(KeyValueList { values: map })),
        kv("i", nested),
        KeyValue {
            value: None,
            ..text("j", "")
        },
        text("", "left out"),
    ];
    let want = [
        ("a", "-7"),
        ("b", "true"),
        ("c", "false"),
        ("d", "2.5"),
        ("e", "1"),
        ("f", "0aff"),
        ("g", "[1;false]"),
        ("h", "{k=v;n=2;c=1_2}"),
        ("i", "[[1;2];3]"),
        ("j", ""),
    ];
    assert_eq!(tags_of(vec![], attributes), pairs(&want));
}

#[test]
fn each_kind_has_its_temporality() {
    let metrics = [
        gauge("g", dp(vec![], 1.0)),
        sum("u", DELTA, false, dp(vec![], 1.0)),
        counter("c", dp(vec![], 1.0)),
        histo(DELTA, |_| ()),
        expo(CUMULATIVE, |_| ()),
        summary(|_| ()),
    ];
    let got: Vec<(Kind, Temporality)> = metrics
        .into_iter()
        .map(|m| alone(m).map(|p| (p.kind, p.temporality)).expect("valid"))
        .collect();
    let want = [
        (Kind::Gauge, Delta),
        (Kind::Sum, Delta),
        (Kind::MonotonicSum, Cumulative),
        (Kind::Histogram, Delta),
        (Kind::ExponentialHistogram, Cumulative),
        (Kind::Summary, Cumulative),
    ];
    assert_eq!(got, want);
}

#[test]
fn invalid_points_say_why() {
    let invalid = |m: Metric| alone(m).err();
    let t = Some(Invalid::Temporality);
    assert_eq!(invalid(sum("s", 0, true, dp(vec![], 1.0))), t);
    assert_eq!(invalid(sum("s", 7, false, dp(vec![], 1.0))), t);
    assert_eq!(invalid(histo(0, |_| ())), t);
    assert_eq!(invalid(expo(0, |_| ())), t);
    assert_eq!(invalid(counter("", dp(vec![], 1.0))), Some(Invalid::Name));
    assert_eq!(invalid(num(|p| p.time_unix_nano = 0)), Some(Invalid::Time));
    assert_eq!(invalid(num(|p| p.value = None)), Some(Invalid::NoValue));
    let nan = Some(Invalid::NotFinite);
    assert_eq!(invalid(gauge("g", dp(vec![], f64::NAN))), nan);
    assert_eq!(invalid(gauge("g", dp(vec![], f64::NEG_INFINITY))), nan);
    assert_eq!(invalid(histo(DELTA, |h| h.sum = Some(f64::NAN))), nan);
    assert_eq!(invalid(histo(DELTA, |h| h.max = Some(f64::INFINITY))), nan);
    let bound = histo(DELTA, |h| h.explicit_bounds[0] = f64::INFINITY);
    assert_eq!(invalid(bound), nan);
    assert_eq!(invalid(expo(DELTA, |e| e.zero_threshold = f64::NAN)), nan);
    assert_eq!(invalid(summary(|s| s.sum = f64::INFINITY)), nan);
    let counts = |c: Vec<u64>| invalid(histo(DELTA, |h| h.bucket_counts = c));
    let buckets = Some(Invalid::Buckets);
    assert_eq!((counts(vec![1]), counts(vec![1, 2, 3])), (buckets, buckets));
    assert_eq!(counts(vec![]), None); // count and sum only
    let min = number_data_point::Value::AsInt(i64::MIN);
    assert_eq!(invalid(num(|p| p.value = Some(min))), None);
}

#[test]
fn a_point_s_tags_have_unique_keys_even_when_its_resource_repeats_one() {
    let twice = vec![text("service.name", "a"), text("service.name", "b")];
    assert_eq!(tags_of(twice, vec![]).len(), 1);
    let req = request(vec![text("a,b", "1"), text("a:b", "2")], vec![num(|_| ())]);
    let (points, _) = flatten_with(&req, &["a,b".to_owned(), "a:b".to_owned()]);
    assert_eq!(points[0].as_ref().map(|p| p.tags.len()), Ok(1));
}

#[test]
fn a_point_with_no_recorded_value_is_skipped_and_counted() {
    let flagged = |flags, mut p: NumberDataPoint| {
        p.flags = flags;
        p
    };
    let mut invalid = dp(vec![], 0.0);
    (invalid.value, invalid.time_unix_nano) = (None, 0);
    let data_points = vec![
        dp(vec![], 1.0),
        flagged(1, dp(vec![], 2.0)),
        flagged(1, invalid),
    ];
    let gauge = metric("g", Data::Gauge(Gauge { data_points }));
    let req = request(
        vec![],
        vec![gauge, counter("c", flagged(2, dp(vec![], 3.0)))],
    );
    let (points, walk) = flatten_with(&req, &defaults());
    let value = |p: Result<Flat, Invalid>| p.expect("valid").value;
    let values: Vec<String> = points.into_iter().map(value).collect();
    assert_eq!(values, ["Number(1.0)", "Number(3.0)"]); // another flag is no marker
    assert_eq!(walk.no_recorded_value, 2);
}

/// A request of every kind of metric and attribute value, for the
/// properties to damage.
fn rich() -> Request {
    let nested = Any::KvlistValue(KeyValueList {
        values: vec![text("k", "v,w")],
    });
    let attributes = vec![
        text("s", "a:b"),
        kv("i", Any::IntValue(-3)),
        kv("d", Any::DoubleValue(0.5)),
        kv("y", Any::BytesValue(vec![1, 2])),
        kv("l", array(vec![nested])),
    ];
    let buckets = Some(Buckets {
        offset: -2,
        bucket_counts: vec![1, 2, 3],
    });
    let exponential = |e: &mut ExponentialHistogramDataPoint| {
        (e.attributes, e.count, e.scale) = (attributes.clone(), 7, 3);
        (e.positive, e.negative) = (buckets.clone(), buckets.clone());
    };
    let stale = NumberDataPoint {
        flags: 1,
        ..dp(vec![], 2.0)
    };
    let resource = vec![
        text("service.name", "api"),
        text("host.name", "h"),
        text("k8s.pod.uid", "p"),
    ];
    let metrics = vec![
        counter("c", dp(attributes.clone(), 1.0)),
        gauge("g", stale),
        histo(CUMULATIVE, |h| h.attributes = attributes.clone()),
        expo(CUMULATIVE, exponential),
        summary(|s| (s.count, s.sum) = (2, 3.0)),
    ];
    request(resource, metrics)
}

/// What is wrong with the points of `request` (nothing: none), walked twice.
fn flaws(request: &Request) -> Vec<String> {
    let resource_tags = [defaults(), vec!["k8s.pod.uid".to_owned(), "a,b".to_owned()]].concat();
    let (points, _) = flatten_with(request, &resource_tags);
    let mut flaws = Vec::new();
    if flatten_with(request, &resource_tags).0 != points {
        flaws.push("a second walk differs".to_owned());
    }
    let bad_key = |k: &str| k.is_empty() || k.contains([',', ':']) || k.contains(char::is_control);
    let bad_value = |v: &str| v.contains(',') || v.contains(char::is_control);
    for p in points.into_iter().flatten() {
        let sorted = p.tags.windows(2).all(|w| w[0].0 < w[1].0);
        if !sorted || p.tags.iter().any(|(k, v)| bad_key(k) || bad_value(v)) {
            flaws.push(format!("tags {:?}", p.tags));
        }
        if p.time == 0 || p.name.is_empty() || p.host.as_deref() == Some("") {
            flaws.push(format!("{p:?}"));
        }
    }
    flaws
}

#[test]
fn the_rich_request_is_flawless_and_has_its_points() {
    let (points, walk) = flatten_with(&rich(), &defaults());
    let valid = points.iter().filter(|p| p.is_ok()).count();
    assert_eq!((points.len(), valid, walk.no_recorded_value), (4, 4, 1));
    assert_eq!(flaws(&rich()), Vec::<String>::new());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

    /// No body panics the decoder, whatever the encoding and gzip; gzip
    /// changes nothing, and the limit holds.
    #[test]
    fn decode_never_panics_and_gzip_changes_nothing(
        body in vec(any::<u8>(), 0..400),
        json: bool,
        max in 0usize..500,
    ) {
        let encoding = if json { Encoding::Json } else { Encoding::Protobuf };
        let plain = decode(&body, encoding, false, max);
        let _ = decode(&body, encoding, true, max);
        if body.len() > max {
            prop_assert!(matches!(plain, Err(BodyError::TooLarge(m)) if m == max));
        }
        let zipped = decode(&gzip(&body), encoding, true, max);
        prop_assert_eq!(format!("{plain:?}"), format!("{zipped:?}"));
    }

    /// Whatever request arbitrary bytes decode to, its walk does not
    /// panic and its tags are clean.
    #[test]
    fn for_each_point_never_panics_on_arbitrary_bytes(body in vec(any::<u8>(), 0..400)) {
        if let Ok(req) = decode(&body, Encoding::Protobuf, false, usize::MAX) {
            prop_assert_eq!(flaws(&req), Vec::<String>::new());
        }
    }

    /// The same for the rich request with bytes overwritten and appended.
    #[test]
    fn for_each_point_never_panics_on_a_damaged_request(
        edits in vec((any::<Index>(), any::<u8>()), 1..6),
        tail in vec(any::<u8>(), 0..40),
    ) {
        let mut body = rich().encode_to_vec();
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        body.extend(tail);
        if let Ok(req) = decode(&body, Encoding::Protobuf, false, usize::MAX) {
            prop_assert_eq!(flaws(&req), Vec::<String>::new());
        }
    }

    /// Attributes in any order give the same points, even keys that clean
    /// to the same tag key.
    #[test]
    fn attribute_order_never_changes_a_point(
        attributes in btree_map("[ab,:.]{0,3}", "[ab,:\n]{0,2}", 0..6),
        resource in btree_map(
            sample::select(vec!["service.name", "host.name", "k8s.pod.uid", "a,b"]),
            "[ab,]{0,2}",
            0..4,
        ),
        rotate in 0usize..6,
    ) {
        let attributes: Vec<KeyValue> = attributes.iter().map(|(k, v)| text(k, v)).collect();
        let resource: Vec<KeyValue> = resource.iter().map(|(k, v)| text(k, v)).collect();
        let req = |r, a| request(r, vec![counter("c", dp(a, 1.0))]);
        let mut turned = attributes.clone();
        turned.rotate_left(rotate.min(attributes.len()));
        let tags = [defaults(), vec!["a,b".to_owned()]].concat();
        let (a, _) = flatten_with(&req(resource.clone(), attributes), &tags);
        let (b, _) = flatten_with(&req(resource.into_iter().rev().collect(), turned), &tags);
        prop_assert_eq!(a.len(), 1);
        prop_assert_eq!(&a, &b);
    }
}

#[test]
fn a_histogram_of_more_than_max_buckets_is_refused() {
    let point = metrics::HistogramDataPoint {
        time_unix_nano: 1,
        count: 1,
        bucket_counts: vec![0; MAX_BUCKETS + 2],
        explicit_bounds: (0..=MAX_BUCKETS).map(|b| b as f64).collect(),
        ..Default::default()
    };
    let metric = metrics::Metric {
        name: "h".into(),
        data: Some(metrics::metric::Data::Histogram(metrics::Histogram {
            data_points: vec![point],
            aggregation_temporality: metrics::AggregationTemporality::Delta as i32,
        })),
        ..Default::default()
    };
    let request = Request {
        resource_metrics: vec![metrics::ResourceMetrics {
            scope_metrics: vec![metrics::ScopeMetrics {
                metrics: vec![metric],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut seen = Vec::new();
    for_each_point(&request, &[], |p| seen.push(p.map(|_| ()).err()));
    assert_eq!(seen, [Some(Invalid::TooManyBuckets)]);
}
