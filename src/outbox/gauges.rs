//! Gauge memory: the last flushed value of each gauge, against which a
//! gauge delta (`name:+3|g`, StatsD's signed gauge) resolves in a later
//! interval, and its persisted form, the ledger's `gauges` file.

use std::collections::HashMap;

/// The last flushed value of each gauge, so that a delta arriving in a later
/// interval applies to it. Bounded: past `max_keys` gauges, new gauges are
/// not remembered (their later deltas start from 0) and that is counted.
#[derive(Debug)]
pub struct GaugeMemory {
    values: HashMap<Box<[u8]>, f64>,
    max_keys: usize,
    /// Gauges whose deltas would have taken their value past the range of
    /// `f64`: they kept the previous value (taken by the flush stage, which
    /// counts them as dropped).
    pub overflowed: u64,
}

impl GaugeMemory {
    pub fn new(max_keys: usize) -> GaugeMemory {
        GaugeMemory {
            values: HashMap::new(),
            max_keys,
            overflowed: 0,
        }
    }

    /// Remembers `value` as the last flushed value of gauge `key` (the
    /// ledger's saved values at start).
    pub fn remember(&mut self, key: Box<[u8]>, value: f64) {
        if self.values.contains_key(&key) || self.values.len() < self.max_keys {
            self.values.insert(key, value);
        }
    }

    /// The `gauges` file of the ledger for the values remembered now, which
    /// are those after flush `as_of`.
    pub fn encode(&self, as_of: u64) -> Vec<u8> {
        encode(as_of, self.values.iter().map(|(k, v)| (&**k, *v)))
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
        let slot = self.values.get_mut(key);
        let previous = slot.as_deref().copied();
        let value = g.resolve(previous).unwrap_or_else(|| {
            self.overflowed += 1;
            previous.unwrap_or(0.0)
        });
        match slot {
            Some(v) => *v = value,
            None if room => {
                self.values.insert(key.into(), value);
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
