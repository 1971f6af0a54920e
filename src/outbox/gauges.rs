//! Gauge memory: the last flushed value of each gauge, against which a
//! gauge delta (`name:+3|g`, StatsD's signed gauge) resolves in a later
//! interval, and its persisted form, the ledger's `gauges.log`.
//!
//! # `gauges.log`, version 1: a change log, compacted when it doubles
//!
//! ```text
//! 0   8  magic "TALLYGLG"
//! 8   4  version (1)
//! 12  4  reserved (0)
//! 16  …  records, each:
//!        0   4  length L of the bytes after the CRC
//!        4   4  CRC32C of those L bytes
//!        8   8  as of: the id of the flush whose values it holds
//!        16  4  entry count N
//!        20  …  N entries: 4 key length K, K key bytes, 8 value (f64)
//! ```
//!
//! After each flush with gauges, one record of that flush's gauge values is
//! appended (bytes in proportion to the flush's gauge rows, not to every
//! gauge remembered). When the log has grown past twice what one record of
//! every remembered value takes (and 64 KiB), it is rewritten atomically as
//! the header and that one record ([`GaugesWrite::Rewrite`]). Reading
//! applies the records in order; a record that does not check (a torn
//! append) ends the log there. The `gauges` file of earlier releases (a
//! single snapshot, below) is read first when present.

use std::collections::HashMap;

/// The last flushed value of each gauge, so that a delta arriving in a later
/// interval applies to it. Bounded twice:
/// - a gauge not updated for `ttl` flushes is forgotten (aged out, as
///   statsd's `deleteGauges` does at one flush): a later delta then
///   resolves against 0. Age is counted in flushes ([`start_flush`]), not
///   wall-clock time, so a clock step neither ages nor keeps anything;
/// - past `max_keys` gauges, new gauges are not remembered (their later
///   deltas start from 0) and that is counted, until aged-out ones make
///   room.
///
/// [`start_flush`]: GaugeMemory::start_flush
#[derive(Debug)]
pub struct GaugeMemory {
    values: HashMap<Box<[u8]>, Remembered>,
    max_keys: usize,
    /// Flushes a gauge may go without an update before it is forgotten.
    ttl: u64,
    /// Flushes started so far.
    flushes: u64,
    /// When to look for aged-out gauges next (a flush count).
    next_sweep: u64,
    /// Gauges whose deltas would have taken their value past the range of
    /// `f64`: they kept the previous value (taken by the flush stage, which
    /// counts them as dropped).
    pub overflowed: u64,
    /// Gauges forgotten as aged out (taken by the flush stage).
    pub aged_out: u64,
    /// Bytes of one log record of every remembered value.
    live_bytes: u64,
    /// Bytes of `gauges.log` as written so far (`None`: unknown, so the
    /// next write rewrites it).
    log_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    value: f64,
    /// The flush that last updated it.
    seen: u64,
}

impl GaugeMemory {
    /// A memory of at most `max_keys` gauges that never ages them out.
    pub fn new(max_keys: usize) -> GaugeMemory {
        GaugeMemory {
            values: HashMap::new(),
            max_keys,
            ttl: u64::MAX,
            flushes: 0,
            next_sweep: u64::MAX,
            overflowed: 0,
            aged_out: 0,
            live_bytes: 20,
            log_bytes: None,
        }
    }

    /// The log on disk holds `bytes` (read at start, no torn tail).
    pub fn with_log_bytes(mut self, bytes: u64) -> GaugeMemory {
        self.log_bytes = Some(bytes);
        self
    }

    /// What to write after flush `as_of`, whose gauge values are `changed`:
    /// a record of them, or the whole log again once it has doubled.
    pub fn persist(&mut self, as_of: u64, changed: &[(Box<[u8]>, f64)]) -> GaugesWrite {
        let record = record_len(changed.iter().map(|(k, _)| &**k));
        let bound = self.live_bytes.saturating_mul(2).max(COMPACT_FLOOR);
        match self.log_bytes {
            Some(bytes) if bytes.saturating_add(record) <= bound => {
                self.log_bytes = Some(bytes + record);
                GaugesWrite::Append(encode_record(
                    as_of,
                    changed.iter().map(|(k, v)| (&**k, *v)),
                ))
            }
            _ => {
                let mut out = log_header().to_vec();
                out.extend(encode_record(
                    as_of,
                    self.values.iter().map(|(k, r)| (&**k, r.value)),
                ));
                self.log_bytes = Some(out.len() as u64);
                GaugesWrite::Rewrite(out)
            }
        }
    }

    /// The last write failed (or its outcome is unknown): the next one
    /// rewrites the log.
    pub fn persist_failed(&mut self) {
        self.log_bytes = None;
    }

    /// Forgets a gauge not updated for `flushes` flushes (at least 1).
    pub fn with_ttl(mut self, flushes: u64) -> GaugeMemory {
        self.ttl = flushes.max(1);
        self.next_sweep = self.sweep_every();
        self
    }

    /// Sweeps every quarter of the TTL: a gauge lives at most 1.25 TTLs
    /// unseen, for an O(gauges) pass every TTL/4 flushes.
    fn sweep_every(&self) -> u64 {
        self.flushes.saturating_add((self.ttl / 4).max(1))
    }

    /// How many gauges are remembered.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Counts a flush, and forgets the gauges it finds aged out: every
    /// TTL/4 flushes, or at once when the memory is full.
    pub fn start_flush(&mut self) {
        self.flushes = self.flushes.saturating_add(1);
        let full = self.values.len() >= self.max_keys;
        if self.ttl == u64::MAX || (self.flushes < self.next_sweep && !full) {
            return;
        }
        let (now, ttl) = (self.flushes, self.ttl);
        let before = self.values.len();
        let mut freed = 0;
        self.values.retain(|k, r| {
            let keep = now.saturating_sub(r.seen) <= ttl;
            if !keep {
                freed += 12 + k.len() as u64;
            }
            keep
        });
        self.live_bytes = self.live_bytes.saturating_sub(freed);
        if self.values.len() < before {
            self.aged_out += (before - self.values.len()) as u64;
            // The log still holds them: its next write rewrites it, so that
            // a restart does not bring them back.
            self.log_bytes = None;
        }
        self.next_sweep = self.sweep_every();
    }

    /// Remembers `value` as the last flushed value of gauge `key` (the
    /// ledger's saved values at start).
    pub fn remember(&mut self, key: Box<[u8]>, value: f64) {
        if self.values.contains_key(&key) || self.values.len() < self.max_keys {
            let (seen, len) = (self.flushes, 12 + key.len() as u64);
            if self
                .values
                .insert(key, Remembered { value, seen })
                .is_none()
            {
                self.live_bytes += len;
            }
        }
    }

    /// Remembers saved values (`gauges.log`, then spooled flushes: oldest
    /// first, a key's later value winning), newest first and each key
    /// once, so that with more saved than `max_keys` the recently flushed
    /// gauges are the ones kept.
    pub fn remember_saved(&mut self, saved: Vec<(Box<[u8]>, f64)>) {
        let mut seen = std::collections::HashSet::new();
        for (key, value) in saved.into_iter().rev() {
            if !seen.contains(&key) {
                seen.insert(key.clone());
                self.remember(key, value);
            }
        }
    }

    /// Resolves a gauge's value and remembers it. Returns the value and
    /// whether it could not be remembered.
    /// A known gauge's key is not copied again.
    pub(super) fn settle(
        &mut self,
        key: &[u8],
        g: &crate::aggregate::acc::GaugeAcc,
    ) -> (f64, bool) {
        let room = self.values.len() < self.max_keys;
        let seen = self.flushes;
        let slot = self.values.get_mut(key);
        let previous = slot.as_deref().map(|r| r.value);
        let value = g.resolve(previous).unwrap_or_else(|| {
            self.overflowed += 1;
            previous.unwrap_or(0.0)
        });
        match slot {
            Some(r) => *r = Remembered { value, seen },
            None if room => {
                self.values.insert(key.into(), Remembered { value, seen });
                self.live_bytes += 12 + key.len() as u64;
            }
            None => return (value, true),
        }
        (value, false)
    }
}

// The `gauges` file of earlier releases, version 1 (read, no longer written):
//
//   0  8  magic "TALLYGAU"
//   8  4  version (1)
//   12 4  CRC32C of bytes 16..end
//   16 8  as of: the id of the last flush whose values it holds
//   24 4  entry count N
//   28 …  N entries: 4 key length K, K key bytes, 8 value (f64)
//
// At start, spooled flushes newer than "as of" are laid over it.
const GAUGES_MAGIC: &[u8; 8] = b"TALLYGAU";

/// (gauge key, last value) pairs.
pub type GaugeValues = Vec<(Box<[u8]>, f64)>;

/// Encodes the last values of gauges as of flush `as_of` (the `gauges` file).
pub fn encode<'a>(as_of: u64, entries: impl ExactSizeIterator<Item = (&'a [u8], f64)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + entries.len() * 48);
    out.extend_from_slice(GAUGES_MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&as_of.to_le_bytes());
    put_entries(&mut out, entries);
    let crc = crc32c::crc32c(&out[16..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode(b: &[u8]) -> Option<(u64, GaugeValues)> {
    if b.get(..8)? != GAUGES_MAGIC || b.get(8..12)? != 1u32.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(b.get(12..16)?.try_into().ok()?);
    if crc32c::crc32c(b.get(16..)?) != crc {
        return None;
    }
    let as_of = u64::from_le_bytes(b.get(16..24)?.try_into().ok()?);
    let (out, at) = take_entries(b, 24)?;
    (at == b.len()).then_some((as_of, out))
}

/// The entries [`put_entries`] wrote at `at` in `b`, and where they end.
fn take_entries(b: &[u8], mut at: usize) -> Option<(GaugeValues, usize)> {
    let n = u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?);
    at += 4;
    let mut out = Vec::new();
    for _ in 0..n {
        let k = u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize;
        at += 4;
        let key: Box<[u8]> = b.get(at..at.checked_add(k)?)?.into();
        at += k;
        let v = f64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?);
        at += 8;
        out.push((key, v));
    }
    Some((out, at))
}

const LOG_MAGIC: &[u8; 8] = b"TALLYGLG";
/// Bytes of the log's header.
pub const LOG_HEADER: usize = 16;
/// A log smaller than this is never compacted.
const COMPACT_FLOOR: u64 = 64 << 10;

/// What the ledger writes of the gauge memory after a flush.
#[derive(Debug, Clone, PartialEq)]
pub enum GaugesWrite {
    /// Append this record to `gauges.log` (and sync it).
    Append(Vec<u8>),
    /// Replace `gauges.log` with these bytes (header and one record of
    /// every remembered value), atomically.
    Rewrite(Vec<u8>),
}

/// `entries` as both persisted forms hold them: 4 count N, then N entries
/// of 4 key length K, K key bytes, 8 value (f64).
fn put_entries<'a>(out: &mut Vec<u8>, entries: impl ExactSizeIterator<Item = (&'a [u8], f64)>) {
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for (k, v) in entries {
        out.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Bytes of `entries` as one log record.
fn record_len<'a>(entries: impl Iterator<Item = &'a [u8]>) -> u64 {
    20 + entries.map(|k| 12 + k.len() as u64).sum::<u64>()
}

/// One log record: the values after flush `as_of`.
pub fn encode_record<'a>(
    as_of: u64,
    entries: impl ExactSizeIterator<Item = (&'a [u8], f64)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + entries.len() * 48);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&as_of.to_le_bytes());
    put_entries(&mut out, entries);
    let len = u32::try_from(out.len() - 8).unwrap_or(u32::MAX);
    let crc = crc32c::crc32c(&out[8..]);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The log's header.
pub fn log_header() -> [u8; LOG_HEADER] {
    let mut h = [0; LOG_HEADER];
    h[..8].copy_from_slice(LOG_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// What a log holds.
#[derive(Debug, Default, PartialEq)]
pub struct Log {
    /// The flush id of the last record (0: none).
    pub as_of: u64,
    /// (key, value) in record order: a later entry of a key wins.
    pub values: GaugeValues,
    /// Bytes of the header and the records that check; a torn append
    /// after them is cut off.
    pub good_len: u64,
}

/// Reads a log. `Err` when the header is not a version 1 log's (the file
/// is damaged as a whole); a record that does not check ends the log.
pub fn decode_log(b: &[u8]) -> Result<Log, &'static str> {
    if b.get(..8) != Some(&LOG_MAGIC[..]) || b.get(8..12) != Some(&1u32.to_le_bytes()[..]) {
        return Err("not a version 1 gauges log");
    }
    let mut log = Log {
        good_len: LOG_HEADER as u64,
        ..Log::default()
    };
    let mut at = LOG_HEADER;
    while let Some((as_of, entries, next)) = record_at(b, at) {
        log.as_of = as_of;
        log.values.extend(entries);
        log.good_len = next as u64;
        at = next;
    }
    Ok(log)
}

/// The record at `at`: (as of, entries, where the next one starts).
fn record_at(b: &[u8], at: usize) -> Option<(u64, GaugeValues, usize)> {
    let len = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b.get(at + 4..at + 8)?.try_into().ok()?);
    let end = at.checked_add(8)?.checked_add(len)?;
    let body = b.get(at + 8..end)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let as_of = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let (out, p) = take_entries(body, 8)?;
    (p == body.len()).then_some((as_of, out, end))
}

#[cfg(test)]
mod tests;
