//! Property tests over the three decoders that take bytes from outside: the
//! StatsD parser, the protobuf decoder and the WAL record decoder. Arbitrary
//! input never panics, and what is accepted round-trips. The in-place
//! protobuf reader accepts exactly what prost's generated code decodes, and
//! reads the same values.

use proptest::prelude::*;
use prost::Message;
use tallyd::aggregate::key::{self, KeyBuf};
use tallyd::protocol::batch::{BatchView, EventValue};
use tallyd::protocol::dialect::Dialects;
use tallyd::protocol::proto::pb::event::Value;
use tallyd::protocol::proto::{self, Batch, Event, Tag};
use tallyd::protocol::statsd::{self, Limits, MetricType, Parsed};
use tallyd::wal::format::{self, Decoded, Kind};

/// Whether the in-place view read what prost decoded (floats by their bits).
fn same_batch(view: &BatchView<'_>, batch: &Batch) -> bool {
    let value = |v: Option<EventValue<'_>>, p: &Option<Value>| match (v, p) {
        (None, None) => true,
        (Some(EventValue::SetMember(a)), Some(Value::SetMember(b))) => a == b.as_bytes(),
        (Some(EventValue::Counter(a)), Some(Value::Counter(b)))
        | (Some(EventValue::Gauge(a)), Some(Value::Gauge(b)))
        | (Some(EventValue::GaugeDelta(a)), Some(Value::GaugeDelta(b)))
        | (Some(EventValue::TimerMs(a)), Some(Value::TimerMs(b)))
        | (Some(EventValue::Histogram(a)), Some(Value::Histogram(b)))
        | (Some(EventValue::Distribution(a)), Some(Value::Distribution(b))) => {
            a.to_bits() == b.to_bits()
        }
        _ => false,
    };
    view.client_id == batch.client_id
        && view.sequence == batch.sequence
        && view.len == batch.events.len()
        && view.events().count() == batch.events.len()
        && view.events().zip(&batch.events).all(|(v, p)| {
            v.name == p.name.as_bytes()
                && v.sample_rate.to_bits() == p.sample_rate.to_bits()
                && value(v.value, &p.value)
                && v.tags().eq(p
                    .tags
                    .iter()
                    .map(|t| (t.key.as_bytes(), t.value.as_bytes())))
        })
}

fn pb_batch() -> impl Strategy<Value = Batch> {
    let value = prop_oneof![
        any::<f64>().prop_map(Value::Counter),
        any::<f64>().prop_map(Value::Gauge),
        any::<f64>().prop_map(Value::GaugeDelta),
        any::<f64>().prop_map(Value::TimerMs),
        any::<f64>().prop_map(Value::Histogram),
        any::<f64>().prop_map(Value::Distribution),
        "\\PC{0,6}".prop_map(Value::SetMember),
    ];
    let tag = ("\\PC{0,4}", "\\PC{0,4}").prop_map(|(key, value)| Tag { key, value });
    let event = (
        "\\PC{0,12}",
        proptest::collection::vec(tag, 0..3),
        proptest::option::of(value),
        any::<f64>(),
    )
        .prop_map(|(name, tags, value, sample_rate)| Event {
            name,
            tags,
            value,
            sample_rate,
            ..Default::default()
        });
    (
        "\\PC{0,8}",
        any::<u64>(),
        proptest::collection::vec(event, 0..4),
    )
        .prop_map(|(client_id, sequence, events)| Batch {
            client_id,
            sequence,
            events,
            ..Default::default()
        })
}

/// The view and prost agree on `bytes`: both refuse it, or both read it the same.
fn agree(bytes: &[u8]) -> Result<(), TestCaseError> {
    match (BatchView::decode(bytes), Batch::decode(bytes)) {
        (Ok(v), Ok(p)) => prop_assert!(same_batch(&v, &p), "{:?} vs {:?}", v, p),
        (Err(_), Err(_)) => {}
        (v, p) => prop_assert!(
            false,
            "view {:?}, prost {:?} for {:?}",
            v.err(),
            p.err(),
            bytes
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_in_place_batch_reader_agrees_with_prost_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        agree(&bytes)?;
    }

    #[test]
    fn the_in_place_batch_reader_agrees_with_prost_on_damaged_batches(
        batch in pb_batch(),
        at in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let mut bytes = batch.encode_to_vec();
        agree(&bytes)?;
        if !bytes.is_empty() {
            let i = at.index(bytes.len());
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            agree(&bytes)?;
        }
    }

    #[test]
    fn lines_and_tags_split_as_plain_splits_do(block in proptest::collection::vec(
        prop_oneof![Just(b'\n'), Just(b'\r'), Just(b','), Just(b'a'), Just(b'b')], 0..64)) {
        // The SIMD searches against the obvious definitions.
        let want: Vec<&[u8]> = block
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty())
            .collect();
        prop_assert_eq!(statsd::lines(&block).collect::<Vec<_>>(), want);
        let want: Vec<&[u8]> = block.split(|&b| b == b',').filter(|t| !t.is_empty()).collect();
        let mut got = Vec::new();
        statsd::for_each_tag(&block, |t| got.push(t));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn statsd_never_panics_on_arbitrary_bytes(block in proptest::collection::vec(any::<u8>(), 0..512)) {
        for line in statsd::lines(&block) {
            if let Ok(Parsed::Metric(l)) = statsd::parse_line(line, &Limits::default()) {
                let values = l.values().count();
                prop_assert_eq!(values, if l.kind == MetricType::Set { 0 } else { l.value_count() });
                prop_assert!(l.sample_rate > 0.0 && l.sample_rate <= 1.0);
            }
        }
    }

    #[test]
    fn lines_with_tags_in_any_dialect_never_panic_and_their_keys_split(
        block in proptest::collection::vec(prop::sample::select(b"ab=,#;[]:|c#g1.".to_vec()), 0..64),
    ) {
        let limits = Limits { dialects: Dialects::from_names(&["influxdb", "librato", "signalfx", "graphite"]).expect("known"), ..Limits::default() };
        let mut keys = tallyd::aggregate::key::KeyBuf::default();
        for line in statsd::lines(&block) {
            if let Ok(Parsed::Metric(l)) = statsd::parse_line(line, &limits) {
                let k = keys.build_line(&l).to_vec();
                prop_assert!(tallyd::aggregate::key::split(&k).is_some());
            }
        }
    }

    #[test]
    fn statsd_lines_round_trip_to_the_same_key_and_value(
        name in "[a-z][a-z0-9._-]{0,40}",
        int in 0u32..1_000_000,
        frac in proptest::option::of(0u32..1000),
        kind in prop::sample::select(vec!["c", "g", "ms", "h", "d"]),
        tags in proptest::collection::vec(("[a-z]{1,8}", proptest::option::of("[a-z0-9]{1,8}")), 0..6),
        rate in proptest::option::of(prop::sample::select(vec!["0.5", "0.25", "1"])),
    ) {
        let value = match frac { Some(f) => format!("{int}.{f:03}"), None => int.to_string() };
        let tag_text: Vec<String> = tags.iter().map(|(k, v)| match v { Some(v) => format!("{k}:{v}"), None => k.clone() }).collect();
        let mut line = format!("{name}:{value}|{kind}");
        if let Some(r) = &rate {
            line.push_str(&format!("|@{r}"));
        }
        if !tag_text.is_empty() {
            line.push_str(&format!("|#{}", tag_text.join(",")));
        }
        let parsed = match statsd::parse_line(line.as_bytes(), &Limits::default()) {
            Ok(Parsed::Metric(l)) => l,
            other => return Err(TestCaseError::fail(format!("{line:?} -> {other:?}"))),
        };
        prop_assert_eq!(parsed.name, name.as_bytes());
        prop_assert_eq!(parsed.kind.as_str(), kind);
        prop_assert_eq!(parsed.first, value.parse::<f64>().expect("number"));
        let k = KeyBuf::default().build(parsed.kind, parsed.name, parsed.tags).to_vec();
        let parts = key::split(&k).expect("key splits");
        let mut want: Vec<&str> = tag_text.iter().map(String::as_str).collect();
        want.sort_unstable();
        want.dedup();
        prop_assert_eq!(parts.name, name.as_str());
        prop_assert_eq!(parts.tags, want);
    }

    #[test]
    fn protobuf_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = proto::frame_header(&bytes, 4 << 20);
        if let Ok(batch) = BatchView::decode(&bytes[..]) {
            let mut tags = Vec::new();
            for e in batch.events() {
                if let Ok(l) = proto::event_line(&e, &mut tags, &Limits::default()) {
                    prop_assert!(l.first.is_finite());
                }
            }
        }
    }

    #[test]
    fn frame_headers_never_promise_more_than_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..16), max in 1usize..10_000) {
        if let Ok(Some((prefix, len))) = proto::frame_header(&bytes, max) {
            prop_assert!(len <= max);
            prop_assert!(prefix <= 10);
        }
    }

    #[test]
    fn wal_decoding_never_panics(seg in proptest::collection::vec(any::<u8>(), 0..1024), offset in 0usize..1100, sig in any::<u32>()) {
        match format::decode_record(&seg, offset, sig) {
            Decoded::Record(r, next) => {
                prop_assert!(next <= seg.len());
                prop_assert!(!r.payload.is_empty());
            }
            Decoded::End | Decoded::Invalid(_) => {}
        }
        let _ = format::SegmentHeader::decode(&seg);
    }

    #[test]
    fn wal_records_round_trip(payload in proptest::collection::vec(any::<u8>(), 1..600), lsn in any::<u64>(), generation in 0u64..(1 << 56), sig in any::<u32>()) {
        let mut seg = vec![0u8; format::SEGMENT_HEADER + format::record_len(payload.len()) + 8];
        let len = format::encode_record(&mut seg[format::SEGMENT_HEADER..], sig, lsn, generation, Kind::Statsd, &payload);
        match format::decode_record(&seg, format::SEGMENT_HEADER, sig) {
            Decoded::Record(r, next) => {
                prop_assert_eq!((r.lsn, r.generation, r.kind, r.payload), (lsn, generation, Kind::Statsd, &payload[..]));
                prop_assert_eq!(next, format::SEGMENT_HEADER + len);
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }
}
