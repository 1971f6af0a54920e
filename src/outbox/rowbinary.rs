//! RowBinary encoding of tallyd's rows: the exact bytes of an
//! `INSERT … FORMAT RowBinary` body. Encoding is tallyd's own (not the
//! `clickhouse` crate's serializer) so that the bytes of a flush can be
//! written to the spool once and re-sent identically after a restart.
//!
//! The format (ClickHouse docs, "Formats: RowBinary"): columns in table
//! order, little-endian; `DateTime` is a `UInt32`; a `String` is its length
//! as an unsigned LEB128 varint, then its bytes; an `Array(T)` is its length
//! as a varint, then its elements.

use super::rows::{Batch, EventRow, ServiceCheckRow, SetRow, TimerRow};
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

mod read;
pub use read::{KeyView, RowView, decode, each_row, upgrade_v1_timers};

#[cfg(test)]
mod tests;
