//! A protobuf `Batch` (proto/tallyd.proto) read in place: [`BatchView`]
//! checks the whole message first, then hands out its events as views into
//! the received bytes, so no string is allocated, and no vector either.
//! prost's generated types ([`super::proto::pb`]) stay for encoding and for
//! clients; this reader accepts and refuses exactly what they decode.
//!
//! The wire format is protobuf's (<https://protobuf.dev/programming-guides/encoding/>):
//! each field is a varint key, `field_number << 3 | wire_type`, then a
//! varint (type 0), 8 bytes little-endian (1), a varint length and that many
//! bytes (2), or 4 bytes (5). Types 3 and 4 open and close a group (only
//! ever skipped here). For a field that is not repeated, the last occurrence
//! wins, a `oneof` included; unknown fields are skipped, within prost's
//! recursion limit; strings must be UTF-8.
//!
//! Pure code: no sockets, no tokio.

use prost::Message;

use super::proto::pb;

/// Why a message does not decode. The texts name the field and the fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated or overlong varint")]
    Varint,
    #[error("field number 0 or above 2^29-1")]
    FieldNumber,
    #[error("unknown wire type {0}")]
    WireType(u8),
    #[error("{0}: wrong wire type")]
    UnexpectedWireType(&'static str),
    #[error("{0}: runs past the end of the message")]
    Truncated(&'static str),
    #[error("{0}: not UTF-8")]
    Utf8(&'static str),
    #[error("unmatched or too deeply nested group")]
    Group,
    #[error("{0}: not as many as the values they go with")]
    Mismatched(&'static str),
    #[error("{0}: not a valid message")]
    Invalid(&'static str),
}

/// prost's recursion budget (`RECURSION_LIMIT`), which this reader keeps
/// the same way so that both refuse the same deep nesting: the Batch's
/// fields have 100, an Event's 99, a Tag's 98, and each level of an
/// unknown group one less for the fields inside it; a field with none
/// left is refused.
const BATCH_BUDGET: u32 = 100;

/// One field's value as it lies on the wire.
#[derive(Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    /// A fixed32 or a skipped group: nothing any field here holds.
    Other,
}

/// The fields of one message, in order.
struct Fields<'a> {
    buf: &'a [u8],
    /// The recursion budget of this message's fields.
    budget: u32,
}

impl<'a> Fields<'a> {
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        // One byte: most keys and lengths.
        if let Some((&b, rest)) = self.buf.split_first()
            && b < 0x80
        {
            self.buf = rest;
            return Ok(u64::from(b));
        }
        let mut value = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Varint)?;
            self.buf = rest;
            // The tenth byte holds bit 63 only.
            if i == 9 && b > 1 {
                return Err(DecodeError::Varint);
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Varint)
    }

    #[inline(always)]
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated(field));
        }
        let (taken, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(taken)
    }

    /// The next key: (field number, wire type).
    #[inline(always)]
    fn key(&mut self) -> Result<(u32, u8), DecodeError> {
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return Err(DecodeError::FieldNumber);
        }
        Ok((number as u32, (key & 7) as u8))
    }

    #[inline(always)]
    fn value(&mut self, number: u32, wire: u8) -> Result<Value<'a>, DecodeError> {
        Ok(match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                let b = self.take(8, "fixed64")?;
                Value::Fixed64(u64::from_le_bytes(b.try_into().unwrap_or_default()))
            }
            2 => {
                let n = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
                Value::Bytes(self.take(n, "length-delimited field")?)
            }
            3 => {
                self.skip_group(number, self.budget)?;
                Value::Other
            }
            4 => return Err(DecodeError::Group),
            5 => {
                self.take(4, "fixed32")?;
                Value::Other
            }
            w => return Err(DecodeError::WireType(w)),
        })
    }

    /// Skips a group's fields up to the end-group key of `number`; the
    /// group itself has `budget`, its fields one less.
    #[cold]
    fn skip_group(&mut self, number: u32, budget: u32) -> Result<(), DecodeError> {
        loop {
            let (inner, wire) = self.key()?;
            if wire == 4 {
                return if inner == number {
                    Ok(())
                } else {
                    Err(DecodeError::Group)
                };
            }
            let inner_budget = budget.saturating_sub(1);
            if inner_budget == 0 {
                return Err(DecodeError::Group);
            }
            if wire == 3 {
                self.skip_group(inner, inner_budget)?;
            } else {
                self.value(inner, wire)?;
            }
        }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = self
            .key()
            .and_then(|(number, wire)| Ok((number, self.value(number, wire)?)));
        if field.is_err() {
            self.buf = &[];
        }
        Some(field)
    }
}

/// The fields of a message whose fields have `budget` (see [`BATCH_BUDGET`]).
fn fields(buf: &[u8], budget: u32) -> Fields<'_> {
    Fields { buf, budget }
}

/// A string field's bytes; with `check`, they must be UTF-8. A batch is
/// checked once, in [`BatchView::decode`]; reading it again need not.
fn text<'a>(v: Value<'a>, field: &'static str, check: bool) -> Result<&'a [u8], DecodeError> {
    match v {
        Value::Bytes(b) if check && std::str::from_utf8(b).is_err() => {
            Err(DecodeError::Utf8(field))
        }
        Value::Bytes(b) => Ok(b),
        _ => Err(DecodeError::UnexpectedWireType(field)),
    }
}

/// A string field (protobuf `string`: UTF-8, or prost refuses the message).
fn string<'a>(v: Value<'a>, field: &'static str) -> Result<&'a str, DecodeError> {
    match v {
        Value::Bytes(b) => std::str::from_utf8(b).map_err(|_| DecodeError::Utf8(field)),
        _ => Err(DecodeError::UnexpectedWireType(field)),
    }
}

fn double(v: Value<'_>, field: &'static str) -> Result<f64, DecodeError> {
    match v {
        Value::Fixed64(bits) => Ok(f64::from_bits(bits)),
        _ => Err(DecodeError::UnexpectedWireType(field)),
    }
}

/// A checked `Batch`: its header, and its events to read in order.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// `client_id` (field 1); empty when absent.
    pub client_id: &'a str,
    /// `sequence` (field 2); 0 when absent.
    pub sequence: u64,
    /// `host` (field 4, forwarded state): the host its rows keep; empty
    /// when absent.
    pub host: &'a str,
    /// `version` (field 5): the protocol version of the sender; 0 when
    /// absent (version 1).
    pub version: u32,
    /// How many events (field 3) the batch holds.
    pub len: usize,
    /// How many DogStatsD events and service checks (fields 6 and 7).
    pub notes: usize,
    /// `token` (field 8): a bearer token, in a batch of its own; `None`
    /// when absent (`Some` even when empty or repeated, so that a batch
    /// that names a token at all is seen to).
    pub token: Option<&'a [u8]>,
    bytes: &'a [u8],
}

/// A forwarded DogStatsD event or service check, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    Event(pb::DogstatsdEvent),
    ServiceCheck(pb::ServiceCheck),
}

impl<'a> BatchView<'a> {
    /// Checks the whole of `bytes` (a `Batch`, without length prefix): every
    /// field's wire type, every length, every string's UTF-8, every event
    /// and tag. Nothing is allocated.
    pub fn decode(bytes: &'a [u8]) -> Result<BatchView<'a>, DecodeError> {
        let mut view = BatchView {
            client_id: "",
            sequence: 0,
            host: "",
            version: 0,
            len: 0,
            notes: 0,
            token: None,
            bytes,
        };
        for field in fields(bytes, BATCH_BUDGET) {
            match field? {
                (1, v) => view.client_id = string(v, "Batch.client_id")?,
                (2, Value::Varint(s)) => view.sequence = s,
                (8, v) => view.token = Some(string(v, "Batch.token")?.as_bytes()),
                (2, _) => return Err(DecodeError::UnexpectedWireType("Batch.sequence")),
                (3, Value::Bytes(e)) => {
                    EventView::read(e, true)?;
                    view.len += 1;
                }
                (3, _) => return Err(DecodeError::UnexpectedWireType("Batch.events")),
                (4, v) => view.host = string(v, "Batch.host")?,
                // A uint32 is a varint; protobuf keeps its low 32 bits.
                (5, Value::Varint(v)) => view.version = v as u32,
                (5, _) => return Err(DecodeError::UnexpectedWireType("Batch.version")),
                (6, Value::Bytes(b)) => {
                    pb::DogstatsdEvent::decode(b)
                        .map_err(|_| DecodeError::Invalid("Batch.dogstatsd_events"))?;
                    view.notes += 1;
                }
                (6, _) => return Err(DecodeError::UnexpectedWireType("Batch.dogstatsd_events")),
                (7, Value::Bytes(b)) => {
                    pb::ServiceCheck::decode(b)
                        .map_err(|_| DecodeError::Invalid("Batch.service_checks"))?;
                    view.notes += 1;
                }
                (7, _) => return Err(DecodeError::UnexpectedWireType("Batch.service_checks")),
                _ => {}
            }
        }
        Ok(view)
    }

    /// The DogStatsD events and service checks, in order (each was
    /// checked by [`BatchView::decode`]).
    pub fn notes(&self) -> impl Iterator<Item = Note> + use<'a> {
        fields(self.bytes, BATCH_BUDGET).filter_map(|f| match f {
            Ok((6, Value::Bytes(b))) => pb::DogstatsdEvent::decode(b).ok().map(Note::Event),
            Ok((7, Value::Bytes(b))) => pb::ServiceCheck::decode(b).ok().map(Note::ServiceCheck),
            _ => None,
        })
    }

    /// The events, in order (each was checked by [`BatchView::decode`]).
    pub fn events(&self) -> impl Iterator<Item = EventView<'a>> + use<'a> {
        fields(self.bytes, BATCH_BUDGET).filter_map(|f| match f {
            Ok((3, Value::Bytes(e))) => EventView::read(e, false).ok(),
            _ => None,
        })
    }
}

/// An event's metric value (the `value` oneof).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EventValue<'a> {
    Counter(f64),
    Gauge(f64),
    GaugeDelta(f64),
    TimerMs(f64),
    Histogram(f64),
    Distribution(f64),
    /// UTF-8 (checked by [`BatchView::decode`]).
    SetMember(&'a [u8]),
    /// Forwarded state (protocol version 2): a key over one interval.
    CounterState {
        sum: f64,
        samples: u64,
    },
    GaugeState {
        value: f64,
        samples: u64,
        /// `value` is a gauge delta (set only in tallyd's WAL records of OTLP).
        delta: bool,
    },
    DistributionState(DistributionView<'a>),
    SetState(SetView<'a>),
}

/// A checked `DistributionState`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributionView<'a> {
    /// `kind`: 0 timer, 1 histogram, 2 distribution (others read as 0,
    /// as protobuf reads an unknown enum value of a closed set).
    pub kind: u32,
    pub count: f64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub samples: u64,
    bytes: &'a [u8],
}

impl<'a> DistributionView<'a> {
    fn read(bytes: &'a [u8]) -> Result<DistributionView<'a>, DecodeError> {
        let mut d = DistributionView {
            kind: 0,
            count: 0.0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            samples: 0,
            bytes,
        };
        let (mut values, mut weights) = (0usize, 0usize);
        for field in fields(bytes, BATCH_BUDGET - 2) {
            let (number, v) = field?;
            let num = |field| double(v, field);
            match number {
                1 => d.kind = varint(v, "DistributionState.kind")? as u32,
                2 => d.count = num("DistributionState.count")?,
                3 => d.sum = num("DistributionState.sum")?,
                4 => d.min = num("DistributionState.min")?,
                5 => d.max = num("DistributionState.max")?,
                6 => d.samples = varint(v, "DistributionState.samples")?,
                7 => values += packed_len(v, 8, "DistributionState.bucket_values")?,
                8 => weights += packed_len(v, 8, "DistributionState.bucket_weights")?,
                _ => {}
            }
        }
        if d.kind > 2 {
            d.kind = 0;
        }
        if values != weights {
            return Err(DecodeError::Mismatched("DistributionState.bucket_weights"));
        }
        Ok(d)
    }

    /// The buckets: (value, weight), in the order sent.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, f64)> + use<'a> {
        fixed64s(self.bytes, 7)
            .map(f64::from_bits)
            .zip(fixed64s(self.bytes, 8).map(f64::from_bits))
    }
}

/// A checked `SetState`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetView<'a> {
    pub samples: u64,
    bytes: &'a [u8],
}

impl<'a> SetView<'a> {
    fn read(bytes: &'a [u8]) -> Result<SetView<'a>, DecodeError> {
        let mut s = SetView { samples: 0, bytes };
        for field in fields(bytes, BATCH_BUDGET - 2) {
            match field? {
                (1, v) => {
                    packed_len(v, 8, "SetState.member_hashes")?;
                }
                (2, v) => s.samples = varint(v, "SetState.samples")?,
                _ => {}
            }
        }
        Ok(s)
    }

    /// The member hashes, in the order sent.
    pub fn member_hashes(&self) -> impl Iterator<Item = u64> + use<'a> {
        fixed64s(self.bytes, 1)
    }
}

fn varint(v: Value<'_>, field: &'static str) -> Result<u64, DecodeError> {
    match v {
        Value::Varint(x) => Ok(x),
        _ => Err(DecodeError::UnexpectedWireType(field)),
    }
}

/// How many 8-byte elements a repeated fixed64/double field's occurrence
/// holds: one unpacked, or a packed run.
fn packed_len(v: Value<'_>, width: usize, field: &'static str) -> Result<usize, DecodeError> {
    match v {
        Value::Fixed64(_) => Ok(1),
        Value::Bytes(b) if b.len() % width == 0 => Ok(b.len() / width),
        Value::Bytes(_) => Err(DecodeError::Truncated(field)),
        _ => Err(DecodeError::UnexpectedWireType(field)),
    }
}

/// Every element of repeated fixed64/double field `number` of a checked
/// message, packed or not, in order.
fn fixed64s(bytes: &[u8], number: u32) -> impl Iterator<Item = u64> + '_ {
    fields(bytes, BATCH_BUDGET - 2)
        .filter_map(move |f| match f {
            Ok((n, Value::Fixed64(x))) if n == number => Some(vec![x]),
            Ok((n, Value::Bytes(b))) if n == number => Some(
                b.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect(),
            ),
            _ => None,
        })
        .flatten()
}

/// A checked `Event`.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    /// `name` (field 1), UTF-8 (checked by [`BatchView::decode`]); empty
    /// when absent.
    pub name: &'a [u8],
    /// The last value field present, if any.
    pub value: Option<EventValue<'a>>,
    /// `sample_rate` (field 10); 0 when absent, which means 1.
    pub sample_rate: f64,
    /// `interval_start` (field 15, forwarded state): Unix seconds; 0 when
    /// absent.
    pub interval_start: u64,
    /// `host_dropped` (field 16, forwarded state): merged fleet-wide,
    /// though the batch names a host.
    pub host_dropped: bool,
    bytes: &'a [u8],
}

impl<'a> EventView<'a> {
    /// Checks one `Event` message (without length prefix).
    pub fn decode(bytes: &'a [u8]) -> Result<EventView<'a>, DecodeError> {
        EventView::read(bytes, true)
    }

    /// Reads an event; with `check`, its strings and tags are checked too
    /// (else the tags are read when [`EventView::tags`] is called).
    fn read(bytes: &'a [u8], check: bool) -> Result<EventView<'a>, DecodeError> {
        let mut e = EventView {
            name: b"",
            value: None,
            sample_rate: 0.0,
            interval_start: 0,
            host_dropped: false,
            bytes,
        };
        for field in fields(bytes, BATCH_BUDGET - 1) {
            let (number, v) = field?;
            let num = |field| double(v, field);
            match number {
                1 => e.name = text(v, "Event.name", check)?,
                2 => match v {
                    Value::Bytes(t) if check => {
                        tag(t, true)?;
                    }
                    Value::Bytes(_) => {}
                    _ => return Err(DecodeError::UnexpectedWireType("Event.tags")),
                },
                3 => e.value = Some(EventValue::Counter(num("Event.counter")?)),
                4 => e.value = Some(EventValue::Gauge(num("Event.gauge")?)),
                5 => e.value = Some(EventValue::GaugeDelta(num("Event.gauge_delta")?)),
                6 => e.value = Some(EventValue::TimerMs(num("Event.timer_ms")?)),
                7 => e.value = Some(EventValue::Histogram(num("Event.histogram")?)),
                8 => e.value = Some(EventValue::Distribution(num("Event.distribution")?)),
                9 => e.value = Some(EventValue::SetMember(text(v, "Event.set_member", check)?)),
                10 => e.sample_rate = double(v, "Event.sample_rate")?,
                11 => {
                    let (mut sum, mut samples) = (0.0, 0);
                    for f in fields(message(v, "Event.counter_state")?, BATCH_BUDGET - 2) {
                        match f? {
                            (1, v) => sum = double(v, "CounterState.sum")?,
                            (2, v) => samples = varint(v, "CounterState.samples")?,
                            _ => {}
                        }
                    }
                    e.value = Some(EventValue::CounterState { sum, samples });
                }
                12 => {
                    let (mut value, mut samples, mut delta) = (0.0, 0, false);
                    for f in fields(message(v, "Event.gauge_state")?, BATCH_BUDGET - 2) {
                        match f? {
                            (1, v) => value = double(v, "GaugeState.value")?,
                            (2, v) => samples = varint(v, "GaugeState.samples")?,
                            (3, v) => delta = varint(v, "GaugeState.delta")? != 0,
                            _ => {}
                        }
                    }
                    e.value = Some(EventValue::GaugeState {
                        value,
                        samples,
                        delta,
                    });
                }
                13 => {
                    let d = DistributionView::read(message(v, "Event.distribution_state")?)?;
                    e.value = Some(EventValue::DistributionState(d));
                }
                14 => {
                    let s = SetView::read(message(v, "Event.set_state")?)?;
                    e.value = Some(EventValue::SetState(s));
                }
                15 => e.interval_start = varint(v, "Event.interval_start")?,
                16 => e.host_dropped = varint(v, "Event.host_dropped")? != 0,
                _ => {}
            }
        }
        Ok(e)
    }

    /// The tags, in order, as (key, value), UTF-8; a value is empty when
    /// absent.
    pub fn tags(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + use<'a> {
        fields(self.bytes, BATCH_BUDGET - 1).filter_map(|f| match f {
            Ok((2, Value::Bytes(t))) => tag(t, false).ok(),
            _ => None,
        })
    }
}

/// A nested message's bytes.
fn message<'a>(v: Value<'a>, field: &'static str) -> Result<&'a [u8], DecodeError> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(DecodeError::UnexpectedWireType(field)),
    }
}

/// A `Tag`: (key, value); with `check`, both must be UTF-8.
fn tag(bytes: &[u8], check: bool) -> Result<(&[u8], &[u8]), DecodeError> {
    let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
    for field in fields(bytes, BATCH_BUDGET - 2) {
        match field? {
            (1, v) => key = text(v, "Tag.key", check)?,
            (2, v) => value = text(v, "Tag.value", check)?,
            _ => {}
        }
    }
    Ok((key, value))
}

#[cfg(test)]
mod tests;
