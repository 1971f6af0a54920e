//! The protobuf protocol (proto/tallyd.proto): length-delimited framing and
//! events turned into the same [`Line`]s the StatsD parser yields, so both
//! protocols share one aggregation path and one set of limits.
//!
//! Pure code: no sockets, no tokio.

use super::batch::{EventValue, EventView};
use super::statsd::{self, Limits, Line, MetricType, ParseError};

/// The types generated from proto/tallyd.proto (package `tallyd.v1`).
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tallyd.v1.rs"));
}

pub use pb::{Ack, Batch, Event, Tag};

/// The protocol version this build speaks (proto/tallyd.proto): 2, raw
/// samples and forwarded state.
pub const VERSION: u32 = 2;

/// A frame header that cannot be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(u64),
    #[error("malformed length prefix")]
    BadLength,
}

/// Reads the varint length prefix at the start of `buf`. `Ok(None)`: not
/// enough bytes yet. `Ok(Some((prefix, len)))`: the message is
/// `buf[prefix..prefix + len]` once that many bytes are there.
pub fn frame_header(buf: &[u8], max_frame: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let mut len: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max_frame as u64 {
                return Err(FrameError::TooLarge(len));
            }
            return Ok(Some((i + 1, len as usize)));
        }
        if i == 9 {
            return Err(FrameError::BadLength);
        }
    }
    // A prefix can only be this long if the length it encodes is huge.
    if buf.len() >= 5 && max_frame < (1 << 28) {
        return Err(FrameError::TooLarge(u64::MAX));
    }
    Ok(None)
}

/// Encodes `msg` with its varint length prefix.
pub fn encode_frame(msg: &impl prost::Message) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// Checks an event's name and writes its tags into `tags` (reused) as
/// `key:value` (a bare key when the value is empty), comma separated: the
/// raw tag section a StatsD line would have.
pub fn event_key(e: &EventView<'_>, tags: &mut Vec<u8>, limits: &Limits) -> Result<(), ParseError> {
    statsd::check_name(e.name, limits, false)?;
    tags.clear();
    for (key, value) in e.tags() {
        if key.is_empty() || key.contains(&b',') || value.contains(&b',') {
            return Err(ParseError::InvalidTag);
        }
        if !tags.is_empty() {
            tags.push(b',');
        }
        tags.extend_from_slice(key);
        if !value.is_empty() {
            tags.push(b':');
            tags.extend_from_slice(value);
        }
    }
    statsd::check_tags(tags, limits, false)
}

/// Turns an event of raw samples into a line (a forwarded state is not
/// one: see [`crate::aggregate::Aggregator::apply_batch`]). Tags are written
/// into `tags` as [`event_key`] writes them.
pub fn event_line<'a>(
    e: &EventView<'a>,
    tags: &'a mut Vec<u8>,
    limits: &Limits,
) -> Result<Line<'a>, ParseError> {
    let name = e.name;
    event_key(e, tags, limits)?;
    let rate = if e.sample_rate == 0.0 {
        1.0
    } else {
        e.sample_rate
    };
    if !statsd::valid_sample_rate(rate) {
        return Err(ParseError::InvalidSampleRate);
    }
    let (kind, value, delta, member): (MetricType, f64, bool, &[u8]) = match e.value {
        None => return Err(ParseError::MissingValue),
        Some(EventValue::Counter(v)) => (MetricType::Counter, v, false, &[]),
        Some(EventValue::Gauge(v)) => (MetricType::Gauge, v, false, &[]),
        Some(EventValue::GaugeDelta(v)) => (MetricType::Gauge, v, true, &[]),
        Some(EventValue::TimerMs(v)) => (MetricType::Timer, v, false, &[]),
        Some(EventValue::Histogram(v)) => (MetricType::Histogram, v, false, &[]),
        Some(EventValue::Distribution(v)) => (MetricType::Distribution, v, false, &[]),
        Some(EventValue::SetMember(m)) => {
            statsd::check_text(m).map_err(|_| ParseError::InvalidValue)?;
            (MetricType::Set, 0.0, false, m)
        }
        Some(_) => return Err(ParseError::UnknownType),
    };
    if !value.is_finite() {
        return Err(ParseError::InvalidValue);
    }
    // A duration is never negative; histogram and distribution values may
    // be (as in DogStatsD).
    if kind == MetricType::Timer && value < 0.0 {
        return Err(ParseError::NegativeValue);
    }
    if kind == MetricType::Set && member.is_empty() {
        return Err(ParseError::MissingValue);
    }
    Ok(Line {
        name,
        kind,
        first: value,
        first_is_delta: delta,
        raw_values: member,
        sample_rate: rate,
        tags: &tags[..],
        name_tags: None,
        timestamp: None,
        skipped_fields: 0,
    })
}

/// An event built with prost's types, for tests across the crate.
#[cfg(test)]
pub(crate) fn test_event(
    name: &str,
    value: Option<pb::event::Value>,
    tags: &[(&str, &str)],
    sample_rate: f64,
) -> Event {
    Event {
        name: name.into(),
        tags: tags
            .iter()
            .map(|(k, v)| Tag {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        value,
        sample_rate,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::event::Value;
    use prost::Message;

    /// The event as tallyd reads it off the wire (the bytes live on: a test).
    fn view(e: &Event) -> EventView<'static> {
        let bytes: &'static [u8] = Box::leak(e.encode_to_vec().into_boxed_slice());
        EventView::decode(bytes).expect("decodes")
    }

    fn event(name: &str, value: Value, tags: &[(&str, &str)]) -> Event {
        test_event(name, Some(value), tags, 0.0)
    }

    #[test]
    fn frame_header_reads_varints() {
        assert_eq!(frame_header(&[], 100), Ok(None));
        assert_eq!(frame_header(&[5, 1, 2], 100), Ok(Some((1, 5))));
        assert_eq!(frame_header(&[0xac, 0x02], 1000), Ok(Some((2, 300))));
        assert_eq!(frame_header(&[0xac], 1000), Ok(None));
        assert_eq!(
            frame_header(&[0xac, 0x02], 100),
            Err(FrameError::TooLarge(300))
        );
        assert_eq!(
            frame_header(&[0xff; 10], usize::MAX),
            Err(FrameError::BadLength)
        );
        assert!(frame_header(&[0xff; 5], 4 << 20).is_err());
    }

    #[test]
    fn frames_round_trip_through_prost() {
        let batch = Batch {
            client_id: "c".into(),
            sequence: 7,
            events: vec![event("a", Value::Counter(1.0), &[])],
            ..Default::default()
        };
        let bytes = encode_frame(&batch);
        let (prefix, len) = frame_header(&bytes, 1 << 20)
            .expect("header")
            .expect("complete");
        assert_eq!(
            Batch::decode(&bytes[prefix..prefix + len]).expect("decode"),
            batch
        );
    }

    #[test]
    fn event_types_map_to_statsd_types() {
        let limits = Limits::default();
        let mut tags = Vec::new();
        let cases = [
            (Value::Counter(2.0), MetricType::Counter, false),
            (Value::Gauge(3.0), MetricType::Gauge, false),
            (Value::GaugeDelta(-1.0), MetricType::Gauge, true),
            (Value::TimerMs(4.0), MetricType::Timer, false),
            (Value::Histogram(5.0), MetricType::Histogram, false),
            (Value::Distribution(6.0), MetricType::Distribution, false),
        ];
        for (value, kind, delta) in cases {
            let e = event("x", value, &[]);
            let l = event_line(&view(&e), &mut tags, &limits).expect("valid");
            assert_eq!(
                (l.kind, l.first_is_delta, l.value_count(), l.sample_rate),
                (kind, delta, 1, 1.0)
            );
        }
        let e = event("u", Value::SetMember("alice".into()), &[]);
        let l = event_line(&view(&e), &mut tags, &limits).expect("valid");
        assert_eq!((l.kind, l.raw_values), (MetricType::Set, &b"alice"[..]));
    }

    #[test]
    fn tags_become_key_value_strings() {
        let e = event("x", Value::Counter(1.0), &[("env", "prod"), ("canary", "")]);
        let mut tags = Vec::new();
        let l = event_line(&view(&e), &mut tags, &Limits::default()).expect("valid");
        assert_eq!(l.tags, b"env:prod,canary");
    }

    #[test]
    fn invalid_events_are_rejected_with_a_reason() {
        let limits = Limits::default();
        let mut tags = Vec::new();
        let mut e = event("x", Value::Counter(f64::NAN), &[]);
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::InvalidValue)
        );
        e.value = Some(Value::TimerMs(-1.0));
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::NegativeValue)
        );
        e.value = None;
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::MissingValue)
        );
        let e = event("", Value::Counter(1.0), &[]);
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::EmptyName)
        );
        let e = event("x", Value::Counter(1.0), &[("a,b", "1")]);
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::InvalidTag)
        );
        let mut e = event("x", Value::Counter(1.0), &[]);
        e.sample_rate = 2.0;
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::InvalidSampleRate)
        );
        // A subnormal rate: its weight, 1/rate, is not finite.
        e.sample_rate = 1e-320;
        assert_eq!(
            event_line(&view(&e), &mut tags, &limits).err(),
            Some(ParseError::InvalidSampleRate)
        );
    }
}
