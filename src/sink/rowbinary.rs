//! RowBinary encoding of tallyd's rows: the exact bytes of an
//! `INSERT … FORMAT RowBinary` body. Encoding is tallyd's own (not the
//! `clickhouse` crate's serializer) so that the bytes of a flush can be
//! written to the spool once and re-sent identically after a restart.
//!
//! The format (ClickHouse docs, "Formats: RowBinary"): columns in table
//! order, little-endian; `DateTime` is a `UInt32`; a `String` is its length
//! as an unsigned LEB128 varint, then its bytes; an `Array(T)` is its length
//! as a varint, then its elements.

use super::rows::{Batch, CounterRow, GaugeRow, SetRow, TimerRow};

/// One body per table, in [`crate::telemetry::TABLES`] order, and the row
/// count of each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bodies {
    pub bodies: [Vec<u8>; 4],
    pub rows: [u32; 4],
}

/// Encodes every row of `batch`.
pub fn encode(batch: &Batch) -> Bodies {
    let mut out = Bodies::default();
    for r in &batch.counters {
        counter(&mut out.bodies[0], r);
    }
    for r in &batch.gauges {
        gauge(&mut out.bodies[1], r);
    }
    for r in &batch.timers {
        timer(&mut out.bodies[2], r);
    }
    for r in &batch.sets {
        set(&mut out.bodies[3], r);
    }
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    out.rows = [
        count(batch.counters.len()),
        count(batch.gauges.len()),
        count(batch.timers.len()),
        count(batch.sets.len()),
    ];
    out
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
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

/// `ts, name, tags, host`: the columns every table starts with.
fn head(out: &mut Vec<u8>, ts: u32, name: &str, tags: &[String], host: &str) {
    out.extend_from_slice(&ts.to_le_bytes());
    string(out, name);
    strings(out, tags);
    string(out, host);
}

fn counter(out: &mut Vec<u8>, r: &CounterRow) {
    head(out, r.ts, &r.name, &r.tags, &r.host);
    out.extend_from_slice(&r.flush_id.to_le_bytes());
    out.extend_from_slice(&r.value.to_le_bytes());
    out.extend_from_slice(&r.samples.to_le_bytes());
}

fn gauge(out: &mut Vec<u8>, r: &GaugeRow) {
    head(out, r.ts, &r.name, &r.tags, &r.host);
    out.extend_from_slice(&r.value.to_le_bytes());
    out.extend_from_slice(&r.version.to_le_bytes());
    out.extend_from_slice(&r.samples.to_le_bytes());
}

fn timer(out: &mut Vec<u8>, r: &TimerRow) {
    head(out, r.ts, &r.name, &r.tags, &r.host);
    out.extend_from_slice(&r.flush_id.to_le_bytes());
    string(out, &r.kind);
    out.extend_from_slice(&r.count.to_le_bytes());
    for x in [r.sum, r.min, r.max, r.p50, r.p90, r.p95, r.p99] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&r.samples.to_le_bytes());
    f64s(out, &r.bucket_values);
    u64s(out, &r.bucket_counts);
}

fn set(out: &mut Vec<u8>, r: &SetRow) {
    head(out, r.ts, &r.name, &r.tags, &r.host);
    out.extend_from_slice(&r.flush_id.to_le_bytes());
    out.extend_from_slice(&r.cardinality.to_le_bytes());
    out.extend_from_slice(&r.samples.to_le_bytes());
    u64s(out, &r.member_hashes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_row_is_encoded_column_by_column() {
        let batch = Batch {
            counters: vec![CounterRow {
                ts: 1,
                name: "ab".into(),
                tags: vec!["x".into()],
                host: "h".into(),
                flush_id: 2,
                value: 1.5,
                samples: 3,
            }],
            ..Batch::default()
        };
        let b = encode(&batch);
        let mut want = vec![1, 0, 0, 0, 2, b'a', b'b', 1, 1, b'x', 1, b'h'];
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&3u64.to_le_bytes());
        assert_eq!(b.bodies[0], want);
        assert_eq!(b.rows, [1, 0, 0, 0]);
        assert!(b.bodies[1].is_empty());
    }

    #[test]
    fn long_strings_get_multi_byte_lengths() {
        let mut out = Vec::new();
        string(&mut out, &"x".repeat(300));
        assert_eq!(&out[..2], &[0xAC, 0x02]);
        assert_eq!(out.len(), 302);
    }
}
