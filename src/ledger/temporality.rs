//! OTLP temporality: the last point of each OTLP series, so that a
//! cumulative point becomes the delta since the one before it, and a
//! retried point is counted once, although OTLP has no idempotency key.
//!
//! # The rules (per series, see [`crate::protocol::otlp`] for its identity)
//!
//! - **Delta points** (and every Gauge point): a series' windows
//!   `[start, time]` do not overlap (the data model's single-writer rule),
//!   so a point whose `time` is at or before the last applied one's is a
//!   retry (or out of order), counted and not applied.
//! - **Cumulative monotonic Sums, histograms, exponential histograms and
//!   Summaries** become deltas (the data model's cumulative-to-delta
//!   conversion):
//!   - the first point of a series is applied whole if its `start` is
//!     after the state's *epoch* (tallyd's first start with this data dir,
//!     kept in the file: a series that began while tallyd was restarting
//!     was never seen, and counts whole), else it is only the reference
//!     the next delta is taken from (`initial_value = auto`, as the
//!     Collector's `cumulativetodelta` processor does): the series ran
//!     before tallyd could see it, and what it counted then is unknown;
//!   - a point with a newer `start` is a reset: applied whole;
//!   - a point at or before the last one's `time`, or with an older
//!     `start`, is a retry: a delta of 0, counted, not applied;
//!   - a point lower than the last one with the same `start` (a count or
//!     a bucket that went down, histogram bounds or an exponential scale
//!     that changed) is dropped and counted, not guessed; the next delta
//!     is taken from it. An exponential histogram whose scale went down
//!     (the SDK rescaled) is compared with the last one merged to the new
//!     scale.
//! - **Cumulative non-monotonic Sums** are values (a gauge): ordered like
//!   delta points, and a point with an older `start` is a retry.
//!
//! A series with no point for `otlp.max_staleness` (counted in flushes, as
//! the dedup window is) is forgotten: its value goes, and a *tombstone* of
//! its start and time stays for 24 times as long (`TOMBSTONE_WINDOWS`), so
//! that the same run of it resuming (a partition that outlasted the
//! staleness) is a reference again, not counted whole, and a retry is still
//! a retry; a new run (a newer start) counts whole. When a tombstone goes,
//! its last time becomes the *horizon*: a series unknown to the state that
//! started before it may have been counted, and is a reference.
//! A new series past the memory budget is refused (its points are
//! rejected and counted): the state's bytes count toward
//! `aggregate.max_memory` with the open interval's.
//!
//! # Durability: the same as the protobuf dedup state's
//!
//! The ingest path judges a request's points under the state's lock,
//! appends the converted request *with the new state of every series it
//! moved* ([`Mark`]s) to the WAL, then applies the marks
//! ([`Guard::commit`]). At release (step 5 of the durable order in
//! [`crate::ledger`]) the changed series are written to `otlp-series`
//! before the WAL lets the generation's records go; at start the file is
//! read and every mark still in the WAL is applied again
//! ([`Temporality::observe`]): a mark only ever moves a series forward in
//! time, so applying one twice changes nothing.
//!
//! # The `otlp-series` file, version 1: a change log, compacted when it doubles
//!
//! ```text
//! 0   8  magic "TALLYOTS"
//! 8   4  version (1)
//! 12  4  reserved (0)
//! 16  …  records, each:
//!        0   4  length L of the bytes after the CRC
//!        4   4  CRC32C of those L bytes
//!        8   L  a protobuf `Chunk` ([`Chunk`]): the flush count, the
//!               state's epoch and horizon, and the series changed since the record
//!               before (a later mark of a series replaces an earlier one;
//!               a tombstone is a mark with `forgotten` set)
//! ```
//!
//! When the file has grown past twice what one record of every series
//! takes (and 64 KiB), it is rewritten atomically as one record. A last
//! record that runs past the end of the file or does not check is a torn
//! append and is cut off; one that does not check with records after it is
//! damage: the file is quarantined (cumulative series then start over from
//! a reference point, and the epoch from this start, losing at most one
//! delta each rather than counting one twice).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prost::Message;

use crate::fs::{Fs, read_optional};
use crate::lock;
use crate::protocol::otlp::{Kind, Point, Temporality as T, Value};

/// The state file's name in the data dir.
pub const FILE: &str = "otlp-series";
const MAGIC: &[u8; 8] = b"TALLYOTS";
const HEADER: usize = 16;
/// A file smaller than this is never compacted.
const COMPACT_FLOOR: u64 = 64 << 10;
/// Estimated bytes of a series in memory beyond its buckets (the map's
/// entry, key and struct).
const SERIES_BYTES: u64 = 96;
/// A forgotten series' tombstone is kept this many staleness windows.
const TOMBSTONE_WINDOWS: u64 = 24;

/// A series' state as the WAL and the file hold it: its last point.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mark {
    #[prost(fixed64, tag = "1")]
    pub series_hi: u64,
    #[prost(fixed64, tag = "2")]
    pub series_lo: u64,
    /// `start_time_unix_nano`.
    #[prost(uint64, tag = "3")]
    pub start: u64,
    /// `time_unix_nano`.
    #[prost(uint64, tag = "4")]
    pub time: u64,
    /// The flush count when it was last moved (the file only).
    #[prost(uint64, tag = "5")]
    pub seen: u64,
    #[prost(oneof = "Last", tags = "6, 7, 8")]
    pub last: Option<Last>,
    /// A series forgotten for staleness, kept without its value for a
    /// while (see the module doc): its start and time still tell a retry
    /// and a resumed series from a new one.
    #[prost(bool, tag = "9")]
    pub forgotten: bool,
}

/// The last cumulative value of a series (none: a delta series, a gauge).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Last {
    #[prost(double, tag = "6")]
    Number(f64),
    /// An explicit-bounds histogram (or a Summary: no buckets).
    #[prost(message, tag = "7")]
    Histogram(HistogramLast),
    #[prost(message, tag = "8")]
    Exponential(ExponentialLast),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HistogramLast {
    #[prost(uint64, tag = "1")]
    pub count: u64,
    /// None when the point had none (OTLP's sum is optional).
    #[prost(double, optional, tag = "2")]
    pub sum: Option<f64>,
    /// A hash of the explicit bounds (a change is a reset or a decrease).
    #[prost(fixed64, tag = "3")]
    pub bounds: u64,
    #[prost(uint64, repeated, tag = "4")]
    pub counts: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExponentialLast {
    #[prost(uint64, tag = "1")]
    pub count: u64,
    #[prost(double, optional, tag = "2")]
    pub sum: Option<f64>,
    #[prost(sint32, tag = "3")]
    pub scale: i32,
    #[prost(uint64, tag = "4")]
    pub zero: u64,
    #[prost(sint32, tag = "5")]
    pub positive_offset: i32,
    #[prost(uint64, repeated, tag = "6")]
    pub positive: Vec<u64>,
    #[prost(sint32, tag = "7")]
    pub negative_offset: i32,
    #[prost(uint64, repeated, tag = "8")]
    pub negative: Vec<u64>,
}

/// One record of the file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    #[prost(uint64, tag = "1")]
    pub now: u64,
    #[prost(message, repeated, tag = "2")]
    pub marks: Vec<Mark>,
    /// When the state began (Unix nanoseconds): tallyd's first start with
    /// this data dir, or since the file was lost or damaged.
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    /// The newest time of a tombstone let go (Unix nanoseconds): a series
    /// unknown now that started before it may have been counted.
    #[prost(uint64, tag = "4")]
    pub horizon: u64,
}

impl Mark {
    pub fn series(&self) -> u128 {
        u128::from(self.series_hi) << 64 | u128::from(self.series_lo)
    }

    fn bytes(&self) -> u64 {
        let buckets = match &self.last {
            Some(Last::Histogram(h)) => h.counts.len(),
            Some(Last::Exponential(e)) => e.positive.len() + e.negative.len(),
            _ => 0,
        };
        SERIES_BYTES + 8 * buckets as u64
    }
}

/// The delta a cumulative point stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Number(f64),
    /// Count, sum (none when either point had none) and per-bucket
    /// counts (empty for a Summary).
    Histogram {
        count: u64,
        sum: Option<f64>,
        counts: Vec<u64>,
    },
    Exponential {
        count: u64,
        sum: Option<f64>,
        zero: u64,
        positive: (i32, Vec<u64>),
        negative: (i32, Vec<u64>),
    },
}

/// What to do with a point.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Apply the point as it is (a delta point, a gauge, or a cumulative
    /// point taken whole: the first after tallyd's start, or a reset).
    Whole,
    /// Apply this delta of a cumulative point.
    Delta(Delta),
    /// A retry, or older than the last point applied: counted, not applied.
    Retry,
    /// A cumulative point lower than the last with the same start: dropped
    /// and counted; the next delta is taken from it.
    Decrease,
    /// The first point of a cumulative series that started before tallyd:
    /// the reference for the next delta, not applied.
    Reference,
    /// A new series past the memory budget: refused.
    Full,
}

impl Verdict {
    /// Whether the series' state moves to the point.
    pub fn moves(&self) -> bool {
        !matches!(self, Verdict::Retry | Verdict::Full)
    }
}

#[derive(Debug, Default)]
struct Inner {
    series: HashMap<u128, Mark, foldhash::fast::FixedState>,
    /// Series moved since the last record written.
    dirty: Vec<u128>,
    bytes: u64,
    /// See [`Chunk::horizon`].
    horizon: u64,
}

/// The state of every OTLP series (see the module doc).
pub struct Temporality {
    path: PathBuf,
    fs: Arc<dyn Fs>,
    inner: Mutex<Inner>,
    /// Flushes a series may go without a point before it is forgotten.
    window: AtomicU64,
    /// When the state began, Unix nanoseconds (see [`Chunk::epoch`]).
    epoch: u64,
    /// Flushes counted so far (snapshots taken), from 1.
    now: AtomicU64,
    /// Bytes of the file as written (`None`: unknown, the next write
    /// rewrites it).
    log_bytes: Mutex<Option<u64>>,
}

/// The state, locked for one request: its points are judged in order,
/// each against the last one staged for its series in this request, else
/// the state's; [`Guard::commit`] applies the staged marks once the
/// request is in the WAL (dropped without it, they are forgotten).
pub struct Guard<'a> {
    inner: std::sync::MutexGuard<'a, Inner>,
    staged: HashMap<u128, Mark, foldhash::fast::FixedState>,
    staged_bytes: u64,
    epoch: u64,
    now: u64,
}

impl Guard<'_> {
    /// Judges `p` against its series' last point; `budget` is the bytes
    /// the state may grow to (a new series past it is refused).
    pub fn judge(&self, p: &Point<'_>, budget: u64) -> Verdict {
        let last = self
            .staged
            .get(&p.series)
            .or_else(|| self.inner.series.get(&p.series));
        let cumulative = p.temporality == T::Cumulative && p.kind != Kind::Sum;
        let Some(last) = last else {
            let grown = self.inner.bytes.saturating_add(self.staged_bytes);
            if grown.saturating_add(bytes_of(p)) > budget {
                return Verdict::Full;
            }
            if cumulative && p.start <= self.epoch.max(self.inner.horizon) {
                return Verdict::Reference;
            }
            return Verdict::Whole;
        };
        if p.time <= last.time || p.start < last.start {
            return Verdict::Retry;
        }
        if !cumulative || p.start > last.start {
            return Verdict::Whole;
        }
        if last.forgotten {
            // The same run of a series whose value was forgotten.
            return Verdict::Reference;
        }
        let delta = match (&last.last, p.value) {
            (Some(Last::Number(before)), Value::Number(v)) => {
                let d = v - before;
                (d >= 0.0).then_some(Delta::Number(d))
            }
            (Some(Last::Histogram(before)), _) => histogram_delta(before, p),
            (Some(Last::Exponential(before)), Value::Exponential(e)) => {
                exponential_delta(before, e)
            }
            _ => None,
        };
        delta.map_or(Verdict::Decrease, Verdict::Delta)
    }

    /// Stages the mark `p` leaves (for a verdict that [`Verdict::moves`]).
    pub fn stage(&mut self, p: &Point<'_>) {
        let m = mark(p);
        let id = m.series();
        self.staged_bytes += m.bytes();
        if let Some(old) = self.staged.insert(id, m) {
            self.staged_bytes = self.staged_bytes.saturating_sub(old.bytes());
        }
    }

    /// The staged marks, for the WAL record.
    pub fn staged(&self) -> impl Iterator<Item = &Mark> {
        self.staged.values()
    }

    /// Applies the staged marks (after the request's WAL append); returns
    /// the series remembered and their bytes after it.
    pub fn commit(mut self) -> (usize, u64) {
        let now = self.now;
        for (_, m) in std::mem::take(&mut self.staged) {
            apply(&mut self.inner, m, now);
        }
        self.size()
    }

    /// Series remembered and their estimated bytes (without the staged).
    pub fn size(&self) -> (usize, u64) {
        (self.inner.series.len(), self.inner.bytes)
    }
}

/// The bytes the state of `p`'s series takes (its buckets, if cumulative).
fn bytes_of(p: &Point<'_>) -> u64 {
    let buckets = match (p.temporality, p.value) {
        (T::Cumulative, Value::Histogram(h)) => h.bucket_counts.len(),
        (T::Cumulative, Value::Exponential(e)) => [&e.positive, &e.negative]
            .iter()
            .map(|b| b.as_ref().map_or(0, |b| b.bucket_counts.len()))
            .sum(),
        _ => 0,
    };
    SERIES_BYTES + 8 * buckets as u64
}

/// The mark a point leaves: its series, times and, if cumulative, value.
pub fn mark(p: &Point<'_>) -> Mark {
    let series = p.series;
    let cumulative = p.temporality == T::Cumulative && !matches!(p.kind, Kind::Sum | Kind::Gauge);
    let last = cumulative.then(|| match p.value {
        Value::Number(v) => Last::Number(v),
        Value::Histogram(h) => Last::Histogram(HistogramLast {
            count: h.count,
            sum: h.sum,
            bounds: bounds_hash(&h.explicit_bounds),
            counts: h.bucket_counts.clone(),
        }),
        Value::Summary(s) => Last::Histogram(HistogramLast {
            count: s.count,
            sum: Some(s.sum),
            bounds: 0,
            counts: Vec::new(),
        }),
        Value::Exponential(e) => {
            let (po, pc) = e
                .positive
                .as_ref()
                .map_or((0, Vec::new()), |b| (b.offset, b.bucket_counts.clone()));
            let (no, nc) = e
                .negative
                .as_ref()
                .map_or((0, Vec::new()), |b| (b.offset, b.bucket_counts.clone()));
            Last::Exponential(ExponentialLast {
                count: e.count,
                sum: e.sum,
                scale: e.scale,
                zero: e.zero_count,
                positive_offset: po,
                positive: pc,
                negative_offset: no,
                negative: nc,
            })
        }
    });
    Mark {
        series_hi: (series >> 64) as u64,
        series_lo: series as u64,
        start: p.start,
        time: p.time,
        seen: 0,
        last,
        forgotten: false,
    }
}

fn bounds_hash(bounds: &[f64]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    for b in bounds {
        h.write_u64(b.to_bits());
    }
    h.finish()
}

fn histogram_delta(before: &HistogramLast, p: &Point<'_>) -> Option<Delta> {
    let (count, sum, counts, bounds): (u64, Option<f64>, &[u64], u64) = match p.value {
        Value::Histogram(h) => (
            h.count,
            h.sum,
            &h.bucket_counts,
            bounds_hash(&h.explicit_bounds),
        ),
        Value::Summary(s) => (s.count, Some(s.sum), &[], 0),
        _ => return None,
    };
    if bounds != before.bounds || counts.len() != before.counts.len() {
        return None;
    }
    let count = count.checked_sub(before.count)?;
    let counts = counts
        .iter()
        .zip(&before.counts)
        .map(|(now, was)| now.checked_sub(*was))
        .collect::<Option<Vec<u64>>>()?;
    Some(Delta::Histogram {
        count,
        sum: sum.zip(before.sum).map(|(now, was)| now - was),
        counts,
    })
}

fn exponential_delta(
    before: &ExponentialLast,
    e: &crate::protocol::otlp::metrics::ExponentialHistogramDataPoint,
) -> Option<Delta> {
    if e.scale > before.scale {
        return None;
    }
    let shift = u32::try_from(before.scale.checked_sub(e.scale)?).ok()?;
    let side = |now: Option<
        &crate::protocol::otlp::metrics::exponential_histogram_data_point::Buckets,
    >,
                offset: i32,
                was: &[u64]| {
        let (o, counts) = now.map_or((0, &[][..]), |b| (b.offset, &b.bucket_counts[..]));
        let was = rescale(offset, was, shift)?;
        buckets_delta((o, counts), (was.0, &was.1))
    };
    let positive = side(
        e.positive.as_ref(),
        before.positive_offset,
        &before.positive,
    )?;
    let negative = side(
        e.negative.as_ref(),
        before.negative_offset,
        &before.negative,
    )?;
    Some(Delta::Exponential {
        count: e.count.checked_sub(before.count)?,
        sum: e.sum.zip(before.sum).map(|(now, was)| now - was),
        zero: e.zero_count.checked_sub(before.zero)?,
        positive,
        negative,
    })
}

/// Buckets `(offset, counts)` merged down by `shift` scales: index `i`
/// goes to `i >> shift` (the OpenTelemetry spec's downscaling).
fn rescale(offset: i32, counts: &[u64], shift: u32) -> Option<(i32, Vec<u64>)> {
    if shift == 0 || counts.is_empty() {
        return Some((offset, counts.to_vec()));
    }
    let shift = shift.min(31);
    let first = offset >> shift;
    let last_index = offset.checked_add(i32::try_from(counts.len()).ok()? - 1)?;
    let len = usize::try_from((last_index >> shift) - first).ok()? + 1;
    let mut out = vec![0u64; len];
    for (i, c) in counts.iter().enumerate() {
        let at = usize::try_from(((offset + i as i32) >> shift) - first).ok()?;
        out[at] = out[at].checked_add(*c)?;
    }
    Some((first, out))
}

/// `now - was`, bucket by bucket, over `now`'s range; `None` if any
/// bucket went down (or `was` has counts outside `now`'s range).
fn buckets_delta(now: (i32, &[u64]), was: (i32, &[u64])) -> Option<(i32, Vec<u64>)> {
    let (no, nc) = now;
    let (wo, wc) = was;
    let mut out = nc.to_vec();
    for (j, w) in wc.iter().enumerate() {
        if *w == 0 {
            continue;
        }
        let index = i64::from(wo) + j as i64 - i64::from(no);
        let slot = usize::try_from(index).ok().and_then(|i| out.get_mut(i))?;
        *slot = slot.checked_sub(*w)?;
    }
    Some((no, out))
}

/// Moves a series to `m` unless it already is past it.
fn apply(inner: &mut Inner, mut m: Mark, now: u64) {
    m.seen = now;
    let id = m.series();
    let grew = m.bytes();
    match inner.series.get_mut(&id) {
        Some(old) if old.time > m.time => {
            old.seen = now;
        }
        Some(old) => {
            inner.bytes = inner.bytes.saturating_sub(old.bytes()) + grew;
            *old = m;
            inner.dirty.push(id);
        }
        None => {
            inner.bytes += grew;
            inner.series.insert(id, m);
            inner.dirty.push(id);
        }
    }
}

/// What a [`Temporality::snapshot`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateWrite {
    /// A record to append.
    Append(Vec<u8>),
    /// The whole file again.
    Rewrite(Vec<u8>),
}

fn record(chunk: &Chunk) -> Vec<u8> {
    let body = chunk.encode_to_vec();
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn header() -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn damaged(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

impl Temporality {
    /// Reads `<data_dir>/otlp-series` (none: no series), cutting a torn
    /// last record off; `InvalidData` when it is damaged. `started` is
    /// this run's start, Unix nanoseconds: the state's epoch when the file
    /// has none. Nothing is forgotten until [`Temporality::set_window`].
    pub fn open(data_dir: &Path, started: u64, fs: Arc<dyn Fs>) -> io::Result<Temporality> {
        let path = data_dir.join(FILE);
        let mut inner = Inner::default();
        let mut now = 1;
        let mut log_bytes = None;
        let mut epoch = None;
        if let Some(b) = read_optional(&path)? {
            if b.get(..8) != Some(&MAGIC[..]) || b.get(8..12) != Some(&1u32.to_le_bytes()[..]) {
                return Err(damaged(&path, "not a version 1 OTLP series file"));
            }
            let mut at = HEADER;
            while at < b.len() {
                let body = b
                    .get(at..at + 8)
                    .map(|h| {
                        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                        (at + 8 + len, crc)
                    })
                    .and_then(|(end, crc)| {
                        let body = b.get(at + 8..end)?;
                        (crc32c::crc32c(body) == crc).then_some((body, end))
                    });
                let Some((body, end)) = body else {
                    // The last record, torn (it runs to or past the end), is
                    // cut off; anything else is damage.
                    let declared = b.get(at..at + 4).map_or(usize::MAX, |h| {
                        u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize
                    });
                    if at.saturating_add(8).saturating_add(declared) < b.len() {
                        return Err(damaged(&path, "a record does not check"));
                    }
                    tracing::warn!(file = %path.display(), cut = b.len() - at, "cutting a torn append off the OTLP series file");
                    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                    f.set_len(at as u64)?;
                    f.sync_all()?;
                    break;
                };
                let chunk = Chunk::decode(body).map_err(|e| damaged(&path, &e.to_string()))?;
                now = chunk.now.max(now);
                inner.horizon = inner.horizon.max(chunk.horizon);
                if epoch.is_none() && chunk.epoch > 0 {
                    epoch = Some(chunk.epoch);
                }
                for m in chunk.marks {
                    let seen = m.seen;
                    apply(&mut inner, m, seen);
                }
                at = end;
            }
            log_bytes = Some(at as u64);
            inner.dirty.clear();
        }
        Ok(Temporality {
            path,
            fs,
            inner: Mutex::new(inner),
            window: AtomicU64::new(u64::MAX),
            epoch: epoch.unwrap_or(started),
            now: AtomicU64::new(now),
            log_bytes: Mutex::new(log_bytes),
        })
    }

    /// Sets how many flushes a series may go without a point before it is
    /// forgotten (`otlp.max_staleness` over the flush interval).
    pub fn set_window(&self, flushes: u64) {
        self.window.store(flushes.max(1), Relaxed);
    }

    /// Locks the state to judge and mark one request's points.
    pub fn lock(&self) -> Guard<'_> {
        Guard {
            inner: lock(&self.inner),
            staged: HashMap::default(),
            staged_bytes: 0,
            epoch: self.epoch,
            now: self.now.load(Relaxed),
        }
    }

    /// Applies a mark found in the WAL at start (see the module doc).
    pub fn observe(&self, m: Mark) {
        let now = self.now.load(Relaxed);
        apply(&mut lock(&self.inner), m, now);
    }

    /// Series remembered, and their estimated bytes.
    pub fn size(&self) -> (usize, u64) {
        let inner = lock(&self.inner);
        (inner.series.len(), inner.bytes)
    }

    /// Counts a flush, forgets stale series, and returns what to write:
    /// a record of the series moved since the last one, or the whole file
    /// once it has doubled. Every mark in it was appended to the WAL before
    /// (a mark follows its append, under the lock).
    pub fn snapshot(&self) -> StateWrite {
        let now = self.now.fetch_add(1, Relaxed).saturating_add(1);
        let window = self.window.load(Relaxed);
        let oldest = now.saturating_sub(window);
        let gone = now.saturating_sub(window.saturating_mul(TOMBSTONE_WINDOWS));
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let (mut changed, dirty, horizon) = (false, &mut inner.dirty, &mut inner.horizon);
        // Stale series are forgotten, their start and time kept for a while
        // as tombstones; old tombstones go.
        inner.series.retain(|id, m| {
            if m.seen >= oldest {
                return true;
            }
            changed = true;
            if m.forgotten {
                if m.seen < gone {
                    *horizon = (*horizon).max(m.time);
                    return false;
                }
                return true;
            }
            m.forgotten = true;
            m.last = None;
            dirty.push(*id);
            true
        });
        if changed {
            inner.bytes = inner.series.values().map(Mark::bytes).sum();
        }
        let dirty = std::mem::take(&mut inner.dirty);
        let mut marks: Vec<Mark> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in dirty {
            if seen.insert(id)
                && let Some(m) = inner.series.get(&id)
            {
                marks.push(m.clone());
            }
        }
        let live = inner.bytes;
        let mut log = lock(&self.log_bytes);
        let (epoch, horizon) = (self.epoch, inner.horizon);
        let chunk = record(&Chunk {
            now,
            marks,
            epoch,
            horizon,
        });
        match *log {
            Some(bytes)
                if bytes.saturating_add(chunk.len() as u64) <= live.max(COMPACT_FLOOR) * 2 =>
            {
                StateWrite::Append(chunk)
            }
            _ => {
                let all = Chunk {
                    now,
                    marks: inner.series.values().cloned().collect(),
                    epoch,
                    horizon,
                };
                let mut file = header();
                file.extend_from_slice(&record(&all));
                *log = None;
                StateWrite::Rewrite(file)
            }
        }
    }

    /// Writes a [`Temporality::snapshot`] durably: an append and its sync,
    /// or an atomic rewrite. A failure makes the next write a rewrite.
    pub fn write(&self, snapshot: &StateWrite) -> io::Result<()> {
        let (bytes, rewrite) = match snapshot {
            StateWrite::Append(chunk) => (chunk, false),
            StateWrite::Rewrite(all) => (all, true),
        };
        let fs = self.fs.as_ref();
        crate::fs::write_log(fs, &self.path, bytes, rewrite, &self.log_bytes)
    }

    /// A snapshot was taken but will not be written (the WAL sync before
    /// it failed): its series go into the next write, a rewrite.
    pub fn write_failed(&self) {
        *lock(&self.log_bytes) = None;
    }
}

#[cfg(test)]
mod tests;
