//! Reading RowBinary bodies back: whole rows ([`decode`], to merge or
//! forward spooled flushes), or counter and gauge rows as views of their
//! bytes ([`each_row`], [`KeyView`]) for the in-place merge. Every length
//! is checked against what is left, so a cut or malformed body is an
//! error that names what was wrong.

use super::{Bodies, Head, TimerColumns};
use crate::outbox::rows::{
    Batch, CounterRow, EventRow, GaugeRow, ServiceCheckRow, SetRow, TimerRow,
};

/// Decodes bodies written by [`Bodies`]'s row methods (as [`super::encode`] and
/// [`crate::outbox::rows::build`] do) back into rows (to merge spooled
/// flushes). Errors name what was cut short or malformed.
pub fn decode(bodies: &Bodies) -> Result<Batch, String> {
    let mut batch = Batch::default();
    let mut r = Reader::new(&bodies.bodies[0]);
    while !r.done() {
        let (ts, name, tags, host) = r.head()?;
        batch.counters.push(CounterRow {
            ts,
            name,
            tags,
            host,
            flush_id: r.u64()?,
            value: r.f64()?,
            samples: r.u64()?,
        });
    }
    let mut r = Reader::new(&bodies.bodies[1]);
    while !r.done() {
        let (ts, name, tags, host) = r.head()?;
        batch.gauges.push(GaugeRow {
            ts,
            name,
            tags,
            host,
            value: r.f64()?,
            version: r.u64()?,
            samples: r.u64()?,
        });
    }
    batch.timers = timers(&bodies.bodies[2], false)?;
    let mut r = Reader::new(&bodies.bodies[3]);
    while !r.done() {
        let (ts, name, tags, host) = r.head()?;
        batch.sets.push(SetRow {
            ts,
            name,
            tags,
            host,
            flush_id: r.u64()?,
            cardinality: r.u64()?,
            samples: r.u64()?,
            member_hashes: r.array(Reader::u64)?,
        });
    }
    let mut r = Reader::new(&bodies.bodies[4]);
    while !r.done() {
        batch.events.push(EventRow {
            ts: r.u32()?,
            host: r.string()?,
            flush_id: r.u64()?,
            seq: r.u32()?,
            event_ts: r.u32()?,
            title: r.string()?,
            text: r.string()?,
            hostname: r.string()?,
            aggregation_key: r.string()?,
            priority: r.string()?,
            source_type: r.string()?,
            alert_type: r.string()?,
            tags: r.array(Reader::string)?,
        });
    }
    let mut r = Reader::new(&bodies.bodies[5]);
    while !r.done() {
        batch.service_checks.push(ServiceCheckRow {
            ts: r.u32()?,
            host: r.string()?,
            flush_id: r.u64()?,
            seq: r.u32()?,
            check_ts: r.u32()?,
            name: r.string()?,
            status: r.take(1)?[0],
            hostname: r.string()?,
            tags: r.array(Reader::string)?,
            message: r.string()?,
        });
    }
    Ok(batch)
}

/// A counter or gauge row read in place: its key columns (name, tags, host)
/// as their encoded bytes, and its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowView<'a> {
    pub ts: u32,
    pub key: &'a [u8],
    /// A counter's sum, a gauge's value.
    pub value: f64,
    /// A counter's flush id, a gauge's version.
    pub order: u64,
    pub samples: u64,
}

/// Gives each row of a counters body (`gauge` false) or a gauges body to
/// `each`, borrowed from `body` (no string is copied). With `check_text`,
/// the key's strings must be UTF-8 (as a row struct's would be); without,
/// they are taken as they are (for a reader that checks them itself, as
/// an aggregator checks what an edge forwards).
pub fn each_row<'a>(
    body: &'a [u8],
    gauge: bool,
    check_text: bool,
    mut each: impl FnMut(RowView<'a>),
) -> Result<(), String> {
    let mut r = Reader::new(body);
    while !r.done() {
        let ts = r.u32()?;
        let key = r.key_columns(check_text)?;
        let (value, order) = if gauge {
            (r.f64()?, r.u64()?)
        } else {
            let id = r.u64()?;
            (r.f64()?, id)
        };
        each(RowView {
            ts,
            key,
            value,
            order,
            samples: r.u64()?,
        });
    }
    Ok(())
}

/// A row's key columns ([`RowView::key`]) read in place: its name, tags and
/// host, as bytes ([`each_row`] checked them as UTF-8 when it read the row).
#[derive(Debug, Clone, Copy)]
pub struct KeyView<'a> {
    pub name: &'a [u8],
    tags: &'a [u8],
    count: usize,
    pub host: &'a [u8],
}

impl<'a> KeyView<'a> {
    /// Reads the key columns `key` (as [`RowView::key`] holds them).
    pub fn read(key: &'a [u8]) -> Result<KeyView<'a>, String> {
        let mut r = Reader::new(key);
        let name = r.bytes()?;
        let count = r.len()?;
        let start = r.at;
        for _ in 0..count {
            r.bytes()?;
        }
        let tags = &key[start..r.at];
        let host = r.bytes()?;
        Ok(KeyView {
            name,
            tags,
            count,
            host,
        })
    }

    /// The tags, in order.
    pub fn tags(&self) -> impl Iterator<Item = &'a [u8]> + Clone + use<'a> {
        let mut r = Reader::new(self.tags);
        (0..self.count).map_while(move |_| r.bytes().ok())
    }
}

impl Bodies {
    /// A counter row (`gauge` false) or gauge row from a [`RowView`]'s
    /// parts: the columns in their table's order.
    pub fn push_view(&mut self, gauge: bool, v: RowView<'_>) {
        let out = self.body(usize::from(gauge));
        out.extend_from_slice(&v.ts.to_le_bytes());
        out.extend_from_slice(v.key);
        if gauge {
            out.extend_from_slice(&v.value.to_le_bytes());
            out.extend_from_slice(&v.order.to_le_bytes());
        } else {
            out.extend_from_slice(&v.order.to_le_bytes());
            out.extend_from_slice(&v.value.to_le_bytes());
        }
        out.extend_from_slice(&v.samples.to_le_bytes());
    }
}

/// Timer rows of a body; `v1`: as tallyd wrote them before weighted counts
/// (`count UInt64`, `bucket_counts Array(UInt64)`).
fn timers(body: &[u8], v1: bool) -> Result<Vec<TimerRow>, String> {
    let mut rows = Vec::new();
    let mut r = Reader::new(body);
    let count = |r: &mut Reader<'_>| {
        if v1 {
            r.u64().map(|c| c as f64)
        } else {
            r.f64()
        }
    };
    while !r.done() {
        let (ts, name, tags, host) = r.head()?;
        rows.push(TimerRow {
            ts,
            name,
            tags,
            host,
            flush_id: r.u64()?,
            kind: r.string()?,
            count: count(&mut r)?,
            sum: r.f64()?,
            min: r.f64()?,
            max: r.f64()?,
            p50: r.f64()?,
            p90: r.f64()?,
            p95: r.f64()?,
            p99: r.f64()?,
            samples: r.u64()?,
            bucket_values: r.array(Reader::f64)?,
            bucket_counts: r.array(|r| count(r))?,
        });
    }
    Ok(rows)
}

/// Re-encodes a timers body written before weighted counts (spool format
/// 1) as today's columns, the same rows with each count as a `Float64`.
pub fn upgrade_v1_timers(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Bodies::default();
    for r in timers(body, true)? {
        out.timer(
            Head::of(r.ts, &r.name, &r.tags, &r.host),
            TimerColumns::of(&r),
        );
    }
    let [_, _, timers, ..] = out.bodies;
    Ok(timers)
}

#[derive(Clone)]
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.b.len()
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("a RowBinary body is cut short")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn f64(&mut self) -> Result<f64, String> {
        self.u64().map(f64::from_bits)
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, String> {
        if let Some(&b) = self.b.get(self.at)
            && b < 0x80
        {
            self.at += 1;
            return Ok(u64::from(b));
        }
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("a varint is too long".into())
    }

    #[inline]
    fn len(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len())
            .ok_or_else(|| format!("a length of {n} is past the body"))
    }

    fn string(&mut self) -> Result<String, String> {
        self.str().map(str::to_owned)
    }

    fn array<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        let n = self.len()?;
        (0..n).map(|_| item(self)).collect()
    }

    /// The key columns (name, tags, host) after a row's `ts`, as their
    /// bytes; with `check`, each string checked as UTF-8.
    #[inline]
    fn key_columns(&mut self, check: bool) -> Result<&'a [u8], String> {
        let start = self.at;
        let string = |r: &mut Self| {
            if check {
                r.str().map(str::as_bytes)
            } else {
                r.bytes()
            }
        };
        string(self)?;
        for _ in 0..self.len()? {
            string(self)?;
        }
        string(self)?;
        Ok(&self.b[start..self.at])
    }

    /// A string's bytes, unchecked.
    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }

    /// A string's bytes, checked as UTF-8 (as [`Reader::string`] checks).
    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| "a string is not UTF-8".into())
    }

    fn head(&mut self) -> Result<(u32, String, Vec<String>, String), String> {
        let mut ts = [0; 4];
        ts.copy_from_slice(self.take(4)?);
        let name = self.string()?;
        let tags = self.array(Reader::string)?;
        Ok((u32::from_le_bytes(ts), name, tags, self.string()?))
    }
}
