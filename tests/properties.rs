//! Property tests over the three decoders that take bytes from outside: the
//! StatsD parser, the protobuf decoder and the WAL record decoder. Arbitrary
//! input never panics, and what is accepted round-trips.

use proptest::prelude::*;
use prost::Message;
use tallyd::aggregate::key::{self, KeyBuf};
use tallyd::protocol::proto::{self, Batch};
use tallyd::protocol::statsd::{self, Limits, MetricType, Parsed};
use tallyd::wal::format::{self, Decoded, Kind};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

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
        if let Ok(batch) = Batch::decode(&bytes[..]) {
            let mut tags = Vec::new();
            for e in &batch.events {
                if let Ok(l) = proto::event_line(e, &mut tags, &Limits::default()) {
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
