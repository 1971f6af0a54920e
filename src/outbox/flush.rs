//! A flush: a closed interval's rows, fixed as the exact RowBinary bodies
//! that are (re-)sent, with what identifies them (instance, host, flush id:
//! the deduplication token) and the gauge values after them. Merging,
//! concatenating, and the persisted form the ledger's spool keeps.
//!
//! # The persisted form (a spool file), version 4
//!
//! ```text
//! 0   8  magic "TALLYFLS"
//! 8   4  format version (4)
//! 12  4  CRC32C of bytes 16..end
//! 16  8  instance id
//! 24  8  flush id
//! 32  8  generation (the WAL interval the rows come from)
//! 40  4  ts: interval start, Unix seconds
//! 44  8  samples (raw increments the rows compact)
//! 52  4  host length H, then H bytes of host
//! …      4 interval count I, then I interval starts (4 each, Unix
//!        seconds, ascending): `ts` and every distinct `ts` of the rows (the
//!        minutes they fall in are what a rollup recomputes once the
//!        flush is in ClickHouse, see [`crate::rollup`])
//! …      6 tables (counters, gauges, timers, sets, events,
//!        service_checks), each: 4 rows, 8 body length L, L bytes of
//!        RowBinary body
//! …      4 gauge count N, then N entries: 4 key length K, K key bytes,
//!        8 value (f64): each gauge's value after this flush
//! …      4 absorbed count A, then A flush ids (8 each): spooled flushes
//!        merged into this one (see [`crate::ledger`]); their files, if a
//!        crash left them, are removed unread at start
//! ```
//!
//! The bodies are RowBinary in the columns of [`crate::sink::schema`].
//! Version 3 is laid out as version 4 without the intervals: they are read
//! from its rows. Version 2 is laid out as version 3; its flushes were sent under the
//! token without the host ([`Flush::token`]), and are re-sent under it.
//! Version 1 (the release before weighted timer counts) is laid out the
//! same, but with the 4 metric tables only, and its timers body has `count
//! UInt64` and `bucket_counts Array(UInt64)`: it is read, and that body
//! re-encoded with `Float64` counts (same rows, same values), so a spool
//! left by that release is sent to the migrated table.
//!
//! Integers are little-endian.

use super::rowbinary::{Bodies, TABLES};
use super::rows::Batch;

/// Low bits of a flush id: the instance's tag (see [`flush_id`]).
pub const TAG_BITS: u32 = 20;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// A tick is 2^10 µs (1.024 ms): a 1 s interval's ids follow the clock
/// instead of being pushed ahead of it by one tick a flush.
const TICK_SHIFT: u32 = 10;

/// The tick of wall-clock time `now` (since the Unix epoch).
pub fn tick_of(now: std::time::Duration) -> u64 {
    (now.as_micros().min(u128::from(u64::MAX)) as u64) >> TICK_SHIFT
}

/// The flush id of `tick` for `instance`: `tick << 20 | tag`, where `tag`
/// is the low 20 bits of the instance id, so two instances that share a
/// `host_id` draw different ids at one instant unless their tags collide.
/// Also the version of a gauge row: a live row's is its flush id, a row
/// stamped (`|T`) for an earlier interval gets the id of that interval's
/// start, so that it orders before every live row flushed since.
/// The instance tag in a flush id (or a gauge version made from one): the
/// writer of a row, which rollups are computed by ([`crate::rollup`]).
pub fn tag(id: u64) -> u32 {
    (id & TAG_MASK) as u32
}

pub fn flush_id(tick: u64, instance: u64) -> u64 {
    (tick.min(u64::MAX >> TAG_BITS) << TAG_BITS) | (instance & TAG_MASK)
}

const MAGIC: &[u8; 8] = b"TALLYFLS";
/// Where each table's body lies in a flush's persisted form: (offset,
/// length) in bytes, per table of [`crate::telemetry::TABLES`].
pub type BodyRanges = [(u64, u64); TABLES];

/// Bytes [`Flush::head`] reads: magic to flush id.
pub const HEAD: usize = 32;
const VERSION: u32 = 4;

/// A flush whose rows are fixed: what the sink sends, every time.
#[derive(Debug, Clone, PartialEq)]
pub struct Flush {
    pub instance: u64,
    pub flush_id: u64,
    pub generation: u64,
    pub ts: u32,
    pub samples: u64,
    pub host: String,
    pub tables: Bodies,
    /// (gauge key, value after this flush) for every gauge row.
    pub gauges: Vec<(Box<[u8]>, f64)>,
    /// `ts` and every distinct `ts` of its rows, ascending (Unix seconds).
    pub intervals: Vec<u32>,
    /// Flushes merged into this one.
    pub absorbed: Vec<u64>,
    /// Read from a version 1 or 2 file: it may have been sent under the
    /// token of those releases, which did not name the host, and keeps it.
    pub legacy_token: bool,
}

impl Flush {
    /// Fixes the rows of `batch` as RowBinary bodies (merged flushes; a
    /// closed interval's flush is sealed by [`super::rows::build`]).
    pub fn seal(batch: Batch, instance: u64) -> Flush {
        let intervals = batch.intervals();
        Flush {
            instance,
            flush_id: batch.flush_id,
            generation: batch.generation,
            ts: batch.ts,
            samples: batch.samples,
            tables: super::rowbinary::encode(&batch),
            host: batch.host,
            gauges: batch.gauge_values,
            intervals,
            absorbed: Vec::new(),
            legacy_token: false,
        }
    }

    /// Merges the unsent `self` (older) and `newer` into one flush with
    /// `newer`'s id and `self`'s interval start, absorbing `self`.
    pub fn merge(self, newer: Flush) -> Result<Flush, String> {
        super::merge::flushes(self, newer)
    }

    /// Joins the unsent flushes `parts` (oldest first, at least one) into
    /// one, for one INSERT per table while a backlog drains: the bodies are
    /// concatenated, so every row keeps its own `ts` and flush id (the
    /// resolution is unchanged). The result has the newest part's id and
    /// generation, the oldest part's `ts`, and absorbs every other part.
    pub fn concat(parts: Vec<Flush>) -> Option<Flush> {
        let mut parts = parts.into_iter();
        let mut out = parts.next()?;
        // Joined flushes were never sent: the joined one is a new insert.
        out.legacy_token = false;
        for newer in parts {
            out.absorbed.push(out.flush_id);
            out.absorbed.extend(&newer.absorbed);
            out.flush_id = newer.flush_id;
            out.generation = newer.generation;
            out.instance = newer.instance;
            out.samples = out.samples.saturating_add(newer.samples);
            for (i, body) in newer.tables.bodies.iter().enumerate() {
                out.tables.bodies[i].extend_from_slice(body);
                out.tables.rows[i] = out.tables.rows[i].saturating_add(newer.tables.rows[i]);
            }
            out.gauges.extend(newer.gauges);
            out.intervals = union(&out.intervals, &newer.intervals);
        }
        Some(out)
    }

    /// The rows back (decoded from the bodies).
    pub(crate) fn into_batch(self) -> Result<Batch, String> {
        let mut batch = super::rowbinary::decode(&self.tables)?;
        batch.generation = self.generation;
        batch.host = self.host;
        batch.flush_id = self.flush_id;
        batch.ts = self.ts;
        batch.samples = self.samples;
        batch.gauge_values = self.gauges;
        Ok(batch)
    }

    /// Bytes of the bodies.
    pub fn body_len(&self) -> u64 {
        self.tables.bodies.iter().map(|b| b.len() as u64).sum()
    }

    pub fn rows(&self) -> u64 {
        self.tables.rows.iter().map(|&r| u64::from(r)).sum()
    }

    /// The `insert_deduplication_token` of table `table` (a name of
    /// [`crate::telemetry::TABLES`]): the same for every send of this flush,
    /// and different for every (instance, host, flush id), so that two
    /// hosts whose data dirs were cloned (one golden image, a VM clone, a
    /// restored backup: one instance id, the same flush ids each second)
    /// never have one's insert dropped as the other's retry. The host is
    /// named by a 64-bit SipHash-1-3 (keys 0) of its bytes, so a token stays
    /// short whatever the host; its value never changes across releases.
    pub fn token(&self, table: &str) -> String {
        if self.legacy_token {
            return format!("tallyd-{:016x}-{}-{table}", self.instance, self.flush_id);
        }
        format!(
            "tallyd-{:016x}-{:016x}-{}-{table}",
            self.instance,
            host_hash(&self.host),
            self.flush_id
        )
    }

    /// Where each table's body lies in the persisted form.
    pub fn body_ranges(&self) -> BodyRanges {
        // Magic to samples (52), then the host's length and bytes, then
        // the intervals' count and starts.
        let mut at = 56 + self.host.len() as u64 + 4 + 4 * self.intervals.len() as u64;
        let mut out = [(0, 0); TABLES];
        for (range, body) in out.iter_mut().zip(&self.tables.bodies) {
            // Each body after its rows (4) and its length (8).
            at += 12;
            *range = (at, body.len() as u64);
            at += body.len() as u64;
        }
        out
    }

    /// This flush without its bodies, gauge values and absorbed ids (its
    /// rows per table and everything that names it kept): what a recorded
    /// flush keeps in memory on its way to ClickHouse, its bodies being in
    /// its spool file.
    pub fn without_bodies(&self) -> Flush {
        Flush {
            instance: self.instance,
            flush_id: self.flush_id,
            generation: self.generation,
            ts: self.ts,
            samples: self.samples,
            host: self.host.clone(),
            tables: Bodies {
                bodies: Default::default(),
                rows: self.tables.rows,
            },
            gauges: Vec::new(),
            intervals: self.intervals.clone(),
            absorbed: Vec::new(),
            legacy_token: self.legacy_token,
        }
    }

    /// The persisted form, in one buffer.
    pub fn encode(&self) -> Vec<u8> {
        self.encoded_parts().concat()
    }

    /// The persisted form in pieces, the bodies borrowed as they are, so
    /// that writing a flush does not copy its bodies (at 1M keys, tens of
    /// megabytes a flush). Concatenated, they are [`Flush::encode`].
    pub fn encoded_parts(&self) -> Vec<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        let mut head = Vec::with_capacity(64 + self.host.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&[0; 4]);
        head.extend_from_slice(&self.instance.to_le_bytes());
        head.extend_from_slice(&self.flush_id.to_le_bytes());
        head.extend_from_slice(&self.generation.to_le_bytes());
        head.extend_from_slice(&self.ts.to_le_bytes());
        head.extend_from_slice(&self.samples.to_le_bytes());
        bytes(&mut head, self.host.as_bytes());
        head.extend_from_slice(&len32(self.intervals.len()).to_le_bytes());
        for t in &self.intervals {
            head.extend_from_slice(&t.to_le_bytes());
        }
        let mut parts: Vec<Cow<'_, [u8]>> = Vec::with_capacity(2 + 2 * self.tables.bodies.len());
        parts.push(Cow::Owned(head));
        for (rows, b) in self.tables.rows.iter().zip(&self.tables.bodies) {
            let mut table = Vec::with_capacity(12);
            table.extend_from_slice(&rows.to_le_bytes());
            table.extend_from_slice(&(b.len() as u64).to_le_bytes());
            parts.push(Cow::Owned(table));
            parts.push(Cow::Borrowed(&b[..]));
        }
        let mut tail = Vec::new();
        tail.extend_from_slice(&len32(self.gauges.len()).to_le_bytes());
        for (k, v) in &self.gauges {
            bytes(&mut tail, k);
            tail.extend_from_slice(&v.to_le_bytes());
        }
        tail.extend_from_slice(&len32(self.absorbed.len()).to_le_bytes());
        for id in &self.absorbed {
            tail.extend_from_slice(&id.to_le_bytes());
        }
        parts.push(Cow::Owned(tail));
        // The CRC covers everything after its own field (byte 16 on).
        let mut crc = crc32c::crc32c(&parts[0][16..]);
        for p in &parts[1..] {
            crc = crc32c::crc32c_append(crc, p);
        }
        if let Cow::Owned(head) = &mut parts[0] {
            head[12..16].copy_from_slice(&crc.to_le_bytes());
        }
        parts
    }

    /// Checks the first [`HEAD`] bytes of this release's persisted form
    /// (magic, version 4) and returns what they hold: (CRC32C of bytes
    /// 16 on, instance id, flush id), for a reader that checks a file
    /// without holding it in memory.
    pub fn head(b: &[u8]) -> Result<(u32, u64, u64), String> {
        if b.len() < HEAD || &b[..8] != MAGIC {
            return Err("not a tallyd spool file (bad magic)".into());
        }
        let mut r = Reader { b, at: 8 };
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("spool format version {version}, not {VERSION}"));
        }
        Ok((r.u32()?, r.u64()?, r.u64()?))
    }

    /// Reads what names a persisted flush of this release (version 4) and
    /// where its bodies lie, leaving the bodies where they are:
    /// `read_at(offset, buf)` fills `buf` from the file's bytes at
    /// `offset`, and the file is `len` bytes long. Returns the flush
    /// without bodies, gauge values and absorbed ids
    /// ([`Flush::without_bodies`]) and its [`Flush::body_ranges`]. The CRC
    /// is not checked here: a reader of the bodies checks it (see
    /// [`crate::ledger::spool::open_body`]).
    pub fn decode_head(
        len: u64,
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(Flush, BodyRanges), String> {
        let mut read = |at: u64, n: u64| -> Result<Vec<u8>, String> {
            if at.saturating_add(n) > len {
                return Err("truncated".into());
            }
            let mut buf = vec![0; n as usize];
            read_at(at, &mut buf).map_err(|e| e.to_string())?;
            Ok(buf)
        };
        let fixed = read(0, 56)?;
        let (_, instance, flush_id) = Flush::head(&fixed)?;
        let mut r = Reader {
            b: &fixed,
            at: HEAD,
        };
        let (generation, ts, samples) = (r.u64()?, r.u32()?, r.u64()?);
        let host_len = u64::from(r.u32()?);
        let host = String::from_utf8(read(56, host_len)?).map_err(|_| "host not UTF-8")?;
        let mut at = 56 + host_len;
        let count = read(at, 4)?;
        let count = u64::from(Reader { b: &count, at: 0 }.u32()?);
        let starts = read(at + 4, count.saturating_mul(4))?;
        let intervals = starts
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at += 4 + 4 * count;
        let mut tables = Bodies::default();
        let mut ranges = [(0, 0); TABLES];
        for (rows, range) in tables.rows.iter_mut().zip(&mut ranges) {
            let prefix = read(at, 12)?;
            let mut r = Reader { b: &prefix, at: 0 };
            *rows = r.u32()?;
            let body = r.u64()?;
            at += 12;
            if at.saturating_add(body) > len {
                return Err("truncated".into());
            }
            *range = (at, body);
            at += body;
        }
        let flush = Flush {
            instance,
            flush_id,
            generation,
            ts,
            samples,
            host,
            tables,
            gauges: Vec::new(),
            intervals,
            absorbed: Vec::new(),
            legacy_token: false,
        };
        Ok((flush, ranges))
    }

    pub fn decode(b: &[u8]) -> Result<Flush, String> {
        if b.len() < 16 || &b[..8] != MAGIC {
            return Err("not a tallyd spool file (bad magic)".into());
        }
        let mut r = Reader { b, at: 8 };
        let version = r.u32()?;
        if !(1..=VERSION).contains(&version) {
            return Err(format!(
                "spool format version {version}; this tallyd reads versions 1 to {VERSION}"
            ));
        }
        let crc = r.u32()?;
        if crc32c::crc32c(&b[16..]) != crc {
            return Err("checksum mismatch".into());
        }
        let instance = r.u64()?;
        let flush_id = r.u64()?;
        let generation = r.u64()?;
        let ts = r.u32()?;
        let samples = r.u64()?;
        let host = String::from_utf8(r.bytes32()?.to_vec()).map_err(|_| "host not UTF-8")?;
        let mut intervals = Vec::new();
        if version >= 4 {
            for _ in 0..r.u32()? {
                intervals.push(r.u32()?);
            }
        }
        let mut tables = Bodies::default();
        // Version 1 had the four metric tables only.
        let tables_in_file = if version == 1 { 4 } else { tables.bodies.len() };
        for i in 0..tables_in_file {
            tables.rows[i] = r.u32()?;
            let len = usize::try_from(r.u64()?).map_err(|_| "body too long")?;
            tables.bodies[i] = r.take(len)?.to_vec();
        }
        if version == 1 {
            tables.bodies[2] = super::rowbinary::upgrade_v1_timers(&tables.bodies[2])?;
        }
        let n = r.u32()?;
        let mut gauges = Vec::new();
        for _ in 0..n {
            let k: Box<[u8]> = r.bytes32()?.into();
            gauges.push((k, f64::from_le_bytes(r.array()?)));
        }
        let n = r.u32()?;
        let mut absorbed = Vec::new();
        for _ in 0..n {
            absorbed.push(r.u64()?);
        }
        if r.at != b.len() {
            return Err("trailing bytes".into());
        }
        if version < 4 {
            // Bodies that do not decode as rows are sent as they are (the
            // CRC checked them): their rollups start from `ts`.
            intervals = match super::rowbinary::decode(&tables) {
                Ok(mut batch) => {
                    batch.ts = ts;
                    batch.intervals()
                }
                Err(_) => vec![ts],
            };
        }
        Ok(Flush {
            instance,
            flush_id,
            generation,
            ts,
            samples,
            host,
            tables,
            gauges,
            intervals,
            absorbed,
            legacy_token: version < 3,
        })
    }
}

/// The ascending union of two ascending lists of interval starts.
pub fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// SipHash-1-3 with keys (0, 0) of `host`: fixed by the algorithm, so the
/// same host names the same token in every release.
fn host_hash(host: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    h.write(host.as_bytes());
    h.finish()
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&len32(b.len()).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| "truncated".to_string())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes32(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
pub(crate) mod tests;
