//! RowBinary encoding of tallyd's rows: the exact bytes of an
//! `INSERT … FORMAT RowBinary` body. Encoding is tallyd's own (not the
//! `clickhouse` crate's serializer) so that the bytes of a flush can be
//! written to the spool once and re-sent identically after a restart.
//!
//! The format (ClickHouse docs, "Formats: RowBinary"): columns in table
//! order, little-endian; `DateTime` is a `UInt32`; a `String` is its length
//! as an unsigned LEB128 varint, then its bytes; an `Array(T)` is its length
//! as a varint, then its elements.

use super::rows::{Batch, CounterRow, EventRow, GaugeRow, ServiceCheckRow, SetRow, TimerRow};
use crate::aggregate::key::KeyTags;

/// One body per table, in [`crate::telemetry::TABLES`] order, and the row
/// count of each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bodies {
    pub bodies: [Vec<u8>; TABLES],
    pub rows: [u32; TABLES],
}

/// Tables (bodies) of a flush: [`crate::telemetry::TABLES`].
pub const TABLES: usize = crate::telemetry::TABLES.len();

/// Encodes every row of `batch`.
pub fn encode(batch: &Batch) -> Bodies {
    let mut out = Bodies::default();
    for r in &batch.counters {
        out.counter(
            Head::of(r.ts, &r.name, &r.tags, &r.host),
            r.flush_id,
            r.value,
            r.samples,
        );
    }
    for r in &batch.gauges {
        out.gauge(
            Head::of(r.ts, &r.name, &r.tags, &r.host),
            r.value,
            r.version,
            r.samples,
        );
    }
    for r in &batch.timers {
        out.timer(
            Head::of(r.ts, &r.name, &r.tags, &r.host),
            TimerColumns::of(r),
        );
    }
    for r in &batch.sets {
        out.set(Head::of(r.ts, &r.name, &r.tags, &r.host), r);
    }
    for r in &batch.events {
        out.event(r);
    }
    for r in &batch.service_checks {
        out.service_check(r);
    }
    out
}

/// `ts, name, tags, host`: the columns every metric table starts with.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub ts: u32,
    pub name: &'a str,
    pub tags: Tags<'a>,
    pub host: &'a str,
}

/// The `tags` column: a row's list, or a series key's tags read in place.
#[derive(Debug, Clone, Copy)]
pub enum Tags<'a> {
    List(&'a [String]),
    Key(KeyTags<'a>),
}

impl<'a> Head<'a> {
    pub fn of(ts: u32, name: &'a str, tags: &'a [String], host: &'a str) -> Head<'a> {
        Head {
            ts,
            name,
            tags: Tags::List(tags),
            host,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ts.to_le_bytes());
        string(out, self.name);
        match self.tags {
            Tags::List(tags) => strings(out, tags),
            Tags::Key(tags) => {
                varint(out, tags.len() as u64);
                for t in tags.tags() {
                    string(out, t);
                }
            }
        }
        string(out, self.host);
    }
}

/// A timer row's columns after the head, borrowed (a flush encodes them
/// from the accumulator, with no row struct per key).
#[derive(Debug, Clone, Copy)]
pub struct TimerColumns<'a> {
    pub flush_id: u64,
    pub kind: &'a str,
    pub count: f64,
    pub sum_min_max: [f64; 3],
    /// p50, p90, p95, p99.
    pub percentiles: [f64; 4],
    pub samples: u64,
    pub bucket_values: &'a [f64],
    pub bucket_counts: &'a [f64],
}

impl<'a> TimerColumns<'a> {
    /// The columns of a decoded or merged row.
    pub fn of(r: &'a TimerRow) -> TimerColumns<'a> {
        TimerColumns {
            flush_id: r.flush_id,
            kind: &r.kind,
            count: r.count,
            sum_min_max: [r.sum, r.min, r.max],
            percentiles: [r.p50, r.p90, r.p95, r.p99],
            samples: r.samples,
            bucket_values: &r.bucket_values,
            bucket_counts: &r.bucket_counts,
        }
    }
}

/// Appending rows: each adds to its table's body and row count.
impl Bodies {
    /// `spare`'s buffers emptied, for the next flush's bodies: a buffer
    /// whose pages are already mapped (at 1M keys, tens of megabytes a
    /// flush of page faults, each zeroing a fresh page) is written again,
    /// unless it is more than twice the size of what it last held (and
    /// 1 MiB), after a burst: then it goes, and memory with it.
    pub fn recycle(spare: Bodies) -> Bodies {
        let mut out = Bodies::default();
        for (to, mut body) in out.bodies.iter_mut().zip(spare.bodies) {
            if body.capacity() <= body.len().saturating_mul(2).saturating_add(1 << 20) {
                body.clear();
                *to = body;
            }
        }
        out
    }

    fn body(&mut self, table: usize) -> &mut Vec<u8> {
        self.rows[table] = self.rows[table].saturating_add(1);
        &mut self.bodies[table]
    }

    pub fn counter(&mut self, head: Head<'_>, flush_id: u64, value: f64, samples: u64) {
        let out = self.body(0);
        head.encode(out);
        out.extend_from_slice(&flush_id.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&samples.to_le_bytes());
    }

    pub fn gauge(&mut self, head: Head<'_>, value: f64, version: u64, samples: u64) {
        let out = self.body(1);
        head.encode(out);
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&samples.to_le_bytes());
    }

    /// A timer row: `head`, then the other columns.
    pub fn timer(&mut self, head: Head<'_>, r: TimerColumns<'_>) {
        let out = self.body(2);
        head.encode(out);
        out.extend_from_slice(&r.flush_id.to_le_bytes());
        string(out, r.kind);
        out.extend_from_slice(&r.count.to_le_bytes());
        for x in r.sum_min_max.into_iter().chain(r.percentiles) {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&r.samples.to_le_bytes());
        f64s(out, r.bucket_values);
        f64s(out, r.bucket_counts);
    }

    /// A set row: `head`, then the other columns from `r` (whose own head
    /// columns are not read).
    pub fn set(&mut self, head: Head<'_>, r: &SetRow) {
        let out = self.body(3);
        head.encode(out);
        out.extend_from_slice(&r.flush_id.to_le_bytes());
        out.extend_from_slice(&r.cardinality.to_le_bytes());
        out.extend_from_slice(&r.samples.to_le_bytes());
        u64s(out, &r.member_hashes);
    }

    pub fn event(&mut self, r: &EventRow) {
        event(self.body(4), r);
    }

    pub fn service_check(&mut self, r: &ServiceCheckRow) {
        service_check(self.body(5), r);
    }
}

/// A LEB128 length, as RowBinary prefixes strings and arrays.
pub fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A RowBinary `String`.
pub fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn strings(out: &mut Vec<u8>, v: &[String]) {
    varint(out, v.len() as u64);
    for s in v {
        string(out, s);
    }
}

fn u64s(out: &mut Vec<u8>, v: &[u64]) {
    varint(out, v.len() as u64);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn f64s(out: &mut Vec<u8>, v: &[f64]) {
    varint(out, v.len() as u64);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn event(out: &mut Vec<u8>, r: &EventRow) {
    out.extend_from_slice(&r.ts.to_le_bytes());
    string(out, &r.host);
    out.extend_from_slice(&r.flush_id.to_le_bytes());
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.event_ts.to_le_bytes());
    for s in [
        &r.title,
        &r.text,
        &r.hostname,
        &r.aggregation_key,
        &r.priority,
        &r.source_type,
        &r.alert_type,
    ] {
        string(out, s);
    }
    strings(out, &r.tags);
}

fn service_check(out: &mut Vec<u8>, r: &ServiceCheckRow) {
    out.extend_from_slice(&r.ts.to_le_bytes());
    string(out, &r.host);
    out.extend_from_slice(&r.flush_id.to_le_bytes());
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.check_ts.to_le_bytes());
    string(out, &r.name);
    out.push(r.status);
    string(out, &r.hostname);
    strings(out, &r.tags);
    string(out, &r.message);
}

/// Decodes bodies written by [`Bodies`]'s row methods (as [`encode`] and
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

#[cfg(test)]
mod tests;
