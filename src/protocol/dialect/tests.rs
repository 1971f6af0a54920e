//! Golden tests of the dialects: the inputs of the threads that asked for
//! them (statsd_exporter PR#267, PR#315 and its `pkg/line` tests, the
//! Telegraf and client threads, Graphite's tag syntax), with what tallyd
//! makes of each.

use super::*;
use crate::protocol::statsd::{Limits, MetricType, Parsed, parse_line};

/// `(name, tags as key:value, in order)` of `line` parsed with `dialects`
/// and its DogStatsD tags after them, or the reason it was refused.
fn read(line: &str, dialects: Dialects) -> Result<(String, Vec<String>), ParseError> {
    let limits = Limits {
        dialects,
        ..Limits::default()
    };
    let Parsed::Metric(l) = parse_line(line.as_bytes(), &limits)? else {
        panic!("{line} is not a metric");
    };
    let (a, b) = l.name_parts();
    let name = String::from_utf8_lossy(&[a, b].concat()).into_owned();
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
    let mut tags: Vec<String> = l
        .name_tags
        .iter()
        .flat_map(|nt| nt.tags(l.name))
        .map(|(k, v)| format!("{}:{}", text(k), text(v)))
        .collect();
    crate::protocol::statsd::for_each_tag(l.tags, |t| tags.push(text(t)));
    Ok((name, tags))
}

fn ok(name: &str, tags: &[&str]) -> Result<(String, Vec<String>), ParseError> {
    Ok((name.into(), tags.iter().map(|t| (*t).to_owned()).collect()))
}

const ALL: Dialects = Dialects(0b1111);

#[test]
fn librato_tags_follow_a_hash() {
    let d = Dialects::LIBRATO;
    // PR#267's description and its test.
    assert_eq!(
        read("metric.name#tag=val,tag2=val2:0|c", d),
        ok("metric.name", &["tag:val", "tag2:val2"])
    );
    assert_eq!(
        read("foo#tag1=bar,tag2=baz:100|c", d),
        ok("foo", &["tag1:bar", "tag2:baz"])
    );
    // statsite#258's line: tag values with dots.
    assert_eq!(
        read("my.metric#service=web,app_version=1.12:42|ms", d),
        ok("my.metric", &["service:web", "app_version:1.12"])
    );
}

#[test]
fn influxdb_tags_follow_a_comma() {
    let d = Dialects::INFLUXDB;
    // statsd_exporter's test, the Telegraf README's form (statsd-php#73),
    // node-statsd-client#74 and #81.
    assert_eq!(
        read("foo,tag1=bar,tag2=baz:100|c", d),
        ok("foo", &["tag1:bar", "tag2:baz"])
    );
    assert_eq!(
        read("cpu.load.short,host=server01,region=us-west:2.34|g", d),
        ok("cpu.load.short", &["host:server01", "region:us-west"])
    );
    assert_eq!(
        read("foo,test=tag,other=tag:10|h", d),
        ok("foo", &["test:tag", "other:tag"])
    );
    assert_eq!(
        read("my_counter,service=value:+3|c", d),
        ok("my_counter", &["service:value"])
    );
    // A value holding `=` keeps it: only the first one splits.
    assert_eq!(read("q,expr=a=b:1|c", d), ok("q", &["expr:a=b"]));
}

#[test]
fn signalfx_tags_sit_in_brackets_anywhere_in_the_name() {
    let d = Dialects::SIGNALFX;
    // PR#315's tests: in the middle, at the end, at the start, empty.
    assert_eq!(
        read("foo.[tag1=bar,tag2=baz]test:100|c", d),
        ok("foo.test", &["tag1:bar", "tag2:baz"])
    );
    assert_eq!(
        read("foo.test[tag1=bar,tag2=baz]:100|c", d),
        ok("foo.test", &["tag1:bar", "tag2:baz"])
    );
    assert_eq!(
        read("[tag1=bar,tag2=baz]foo.test:100|c", d),
        ok("foo.test", &["tag1:bar", "tag2:baz"])
    );
    assert_eq!(read("foo.[]test:100|c", d), ok("foo.test", &[]));
    // Where statsd_exporter keeps a name with half a tag in it (or drops
    // tags silently), tallyd refuses the line and counts it.
    for line in [
        "[tag1=bar,tag2=bazfoo.test:100|c",
        "tag1=bar,tag2=baz]foo.test:100|c",
        "foo.[tag1,tag2]test:100|c",
        "foo]x[a=b:1|c",
        "a[x=1]b]:1|c",
        "a[x=1]b[y=2]:1|c",
    ] {
        assert_eq!(read(line, d), Err(ParseError::InvalidTag), "{line}");
    }
}

#[test]
fn graphite_tags_follow_semicolons() {
    let d = Dialects::GRAPHITE;
    // Graphite's tagged series syntax (`name;tag=value;...`).
    assert_eq!(
        read("disk.used;rack=a1;datacenter=dc1;server=web01:1|c", d),
        ok("disk.used", &["rack:a1", "datacenter:dc1", "server:web01"])
    );
    // A `,` would split the tag in two.
    assert_eq!(read("req;env=a,b:1|c", d), Err(ParseError::InvalidTag));
}

#[test]
fn a_marker_is_part_of_the_name_while_its_dialect_is_off() {
    // statsd_exporter#324's trap: a `,` or `#` read two ways.
    let none = Dialects::default();
    assert_eq!(read("foo,bar#baz;q:1|c", none), ok("foo,bar#baz;q", &[]));
    assert_eq!(read("a.[b]c:1|c", none), ok("a.[b]c", &[]));
    // Only the dialects that are on take their markers.
    assert_eq!(
        read("foo#x,tag=1:1|c", Dialects::INFLUXDB),
        ok("foo#x", &["tag:1"])
    );
    assert_eq!(
        read("foo,x#tag=1:1|c", Dialects::LIBRATO),
        ok("foo,x", &["tag:1"])
    );
    // While a dialect is on, its marker always starts tags: a name that
    // is not followed by `key=value` tags is refused, never half read.
    for line in ["foo,bar:1|c", "foo,=v:1|c", "foo,k=:1|c", "a#b,c:1|c"] {
        assert_eq!(read(line, ALL), Err(ParseError::InvalidTag), "{line}");
    }
    assert_eq!(read(",k=v:1|c", ALL), Err(ParseError::EmptyName));
    // Tags in brackets, and more tags after: the name would keep half a tag.
    assert_eq!(read("a[x=1]b,c=d:1|c", ALL), Err(ParseError::InvalidTag));
    // The first marker of those that are on starts the tags.
    assert_eq!(
        read(
            "foo#a=1,b=2:1|c",
            Dialects::INFLUXDB.with(Dialects::LIBRATO)
        ),
        ok("foo", &["a:1", "b:2"])
    );
}

#[test]
fn dogstatsd_tags_on_the_same_line_are_kept_as_well() {
    // statsd_exporter refuses these as mixed_tagging_styles.
    assert_eq!(
        read("foo#tag1=foo,tag3=bing:100|c|#tag1:bar,tag2:baz", ALL),
        ok("foo", &["tag1:foo", "tag3:bing", "tag1:bar", "tag2:baz"])
    );
    assert_eq!(
        read("foo[tag1=foo]:100|c|@0.1|#tag2:baz", ALL),
        ok("foo", &["tag1:foo", "tag2:baz"])
    );
}

#[test]
fn name_and_tag_limits_count_the_name_without_its_tags() {
    let limits = Limits {
        max_name_len: 3,
        max_tags: 2,
        max_tag_len: 5,
        dialects: ALL,
    };
    let p = |s: &str| parse_line(s.as_bytes(), &limits).err();
    assert_eq!(p("foo,a=1,b=2:1|c"), None);
    assert_eq!(p("fooo,a=1:1|c"), Some(ParseError::NameTooLong));
    assert_eq!(p("foo,a=1,b=2:1|c|#c"), Some(ParseError::TooManyTags));
    assert_eq!(p("foo,ab=123:1|c"), Some(ParseError::TagTooLong));
    let Ok(Parsed::Metric(l)) = parse_line(b"f[a=1]o:1|ms", &limits) else {
        panic!("not parsed");
    };
    assert_eq!(
        (l.kind, l.name_parts()),
        (MetricType::Timer, (&b"f"[..], &b"o"[..]))
    );
}

#[test]
fn dialect_names_are_checked() {
    assert_eq!(
        Dialects::from_names(&["influxdb", "graphite"]),
        Ok(Dialects::INFLUXDB.with(Dialects::GRAPHITE))
    );
    assert_eq!(Dialects::from_names(&["influx"]), Err("influx".to_owned()));
}
