//! Unit tests of [`super`].

use super::*;

fn parse(s: &str) -> Result<Line<'_>, ParseError> {
    match parse_line(s.as_bytes(), &Limits::default())? {
        Parsed::Metric(l) => Ok(l),
        other => panic!("not a metric: {other:?}"),
    }
}

fn values(s: &str) -> Vec<(f64, bool)> {
    parse(s)
        .unwrap()
        .values()
        .map(|v| (v.value, v.delta))
        .collect()
}

#[test]
fn counter() {
    let l = parse("page.views:3|c").unwrap();
    assert_eq!(l.name, b"page.views");
    assert_eq!(l.kind, MetricType::Counter);
    assert_eq!(values("page.views:3|c"), vec![(3.0, false)]);
    assert_eq!(l.sample_rate, 1.0);
}

#[test]
fn fast_decimal_path_matches_std() {
    for text in [
        "0.1",
        "12.25",
        "-3.5",
        "+7.125",
        "999999999999.999",
        "0.000000000000001",
        "5.",
        "123456789012345",
    ] {
        let want: f64 = text.trim_start_matches('+').parse().expect("std parses");
        assert_eq!(parse_f64(text.as_bytes()), Some(want), "{text}");
    }
    assert_eq!(parse_f64(b".5"), Some(0.5));
    assert_eq!(parse_f64(b"1.2.3"), None);
    // Every string of up to 17 of these bytes that std takes, the same
    // value; every other, none (a pseudo-random sweep).
    let alphabet = b"0123456789..+-e";
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 18) as usize;
        let text: String = (0..len)
            .map(|i| alphabet[((state >> (i * 3 + 5)) as usize ^ i) % alphabet.len()] as char)
            .collect();
        let want = text.parse::<f64>().ok().filter(|v| v.is_finite());
        assert_eq!(parse_f64(text.as_bytes()), want, "{text:?}");
    }
    assert_eq!(parse_f64(b"-"), None);
    assert_eq!(parse_f64(b""), None);
}

#[test]
fn float_counter() {
    assert_eq!(values("x:2.5|c"), vec![(2.5, false)]);
    assert_eq!(values("x:-1.5e2|c"), vec![(-150.0, false)]);
}

#[test]
fn sampled_counter() {
    let l = parse("x:1|c|@0.1").unwrap();
    assert_eq!(l.sample_rate, 0.1);
}

#[test]
fn absolute_gauge() {
    assert_eq!(values("load:0.5|g"), vec![(0.5, false)]);
}

#[test]
fn signed_gauge_is_delta() {
    assert_eq!(values("load:+4|g"), vec![(4.0, true)]);
    assert_eq!(values("load:-4|g"), vec![(-4.0, true)]);
}

#[test]
fn signed_counter_is_not_delta() {
    assert_eq!(values("x:+4|c"), vec![(4.0, false)]);
}

#[test]
fn timer_histogram_distribution() {
    assert_eq!(parse("t:12.5|ms").unwrap().kind, MetricType::Timer);
    assert_eq!(parse("t:12|h").unwrap().kind, MetricType::Histogram);
    assert_eq!(parse("t:12|d").unwrap().kind, MetricType::Distribution);
}

#[test]
fn negative_timer_is_rejected() {
    assert_eq!(parse("t:-1|ms"), Err(ParseError::NegativeValue));
    assert_eq!(parse("t:1:-1|ms"), Err(ParseError::NegativeValue));
    assert_eq!(parse("h:1:-1|h").map(|l| l.value_count()), Ok(2));
    assert_eq!(parse("d:-0.5|d").map(|l| l.first), Ok(-0.5));
}

#[test]
fn set_member_is_any_string() {
    let l = parse("users:alice:smith@x|s").unwrap();
    assert_eq!(l.kind, MetricType::Set);
    assert_eq!(l.raw_values, b"alice:smith@x");
    assert_eq!(l.value_count(), 1);
    assert_eq!(l.values().count(), 0);
}

#[test]
fn multi_value_packing() {
    assert_eq!(
        values("t:1:2:3|ms"),
        vec![(1.0, false), (2.0, false), (3.0, false)]
    );
    assert_eq!(parse("t:1:2:3|ms").unwrap().value_count(), 3);
    assert_eq!(
        values("g:+1:-2:5|g"),
        vec![(1.0, true), (-2.0, true), (5.0, false)]
    );
}

#[test]
fn one_bad_packed_value_rejects_the_line() {
    assert_eq!(parse("t:1:x:3|ms"), Err(ParseError::InvalidValue));
    assert_eq!(parse("t:1::3|c"), Err(ParseError::MissingValue));
}

#[test]
fn tags_are_kept_raw() {
    let l = parse("x:1|c|#b:2,a:1").unwrap();
    assert_eq!(l.tags, b"b:2,a:1");
}

#[test]
fn all_fields_in_any_order() {
    let l = parse("x:1|c|T1700000000|c:abc123|#env:prod|@0.5").unwrap();
    assert_eq!(l.timestamp, Some(1_700_000_000));
    assert_eq!(l.sample_rate, 0.5);
    assert_eq!(l.tags, b"env:prod");
}

#[test]
fn duplicate_field_is_rejected() {
    for line in [
        "x:1|c|@0.5|@0.5",
        "x:1|c|#a|#b",
        "x:1|c|c:a|c:b",
        "x:1|c|T1|T2",
        "x:1|c|e:a|e:b",
        "x:1|c|card:low|card:high",
    ] {
        assert_eq!(parse(line), Err(ParseError::DuplicateField), "{line}");
    }
}

/// One line per DogStatsD protocol version (datagram format docs), each
/// with the fields that version added.
#[test]
fn every_dogstatsd_protocol_version_is_accepted() {
    let cases: &[(&str, &str)] = &[
        ("1.0", "page.views:1|c|@0.5|#country:china,env"),
        ("1.1", "song.length:240:230:250|h|@0.5|#genre:rock"),
        ("1.2", "x:1|c|#env:prod|c:83c3e7f1b1f0c3b56e7b6d8e1d8a7b1a"),
        ("1.3", "x:1|c|#env:prod|T1656581400"),
        ("1.4", "x:1|c|c:ci-4026531835"),
        ("1.5", "x:1|c|e:it-false,cn-nginx,pu-1234"),
        ("1.6", "x:1|c|#env:prod|card:low"),
        ("all", "x:1|d|@1|#a:b|c:id|T1|e:ext|card:high"),
    ];
    for (version, line) in cases {
        let l = parse(line).unwrap_or_else(|e| panic!("{version}: {line}: {e}"));
        assert_eq!(l.skipped_fields, 0, "{version}: {line}");
    }
}

#[test]
fn unknown_fields_are_skipped_and_counted_and_the_line_counts() {
    let l = parse("x:2|c|zzz|#env:prod|q:1||x:y").expect("kept");
    assert_eq!(
        (l.first, l.tags, l.skipped_fields),
        (2.0, &b"env:prod"[..], 4)
    );
    assert_eq!(parse("x:1|c|").expect("kept").skipped_fields, 1);
    assert_eq!(parse("x:1|c|cardinal").expect("kept").skipped_fields, 1);
    let many = format!("x:1|c{}", "|z".repeat(300));
    assert_eq!(parse(&many).expect("kept").skipped_fields, 255);
}

#[test]
fn events_and_service_checks_are_recognised() {
    let l = Limits::default();
    assert_eq!(
        parse_line(b"_e{5,4}:title|text|#a:b", &l),
        Ok(Parsed::Event)
    );
    assert_eq!(
        parse_line(b"_sc|my.check|0|#a:b", &l),
        Ok(Parsed::ServiceCheck)
    );
}

#[test]
fn malformed_lines() {
    let cases: &[(&str, ParseError)] = &[
        ("x", ParseError::MissingValue),
        ("x|c", ParseError::MissingValue),
        (":1|c", ParseError::EmptyName),
        ("x:|c", ParseError::MissingValue),
        ("x:1", ParseError::MissingType),
        ("x:1|", ParseError::MissingType),
        ("x:1|q", ParseError::UnknownType),
        ("x:1|cc", ParseError::UnknownType),
        ("x:abc|c", ParseError::InvalidValue),
        ("x:nan|c", ParseError::InvalidValue),
        ("x:inf|g", ParseError::InvalidValue),
        ("x:1e999|c", ParseError::InvalidValue),
        ("x:--1|g", ParseError::InvalidValue),
        ("x:1|c|@0", ParseError::InvalidSampleRate),
        ("x:1|c|@1.5", ParseError::InvalidSampleRate),
        ("x:1|c|@-1", ParseError::InvalidSampleRate),
        ("x:1|c|@1e-320", ParseError::InvalidSampleRate),
        ("x:1|c|@", ParseError::InvalidSampleRate),
        ("x:1|c|Tabc", ParseError::InvalidTimestamp),
        ("x:1|c|T", ParseError::InvalidTimestamp),
        ("x:1|c|c:", ParseError::InvalidContainer),
        ("x\u{1}y:1|c", ParseError::InvalidName),
        ("x:1|c|#a\u{7f}", ParseError::InvalidTag),
    ];
    for (line, want) in cases {
        assert_eq!(parse(line).err(), Some(*want), "line {line:?}");
    }
}

#[test]
fn invalid_utf8_name_is_rejected() {
    assert_eq!(
        parse_line(b"x\xff:1|c", &Limits::default()),
        Err(ParseError::InvalidName)
    );
}

#[test]
fn limits_are_enforced() {
    let limits = Limits {
        max_name_len: 4,
        max_tags: 2,
        max_tag_len: 3,
        ..Limits::default()
    };
    let p = |s: &str| parse_line(s.as_bytes(), &limits).err();
    assert_eq!(p("abcde:1|c"), Some(ParseError::NameTooLong));
    assert_eq!(p("abcd:1|c"), None);
    assert_eq!(p("a:1|c|#a,b,c"), Some(ParseError::TooManyTags));
    assert_eq!(p("a:1|c|#a,,b"), None);
    assert_eq!(p("a:1|c|#abcd"), Some(ParseError::TagTooLong));
}

#[test]
fn utf8_names_and_tags_are_accepted() {
    let l = parse("größe:1|c|#stadt:köln").unwrap();
    assert_eq!(l.name, "größe".as_bytes());
}

#[test]
fn lines_split_on_lf_and_crlf() {
    let got: Vec<&[u8]> = lines(b"a:1|c\r\nb:2|c\n\nc:3|c").collect();
    assert_eq!(got, vec![&b"a:1|c"[..], b"b:2|c", b"c:3|c"]);
    assert_eq!(lines(b"a:1|c\n").count(), 1);
    assert_eq!(lines(b"").count(), 0);
}

#[test]
fn arbitrary_bytes_do_not_panic() {
    let mut seed = 0x9e3779b97f4a7c15u64;
    let alphabet = b"ab:|@#,.-+e0123456789cgmshdT_{}\r\n\xff\x00";
    for _ in 0..20_000 {
        let mut buf = [0u8; 24];
        for b in buf.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = alphabet[(seed % alphabet.len() as u64) as usize];
        }
        for line in lines(&buf) {
            if let Ok(Parsed::Metric(l)) = parse_line(line, &Limits::default()) {
                assert_eq!(
                    l.values().count(),
                    if l.kind == MetricType::Set {
                        0
                    } else {
                        l.value_count()
                    }
                );
            }
        }
    }
}
