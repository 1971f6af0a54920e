//! Unit tests of [`super`].

use super::*;
use crate::protocol::proto::pb::{self, event::Value as PbValue};
use prost::Message;

use crate::protocol::proto::test_event as pb_event;

#[test]
fn a_batch_reads_as_prost_wrote_it() {
    let batch = pb::Batch {
        client_id: "shipper-7".into(),
        sequence: u64::MAX,
        events: vec![
            pb_event(
                "a",
                Some(PbValue::Counter(2.5)),
                &[("env", "prod"), ("canary", "")],
                0.5,
            ),
            pb_event("b", Some(PbValue::SetMember("ü".into())), &[], 0.0),
            pb_event("", None, &[], 0.0),
            pb_event("d", Some(PbValue::GaugeDelta(-1.0)), &[], 0.0),
        ],
        ..Default::default()
    };
    let bytes = batch.encode_to_vec();
    let view = BatchView::decode(&bytes).expect("decodes");
    assert_eq!(
        (view.client_id, view.sequence, view.len),
        ("shipper-7", u64::MAX, 4)
    );
    let events: Vec<EventView> = view.events().collect();
    assert_eq!(events.len(), 4);
    assert_eq!((events[0].name, events[0].sample_rate), (&b"a"[..], 0.5));
    assert_eq!(events[0].value, Some(EventValue::Counter(2.5)));
    let tags: Vec<_> = events[0].tags().collect();
    assert_eq!(tags, [(&b"env"[..], &b"prod"[..]), (b"canary", b"")]);
    assert_eq!(events[1].value, Some(EventValue::SetMember("ü".as_bytes())));
    assert_eq!((events[2].name, events[2].value), (&b""[..], None));
    assert_eq!(events[3].value, Some(EventValue::GaugeDelta(-1.0)));
}

#[test]
fn the_last_value_of_the_oneof_wins_and_unknown_fields_are_skipped() {
    let mut bytes = pb_event("x", Some(PbValue::Counter(1.0)), &[], 0.0).encode_to_vec();
    bytes.extend(pb_event("", Some(PbValue::Gauge(3.0)), &[], 0.0).encode_to_vec());
    // Field 99 as a varint, a fixed32, and a group with a field inside.
    bytes.extend([
        0x98, 0x06, 0x01, 0x9d, 0x06, 1, 2, 3, 4, 0x9b, 0x06, 0x08, 0x01, 0x9c, 0x06,
    ]);
    let batch = [&[0x1a, bytes.len() as u8][..], &bytes].concat();
    let e = BatchView::decode(&batch)
        .expect("decodes")
        .events()
        .next()
        .expect("one");
    assert_eq!((e.name, e.value), (&b"x"[..], Some(EventValue::Gauge(3.0))));
    assert_eq!(
        pb::Batch::decode(&batch[..]).expect("prost agrees").events[0].value,
        Some(PbValue::Gauge(3.0))
    );
}

#[test]
fn unknown_groups_nest_as_deep_as_prost_allows_and_no_deeper() {
    // `n` groups of field 15 one inside the other, a varint field in
    // the innermost or not.
    let groups = |n: usize, inner: bool| {
        let mut b = vec![0x7b; n];
        if inner {
            b.extend([0x08, 0x00]);
        }
        b.extend(vec![0x7c; n]);
        b
    };
    // Length-delimited field `key` around `body`.
    let wrap = |key: u8, body: Vec<u8>| {
        let mut b = vec![key];
        let mut n = body.len();
        while n >= 0x80 {
            b.push((n as u8) | 0x80);
            n >>= 7;
        }
        b.push(n as u8);
        b.extend(body);
        b
    };
    let mut accepted = 0;
    for n in 95..=102 {
        for inner in [false, true] {
            let body = groups(n, inner);
            let event = wrap(0x1a, body.clone());
            let tag = wrap(0x1a, wrap(0x12, body.clone()));
            for bytes in [body, event, tag] {
                let ours = BatchView::decode(&bytes).is_ok();
                assert_eq!(ours, pb::Batch::decode(&bytes[..]).is_ok(), "{n} {inner}");
                accepted += usize::from(ours);
            }
        }
    }
    assert!(accepted > 0 && accepted < 48, "{accepted}");
}

#[test]
fn malformed_batches_are_refused_with_the_field_named() {
    let cases: [(&[u8], DecodeError); 6] = [
        (
            &[0x0a, 0x02, 0xff, 0xfe],
            DecodeError::Utf8("Batch.client_id"),
        ),
        (&[0x10], DecodeError::Varint),
        (
            &[0x11, 0, 0, 0, 0, 0, 0, 0, 0],
            DecodeError::UnexpectedWireType("Batch.sequence"),
        ),
        (
            &[0x1a, 0x05, 0x0a],
            DecodeError::Truncated("length-delimited field"),
        ),
        (&[0x1a, 0x02, 0x1d, 0x00], DecodeError::Truncated("fixed32")),
        (
            &[0x1a, 0x02, 0x18, 0x01],
            DecodeError::UnexpectedWireType("Event.counter"),
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(BatchView::decode(bytes).err(), Some(want), "{bytes:?}");
        assert!(
            pb::Batch::decode(bytes).is_err(),
            "prost refuses {bytes:?} too"
        );
    }
    assert_eq!(
        BatchView::decode(&[0x00]).err(),
        Some(DecodeError::FieldNumber)
    );
    assert_eq!(BatchView::decode(&[0x0c]).err(), Some(DecodeError::Group));
}

#[test]
fn a_token_that_is_not_utf8_is_refused_as_prost_refuses_it() {
    // `token` is a protobuf `string`: found by the property test against
    // prost, which the view accepted.
    let bytes = [0x42, 0x02, b'a', 0x80];
    assert!(pb::Batch::decode(&bytes[..]).is_err());
    assert_eq!(
        BatchView::decode(&bytes).err(),
        Some(DecodeError::Utf8("Batch.token"))
    );
}

#[test]
fn a_batch_that_names_a_token_at_all_is_seen_to_even_when_the_last_is_empty() {
    // A token, then an empty one (the last wins in protobuf), then events:
    // the batch still names a token, so it is refused before the WAL.
    let mut bytes = pb::Batch {
        token: "s3cret".into(),
        ..Default::default()
    }
    .encode_to_vec();
    bytes.extend_from_slice(&[0x42, 0x00]);
    bytes.extend_from_slice(
        &pb::Batch {
            events: vec![pb_event("a", Some(PbValue::Counter(1.0)), &[], 0.0)],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let view = BatchView::decode(&bytes).expect("decodes");
    assert_eq!((view.token, view.len), (Some(&b""[..]), 1));
    let plain = pb::Batch::default().encode_to_vec();
    assert_eq!(BatchView::decode(&plain).expect("decodes").token, None);
}
