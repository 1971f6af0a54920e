//! Gauge memory: the last flushed value of each gauge, against which a
//! gauge delta (`name:+3|g`, StatsD's signed gauge) resolves in a later
//! interval, and its persisted form, the ledger's `gauges` file.

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
        }
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
        self.values.retain(|_, r| now.saturating_sub(r.seen) <= ttl);
        self.aged_out += (before - self.values.len()) as u64;
        self.next_sweep = self.sweep_every();
    }

    /// Remembers `value` as the last flushed value of gauge `key` (the
    /// ledger's saved values at start).
    pub fn remember(&mut self, key: Box<[u8]>, value: f64) {
        if self.values.contains_key(&key) || self.values.len() < self.max_keys {
            let seen = self.flushes;
            self.values.insert(key, Remembered { value, seen });
        }
    }

    /// The `gauges` file of the ledger for the values remembered now, which
    /// are those after flush `as_of`.
    pub fn encode(&self, as_of: u64) -> Vec<u8> {
        encode(as_of, self.values.iter().map(|(k, r)| (&**k, r.value)))
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
            }
            None => return (value, true),
        }
        (value, false)
    }
}

// The `gauges` file, version 1 (written by the ledger):
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
    let n = u32::from_le_bytes(b.get(24..28)?.try_into().ok()?);
    let mut at = 28usize;
    let mut out = Vec::new();
    for _ in 0..n {
        let k = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        let key: Box<[u8]> = b.get(at..at.checked_add(k)?)?.into();
        at += k;
        let v = f64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?);
        at += 8;
        out.push((key, v));
    }
    (at == b.len()).then_some((as_of, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(memory: &mut GaugeMemory, key: &[u8], d: f64) -> f64 {
        let mut g = crate::aggregate::acc::GaugeAcc {
            value: 0.0,
            absolute: false,
            samples: 0,
        };
        assert!(g.apply(d, true));
        memory.settle(key, &g).0
    }

    #[test]
    fn a_gauge_not_updated_for_its_ttl_is_forgotten_and_an_updated_one_kept() {
        let mut m = GaugeMemory::new(10).with_ttl(4);
        m.start_flush();
        assert_eq!(delta(&mut m, b"idle", 5.0), 5.0);
        assert_eq!(delta(&mut m, b"busy", 5.0), 5.0);
        for _ in 0..4 {
            m.start_flush();
            delta(&mut m, b"busy", 1.0);
        }
        assert_eq!(m.len(), 2, "within its ttl");
        for _ in 0..2 {
            m.start_flush();
            delta(&mut m, b"busy", 1.0);
        }
        assert_eq!((m.len(), m.aged_out), (1, 1));
        assert_eq!(
            delta(&mut m, b"idle", 1.0),
            1.0,
            "a delta after it is forgotten starts from 0"
        );
        assert_eq!(delta(&mut m, b"busy", 0.0), 11.0);
    }

    #[test]
    fn a_full_memory_makes_room_as_gauges_age_out() {
        let mut m = GaugeMemory::new(2).with_ttl(3);
        m.start_flush();
        delta(&mut m, b"a", 1.0);
        delta(&mut m, b"b", 1.0);
        let g = crate::aggregate::acc::GaugeAcc {
            value: 1.0,
            absolute: true,
            samples: 1,
        };
        assert!(m.settle(b"c", &g).1, "full");
        for _ in 0..4 {
            m.start_flush();
        }
        assert_eq!(m.len(), 0, "a full memory is swept at once");
        delta(&mut m, b"c", 2.0);
        assert_eq!(delta(&mut m, b"c", 1.0), 3.0, "remembered");
    }

    #[test]
    fn without_a_ttl_nothing_ages_out() {
        let mut m = GaugeMemory::new(10);
        delta(&mut m, b"a", 1.0);
        for _ in 0..1000 {
            m.start_flush();
        }
        assert_eq!(delta(&mut m, b"a", 1.0), 2.0);
    }
}
