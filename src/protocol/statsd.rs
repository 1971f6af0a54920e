//! The StatsD / DogStatsD line parser: bytes in, a borrowed [`Line`] out.
//!
//! Pure code: no I/O, no tokio, no allocation. Everything it returns borrows
//! from the input, so the hot path costs what the bytes cost.
//!
//! Grammar (one line, without its `\n` / `\r\n`):
//!
//! ```text
//! name:value[:value...]|type[|field]...
//! type  = c | g | ms | h | d | s
//! field = @rate | #tag1:v1,tag2 | c:container | T<unix_ts> | e:external | card:cardinality
//! ```
//!
//! Fields follow the DogStatsD datagram format ("Datagram Format and Shell
//! Usage", Datadog docs), by protocol version: 1.0 `@rate` and `#tags`;
//! 1.1 packed values; 1.2 `c:` container id; 1.3 `T` timestamp; 1.4 cgroup
//! origin detection (a `c:` value, no new field); 1.5 `e:` external data;
//! 1.6 `card:` tag cardinality. Fields come in any order, each at most once
//! (a repeated one rejects the line). Any other field, empty ones included,
//! is skipped as DogStatsD servers do, and counted
//! ([`Line::skipped_fields`]), so a client newer than tallyd loses nothing.
//!
//! - `c` counter (float allowed), `g` gauge (a leading `+`/`-` makes it a
//!   delta), `ms` timer, `h` histogram, `d` distribution, `s` set (the whole
//!   value is one member, any string).
//! - Several `:`-separated values (DogStatsD packing) are accepted for every
//!   type but sets. A line is accepted or rejected as a whole: one bad value
//!   rejects the line, so a line never half counts.
//! - Values must be finite; timer values (durations) must not be negative,
//!   histogram and distribution values may be.
//! - A sample rate must be in (0, 1] with a finite inverse (the weight of
//!   each value: rates below about 5.6e-309 are refused).
//! - `_e{...}` events and `_sc|...` service checks are recognised and returned
//!   as such, not as errors.
//! - `|c:` (container id) and `|T` (timestamp) are validated; the container id
//!   is not part of the key; the timestamp is returned, and the aggregator
//!   files the sample under the interval it names. `|e:` and `|card:` steer the DogStatsD
//!   agent's tag enrichment, which tallyd does not do: they are accepted and
//!   ignored.

use std::fmt;

use super::dialect::{self, Dialects, NameTags};

/// The StatsD metric types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MetricType {
    Counter = b'c',
    Gauge = b'g',
    Timer = b'm',
    Histogram = b'h',
    Distribution = b'd',
    Set = b's',
}

impl MetricType {
    /// The type as it is written on the wire (and in the `timers.kind` column).
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "c",
            MetricType::Gauge => "g",
            MetricType::Timer => "ms",
            MetricType::Histogram => "h",
            MetricType::Distribution => "d",
            MetricType::Set => "s",
        }
    }

    /// The inverse of `self as u8`.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'c' => MetricType::Counter,
            b'g' => MetricType::Gauge,
            b'm' => MetricType::Timer,
            b'h' => MetricType::Histogram,
            b'd' => MetricType::Distribution,
            b's' => MetricType::Set,
            _ => return None,
        })
    }
}

/// Why a line was rejected. Each reason is a label of `tallyd_parse_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    EmptyName,
    NameTooLong,
    InvalidName,
    MissingValue,
    MissingType,
    UnknownType,
    InvalidValue,
    NegativeValue,
    InvalidSampleRate,
    InvalidTag,
    TooManyTags,
    TagTooLong,
    InvalidContainer,
    InvalidTimestamp,
    DuplicateField,
    InvalidEvent,
    InvalidServiceCheck,
}

impl ParseError {
    /// Every reason, in a stable order (indexes the telemetry counters).
    pub const ALL: [ParseError; 17] = [
        ParseError::EmptyName,
        ParseError::NameTooLong,
        ParseError::InvalidName,
        ParseError::MissingValue,
        ParseError::MissingType,
        ParseError::UnknownType,
        ParseError::InvalidValue,
        ParseError::NegativeValue,
        ParseError::InvalidSampleRate,
        ParseError::InvalidTag,
        ParseError::TooManyTags,
        ParseError::TagTooLong,
        ParseError::InvalidContainer,
        ParseError::InvalidTimestamp,
        ParseError::DuplicateField,
        ParseError::InvalidEvent,
        ParseError::InvalidServiceCheck,
    ];

    /// A short snake_case reason, used as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            ParseError::EmptyName => "empty_name",
            ParseError::NameTooLong => "name_too_long",
            ParseError::InvalidName => "invalid_name",
            ParseError::MissingValue => "missing_value",
            ParseError::MissingType => "missing_type",
            ParseError::UnknownType => "unknown_type",
            ParseError::InvalidValue => "invalid_value",
            ParseError::NegativeValue => "negative_value",
            ParseError::InvalidSampleRate => "invalid_sample_rate",
            ParseError::InvalidTag => "invalid_tag",
            ParseError::TooManyTags => "too_many_tags",
            ParseError::TagTooLong => "tag_too_long",
            ParseError::InvalidContainer => "invalid_container",
            ParseError::InvalidTimestamp => "invalid_timestamp",
            ParseError::DuplicateField => "duplicate_field",
            ParseError::InvalidEvent => "invalid_event",
            ParseError::InvalidServiceCheck => "invalid_service_check",
        }
    }

    /// Position in [`ParseError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ParseError {}

/// Limits a line must respect. Lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_name_len: usize,
    pub max_tags: usize,
    pub max_tag_len: usize,
    /// Tag dialects read in names (see [`super::dialect`]); none by default.
    pub dialects: Dialects,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_len: 256,
            max_tags: 64,
            max_tag_len: 256,
            dialects: Dialects::default(),
        }
    }
}

/// One parsed metric line. All slices borrow from the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line<'a> {
    pub name: &'a [u8],
    pub kind: MetricType,
    /// The first value (a set's member is in `raw_values`, this is 0 for sets).
    pub first: f64,
    /// For gauges: whether `first` is a signed delta.
    pub first_is_delta: bool,
    /// The value part as written (`1:2:3`); more values follow `first` when it
    /// holds a `:` (never for sets, where it is the member).
    pub raw_values: &'a [u8],
    /// 1.0 when absent; always in (0, 1].
    pub sample_rate: f64,
    /// The tag section without its `#` (comma separated, not canonical).
    pub tags: &'a [u8],
    /// Tags written in the name in a configured dialect: `name` is then
    /// the name as written, tags and all (see [`Line::name_parts`]).
    pub name_tags: Option<NameTags>,
    pub timestamp: Option<u64>,
    /// Fields tallyd does not know, skipped (saturating at 255).
    pub skipped_fields: u8,
}

/// A value of a line: the number and, for gauges, whether it is a delta.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Value {
    pub value: f64,
    pub delta: bool,
}

impl<'a> Line<'a> {
    /// The metric's name, in two pieces (the second empty but for
    /// SignalFx tags within a name), without tags written in it.
    pub fn name_parts(&self) -> (&'a [u8], &'a [u8]) {
        match &self.name_tags {
            Some(nt) => nt.name(self.name),
            None => (self.name, &[]),
        }
    }

    /// How many values the line carries (DogStatsD packing), 1 for sets.
    pub fn value_count(&self) -> usize {
        if self.kind == MetricType::Set {
            1
        } else {
            1 + self.raw_values.iter().filter(|&&b| b == b':').count()
        }
    }

    /// Every numeric value of the line, in order. Values were checked when the
    /// line was parsed, so this does not fail. Empty for sets.
    pub fn values(&self) -> impl Iterator<Item = Value> + 'a {
        let kind = self.kind;
        let first = Value {
            value: self.first,
            delta: self.first_is_delta,
        };
        let rest: &'a [u8] = if kind == MetricType::Set {
            &[]
        } else {
            match self.raw_values.iter().position(|&b| b == b':') {
                Some(i) => &self.raw_values[i + 1..],
                None => &[],
            }
        };
        let head = (kind != MetricType::Set).then_some(first);
        head.into_iter().chain(
            rest.split(|&b| b == b':')
                .filter(move |_| !rest.is_empty())
                .filter_map(move |v| parse_value(v, kind).ok()),
        )
    }
}

/// What a line turned out to be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Parsed<'a> {
    Metric(Line<'a>),
    /// A DogStatsD event (`_e{title_len,text_len}:...`).
    Event,
    /// A DogStatsD service check (`_sc|name|status...`).
    ServiceCheck,
}

/// Splits a block (a datagram, a read) into lines: `\n` separated, a `\r`
/// before the `\n` dropped, a trailing newline optional, empty lines skipped.
pub fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = block;
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(end) => (&rest[..end], &rest[end + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            rest = next;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.is_empty() {
                return Some(line);
            }
        }
        None
    })
}

/// A sample rate tallyd accepts (StatsD and protobuf alike): in (0, 1],
/// with a finite inverse, the weight each value counts for.
pub(crate) fn valid_sample_rate(rate: f64) -> bool {
    rate > 0.0 && rate <= 1.0 && (1.0 / rate).is_finite()
}

/// Parses one line (without its line ending).
pub fn parse_line<'a>(line: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ParseError> {
    if line.starts_with(b"_e{") {
        return Ok(Parsed::Event);
    }
    if line.starts_with(b"_sc|") {
        return Ok(Parsed::ServiceCheck);
    }
    let colon = memchr::memchr2(b':', b'|', line).ok_or(ParseError::MissingValue)?;
    if line[colon] == b'|' {
        return Err(ParseError::MissingValue);
    }
    let name = &line[..colon];
    // One pass over the whole line: printable ASCII needs no further text
    // checks (the common case); anything else is checked field by field.
    let plain = is_printable_ascii(line);
    let name_tags = if limits.dialects.is_empty() {
        None
    } else {
        dialect::split(name, limits.dialects)?
    };
    match &name_tags {
        None => check_name(name, limits, plain)?,
        Some(nt) => {
            let (a, b) = nt.name(name);
            if a.len() + b.len() > limits.max_name_len {
                return Err(ParseError::NameTooLong);
            }
            if !plain {
                check_text(name).map_err(|_| ParseError::InvalidName)?;
            }
        }
    }
    let rest = &line[colon + 1..];
    let mut fields = rest.split(|&b| b == b'|');
    let raw_values = fields.next().unwrap_or_default();
    if raw_values.is_empty() {
        return Err(ParseError::MissingValue);
    }
    let kind = match fields.next() {
        None => return Err(ParseError::MissingType),
        Some(b"c") => MetricType::Counter,
        Some(b"g") => MetricType::Gauge,
        Some(b"ms") => MetricType::Timer,
        Some(b"h") => MetricType::Histogram,
        Some(b"d") => MetricType::Distribution,
        Some(b"s") => MetricType::Set,
        Some(b"") => return Err(ParseError::MissingType),
        Some(_) => return Err(ParseError::UnknownType),
    };

    let mut parsed = Line {
        name,
        kind,
        first: 0.0,
        first_is_delta: false,
        raw_values,
        sample_rate: 1.0,
        tags: &[],
        name_tags,
        timestamp: None,
        skipped_fields: 0,
    };
    if kind == MetricType::Set {
        if !plain {
            check_text(raw_values).map_err(|_| ParseError::InvalidValue)?;
        }
    } else {
        let mut values = raw_values.split(|&b| b == b':');
        let first = parse_value(values.next().unwrap_or_default(), kind)?;
        parsed.first = first.value;
        parsed.first_is_delta = first.delta;
        for v in values {
            parse_value(v, kind)?;
        }
    }

    let mut seen = Seen::default();
    for field in fields {
        match field.first() {
            Some(b'@') => {
                seen.once(Seen::RATE)?;
                let rate = parse_f64(&field[1..]).ok_or(ParseError::InvalidSampleRate)?;
                if !valid_sample_rate(rate) {
                    return Err(ParseError::InvalidSampleRate);
                }
                parsed.sample_rate = rate;
            }
            Some(b'#') => {
                seen.once(Seen::TAGS)?;
                parsed.tags = &field[1..];
                check_tags(parsed.tags, limits, plain)?;
            }
            Some(b'c') if field.get(1) == Some(&b':') => {
                seen.once(Seen::CONTAINER)?;
                let id = &field[2..];
                if id.is_empty() || (!plain && check_text(id).is_err()) {
                    return Err(ParseError::InvalidContainer);
                }
            }
            Some(b'T') => {
                seen.once(Seen::TIMESTAMP)?;
                let ts = parse_u64(&field[1..]).ok_or(ParseError::InvalidTimestamp)?;
                parsed.timestamp = Some(ts);
            }
            Some(b'e') if field.get(1) == Some(&b':') => seen.once(Seen::EXTERNAL)?,
            Some(b'c') if field.starts_with(b"card:") => seen.once(Seen::CARDINALITY)?,
            _ => parsed.skipped_fields = parsed.skipped_fields.saturating_add(1),
        }
    }
    if let Some(nt) = &parsed.name_tags {
        let mut count = 0;
        for_each_tag(parsed.tags, |_| count += 1);
        if nt.count(name) + count > limits.max_tags {
            return Err(ParseError::TooManyTags);
        }
        if nt
            .tags(name)
            .any(|(k, v)| k.len() + 1 + v.len() > limits.max_tag_len)
        {
            return Err(ParseError::TagTooLong);
        }
    }
    Ok(Parsed::Metric(parsed))
}

/// The known fields a line has had so far, one bit each.
#[derive(Default)]
struct Seen(u8);

impl Seen {
    const RATE: u8 = 1;
    const TAGS: u8 = 2;
    const CONTAINER: u8 = 4;
    const TIMESTAMP: u8 = 8;
    const EXTERNAL: u8 = 16;
    const CARDINALITY: u8 = 32;

    fn once(&mut self, field: u8) -> Result<(), ParseError> {
        if self.0 & field != 0 {
            return Err(ParseError::DuplicateField);
        }
        self.0 |= field;
        Ok(())
    }
}

/// Calls `f` for each non-empty tag of a tag section, trimmed of nothing:
/// tags are taken as written.
pub fn for_each_tag<'a>(tags: &'a [u8], mut f: impl FnMut(&'a [u8])) {
    let mut start = 0;
    for end in memchr::memchr_iter(b',', tags).chain([tags.len()]) {
        let t = &tags[start..end];
        if !t.is_empty() {
            f(t);
        }
        start = end + 1;
    }
}

pub(crate) fn check_name(name: &[u8], limits: &Limits, plain: bool) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::EmptyName);
    }
    if name.len() > limits.max_name_len {
        return Err(ParseError::NameTooLong);
    }
    if plain {
        return Ok(());
    }
    check_text(name).map_err(|_| ParseError::InvalidName)
}

pub(crate) fn check_tags(tags: &[u8], limits: &Limits, plain: bool) -> Result<(), ParseError> {
    let mut count = 0usize;
    let mut result = Ok(());
    for_each_tag(tags, |t| {
        if result.is_err() {
            return;
        }
        count += 1;
        result = if count > limits.max_tags {
            Err(ParseError::TooManyTags)
        } else if t.len() > limits.max_tag_len {
            Err(ParseError::TagTooLong)
        } else if plain {
            Ok(())
        } else {
            check_text(t).map_err(|_| ParseError::InvalidTag)
        };
    });
    result
}

/// Text stored in ClickHouse: valid UTF-8 without control characters (which
/// also keeps the key separator, 0x00, out of names and tags).
fn is_printable_ascii(s: &[u8]) -> bool {
    // No early exit: the compiler checks 16 or 32 bytes per instruction.
    s.iter().fold(true, |ok, &b| ok & (0x20..0x7f).contains(&b))
}

pub(crate) fn check_text(s: &[u8]) -> Result<(), ()> {
    if is_printable_ascii(s) {
        return Ok(());
    }
    if s.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(());
    }
    std::str::from_utf8(s).map(|_| ()).map_err(|_| ())
}

fn parse_value(v: &[u8], kind: MetricType) -> Result<Value, ParseError> {
    if v.is_empty() {
        return Err(ParseError::MissingValue);
    }
    let delta = kind == MetricType::Gauge && matches!(v[0], b'+' | b'-');
    let value = parse_f64(v).ok_or(ParseError::InvalidValue)?;
    // A duration is never negative; histogram and distribution values may
    // be (DogStatsD allows them).
    if kind == MetricType::Timer && value < 0.0 {
        return Err(ParseError::NegativeValue);
    }
    Ok(Value { value, delta })
}

/// A finite decimal number. Plain integers and short decimals (`12.25`)
/// take a fast path that is exact: both parts fit in 2^53 and a power of ten
/// up to 10^15 is exact in an f64, so one correctly rounded division gives
/// the same result as a full parse.
pub fn parse_f64(s: &[u8]) -> Option<f64> {
    let (negative, digits) = match s.first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = match digits.iter().position(|&b| b == b'.') {
        Some(dot) => (&digits[..dot], &digits[dot + 1..]),
        None => (digits, &digits[digits.len()..]),
    };
    if !int.is_empty()
        && int.len() + frac.len() <= 15
        && int.iter().chain(frac).all(u8::is_ascii_digit)
    {
        let n = int
            .iter()
            .chain(frac)
            .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        // Below 10^15, so exact as an `i64` and as an `f64`. A whole
        // number needs no division (the slowest instruction here).
        let v = n as i64 as f64;
        let v = if frac.is_empty() {
            v
        } else {
            v / POW10[frac.len()]
        };
        return Some(if negative { -v } else { v });
    }
    // std accepts "inf", "nan" and "infinity": only digits, sign, dot and
    // exponent are StatsD numbers.
    if digits.is_empty()
        || !digits
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    let text = std::str::from_utf8(s).ok()?;
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// 1 to 19 ASCII digits (no sign, no spaces), so the value fits a `u64`;
/// `None` otherwise.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s.iter()
            .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests;
