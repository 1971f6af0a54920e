//! Aggregation: one accumulator per key and interval, in a lock-striped
//! series table ([`series`]) that keeps its keys from one interval to the
//! next.
//!
//! The [`Aggregator`] owns the *current* [`Generation`] (an interval: its
//! id, start, counts, events and late samples; its values are column
//! `id % 2` of the table). Ingest workers apply whole blocks (a TCP read, a
//! frame) through [`Aggregator::ingest_block`], and the datagrams a UDP
//! worker found queued together through [`Aggregator::ingest_datagrams`]; a
//! flush calls [`Aggregator::swap`], which installs the next generation at
//! once, so ingest never waits for a flush. The old generation is handed to
//! the flush when the last block that was applying to it is done (its `Arc`
//! is unique), and the flush drains its column.
//!
//! A block (each datagram) is also the unit of the write-ahead log, which
//! records it before it is applied: that order is
//! [`crate::ingest::record`]'s, and this module only applies.
//!
//! Nothing here does I/O or awaits.

pub mod acc;
mod admit;
mod apply;
pub mod budget;
pub mod census;
mod forwarded;
pub mod key;
pub mod mapping;
pub mod series;
pub mod sketch;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::protocol::batch::BatchView;
use crate::protocol::dogstatsd;
use crate::protocol::statsd::Limits;
use crate::telemetry::BlockStats;
use acc::Acc;
use apply::Pending;
#[cfg(test)]
use apply::{relabel, same_key};
use key::KeyBuf;

/// Limits of the aggregation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateLimits {
    /// Keys written in one generation; samples for new keys beyond it are
    /// dropped (the series table holds this generation's and the last one's).
    pub max_keys: usize,
    /// Distinct members one set keeps per interval.
    pub max_set_members: usize,
    /// Pending raw increments that trigger an early flush.
    pub max_depth: u64,
    /// Bytes one generation's keys and accumulators may take (estimated per
    /// type, see [`acc::KEY_OVERHEAD`] and [`acc::boxed_bytes`]); past it,
    /// new keys, timer values and new set members are dropped and counted.
    pub max_memory: u64,
    /// A sample whose `|T` timestamp is further than this from its
    /// interval's start is refused and counted.
    pub timestamp_window: Duration,
    /// The flush interval: a timestamped sample belongs to the interval
    /// `⌊T / interval⌋ · interval` (whole seconds, at least 1).
    pub interval: Duration,
}

/// Whether a sample stamped `t` is within `window` (`timestamp_window`)
/// of an interval that started at `started` (both Unix seconds).
pub fn within_window(t: u64, started: u64, window: Duration) -> bool {
    let window = window.as_secs();
    t.saturating_add(window) >= started && t <= started.saturating_add(window)
}

/// The start of the flush interval (`interval` long) that `t` falls in,
/// Unix seconds.
pub fn interval_start(t: u64, interval: Duration) -> u64 {
    t - t % interval.as_secs().max(1)
}

/// One interval: its id and start, its counts, events and late samples.
/// Its keys' values are column `id % 2` of its [`series::Series`].
#[derive(Debug)]
pub struct Generation {
    /// Grows by one per interval, across restarts (the WAL records it).
    pub id: u64,
    series: Arc<series::Series>,
    /// Keys written in this interval.
    keys: AtomicUsize,
    /// Rows and estimated RowBinary bytes of its rows (beyond the host), per
    /// table (counters, gauges, timers, sets), so that the flush sizes each
    /// body once.
    row_counts: [AtomicUsize; 4],
    row_bytes: [AtomicUsize; 4],
    /// Raw increments applied so far.
    pub pending: AtomicU64,
    /// Estimated bytes of its keys and accumulators.
    pub bytes: AtomicU64,
    /// When the interval started (wall clock, since the Unix epoch).
    pub started: Duration,
    /// DogStatsD events and service checks, in arrival order: kept whole,
    /// one row each (their bytes count in `bytes`).
    notes: std::sync::Mutex<Notes>,
    /// Samples whose `|T` timestamp falls in another interval, keyed by
    /// that interval's start (Unix seconds, 4 bytes LE) then the key. They
    /// count in `keys` and `bytes` like the others, and are flushed as
    /// rows of their own interval (see [`crate::outbox::rows::build`]).
    pub late: DashMap<MapKey, Acc, KeyHasher>,
    /// The key budgets it admits new keys by, and its metrics' tallies
    /// (see [`budget`]): a reload applies from the next interval.
    pub budgets: Arc<budget::Budgets>,
    metrics: DashMap<MapKey, budget::Tally, KeyHasher>,
    /// The dialects and mapping rules that make its keys (see
    /// [`mapping`]; a reload applies from the next interval).
    pub keying: Arc<mapping::Keying>,
    /// The keys mapping rules map keys of the table to (see [`mapping`]):
    /// the flush merges a key of the table that is one of them with the
    /// keys mapped to it. Empty without mapping rules.
    targets: DashMap<MapKey, (), KeyHasher>,
    /// Keys of the table a rule maps, and the key each maps to: the flush
    /// merges them there without matching the rules again.
    aliases: DashMap<MapKey, MapKey, KeyHasher>,
    /// Rebuilt from the WAL at start without its live start (see
    /// `apply::interval_of`).
    pub replayed: bool,
    /// Its start is recorded in the WAL (see [`crate::ingest::record`]).
    start_recorded: std::sync::atomic::AtomicBool,
    /// Its column was taken (see [`Generation::drain`]).
    drained: bool,
}

#[derive(Debug, Default)]
struct Notes {
    events: Vec<(dogstatsd::Event, Origin)>,
    service_checks: Vec<(dogstatsd::ServiceCheck, Origin)>,
}

/// Where a kept event or service check comes from: received here (the
/// default), or forwarded by an edge, which names its interval and, under
/// `forward.host = "keep"`, its host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The interval's start, Unix seconds.
    pub interval: Option<u32>,
    pub host: Option<String>,
}

/// Estimated bytes of a kept event or service check beyond its text.
const NOTE_OVERHEAD: u64 = 160;

/// A key of a generation's late samples: keys up to 48 bytes (most) live
/// inline in the map's entry.
pub type MapKey = smallvec::SmallVec<[u8; 48]>;

/// Keys come from the network: a seeded hash (foldhash) resists crafted
/// collisions at a fraction of SipHash's cost.
pub type KeyHasher = foldhash::fast::RandomState;

impl Generation {
    /// A generation with a series table of its own (tests, tools).
    pub fn new(id: u64, started: Duration) -> Generation {
        Generation::in_table(Arc::default(), id, started)
    }

    /// A generation whose values go to `series`.
    pub fn in_table(series: Arc<series::Series>, id: u64, started: Duration) -> Generation {
        Generation {
            id,
            series,
            keys: AtomicUsize::new(0),
            row_counts: Default::default(),
            row_bytes: Default::default(),
            pending: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started,
            notes: Default::default(),
            late: DashMap::with_hasher_and_shard_amount(KeyHasher::default(), 8),
            budgets: Arc::default(),
            metrics: DashMap::with_hasher_and_shard_amount(KeyHasher::default(), 8),
            keying: Arc::default(),
            targets: DashMap::with_hasher_and_shard_amount(KeyHasher::default(), 8),
            aliases: DashMap::with_hasher_and_shard_amount(KeyHasher::default(), 8),
            replayed: false,
            start_recorded: std::sync::atomic::AtomicBool::new(false),
            drained: false,
        }
    }

    /// Whether nothing at all was applied to it (no key, event or check).
    pub fn is_empty(&self) -> bool {
        self.keys() == 0 && {
            let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
            notes.events.is_empty() && notes.service_checks.is_empty()
        }
    }

    /// Takes the events and service checks, in arrival order.
    #[allow(clippy::type_complexity)]
    pub fn take_notes(
        &self,
    ) -> (
        Vec<(dogstatsd::Event, Origin)>,
        Vec<(dogstatsd::ServiceCheck, Origin)>,
    ) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        let notes = std::mem::take(&mut *notes);
        (notes.events, notes.service_checks)
    }

    /// Keys written in this interval.
    pub fn keys(&self) -> usize {
        self.keys.load(Relaxed)
    }

    /// Rows and estimated RowBinary bytes of the rows beyond the host, per
    /// table (counters, gauges, timers, sets).
    pub fn row_sizes(&self) -> [(usize, usize); 4] {
        std::array::from_fn(|t| {
            (
                self.row_counts[t].load(Relaxed),
                self.row_bytes[t].load(Relaxed),
            )
        })
    }

    /// Counts `bytes` more of an accumulator of `table` (a timer's buckets,
    /// a set's members): in the memory budget, and in the estimate of its
    /// table's rows (a bucket or a member costs a row about what it costs
    /// the accumulator).
    fn grew(&self, table: usize, bytes: u64) {
        if bytes > 0 {
            self.bytes.fetch_add(bytes, Relaxed);
            self.row_bytes[table].fetch_add(bytes as usize, Relaxed);
        }
    }

    /// Claims the recording of this generation's start in the WAL: true
    /// for the one caller that must record it now.
    pub fn claim_start_record(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        !self.start_recorded.load(Relaxed) && !self.start_recorded.swap(true, Acquire)
    }

    /// Gives the claim back after a failed append: the next block tries.
    pub fn unclaim_start_record(&self) {
        self.start_recorded.store(false, Relaxed);
    }

    /// Gives every key's value, once, to `each` (see [`series::Series::drain`]).
    pub fn drain(&mut self, each: impl FnMut(&[u8], Acc)) {
        self.series.drain(self.id, each);
        self.drained = true;
    }

    /// The value of `key` in this interval (its shard locked meanwhile).
    pub fn get(&self, key: &[u8]) -> Option<series::ValueRef<'_>> {
        self.series.get((self.id & 1) as usize, key)
    }
}

impl Drop for Generation {
    /// A generation dropped without its flush (an empty one, or one given
    /// up) empties its column, which generation `id + 2` writes next, and
    /// ages the table's idle keys out as a flush would.
    fn drop(&mut self) {
        if !self.drained {
            self.series.drain(self.id, |_, _| {});
        }
    }
}

/// Per-worker scratch space, reused for every block.
#[derive(Default)]
pub struct Scratch {
    key: KeyBuf,
    /// A late sample's key: its interval start (4 bytes, LE), then the key.
    late_key: Vec<u8>,
    /// Tags of a protobuf event, as `k:v,...`.
    tags: Vec<u8>,
    /// The WAL stream this worker appends to.
    pub wal_stream: usize,
    /// The keys of a block's pending lines, end to end.
    arena: Vec<u8>,
    /// Pending lines (their indexes) grouped by shard, arrival order kept.
    order: Vec<u32>,
    /// Pending lines whose key was not in the map yet.
    missed: Vec<u32>,
    /// A shard group's index entries (slot id, key offset), for its touch
    /// pass.
    candidates: Vec<(u32, u32)>,
    /// Where each shard's group starts in `order` (and a cursor copy).
    starts: Vec<u32>,
    next: Vec<u32>,
    /// The pending lines' buffer, kept empty between blocks (see [`relabel`]).
    pending: Vec<Pending<'static>>,
    /// Overflow and mapped keys' scratch space.
    fold: budget::Fold,
}

impl Scratch {
    pub fn for_stream(wal_stream: usize) -> Scratch {
        Scratch {
            wal_stream,
            ..Scratch::default()
        }
    }
}

pub struct Aggregator {
    series: Arc<series::Series>,
    current: RwLock<Arc<Generation>>,
    next_id: AtomicU64,
    /// Read once per block; replaced by a config reload.
    limits: RwLock<(AggregateLimits, Limits)>,
    /// Each new generation's key budgets and keying; replaced by a config
    /// reload.
    budgets: RwLock<Arc<budget::Budgets>>,
    keying: RwLock<Arc<mapping::Keying>>,
    depth_reached: Notify,
}

impl Aggregator {
    /// An aggregator whose first interval starts at `started` (Unix time).
    pub fn new(limits: AggregateLimits, parse_limits: Limits, started: Duration) -> Aggregator {
        let policy = (Arc::default(), Arc::default());
        Aggregator::starting_at(limits, parse_limits, policy, started, 1)
    }

    /// An aggregator whose first generation is `first_id` (the WAL's next).
    pub fn starting_at(
        limits: AggregateLimits,
        parse_limits: Limits,
        (budgets, keying): (Arc<budget::Budgets>, Arc<mapping::Keying>),
        started: Duration,
        first_id: u64,
    ) -> Aggregator {
        let series = Arc::new(series::Series::new());
        let mut first = Generation::in_table(Arc::clone(&series), first_id, started);
        first.budgets = Arc::clone(&budgets);
        first.keying = Arc::clone(&keying);
        Aggregator {
            current: RwLock::new(Arc::new(first)),
            series,
            next_id: AtomicU64::new(first_id + 1),
            limits: RwLock::new((limits, parse_limits)),
            budgets: RwLock::new(budgets),
            keying: RwLock::new(keying),
            depth_reached: Notify::new(),
        }
    }

    /// The limits in force: (aggregation, per line).
    pub fn limits(&self) -> (AggregateLimits, Limits) {
        *self.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits (a config reload), for every block from now on. A lower
    /// key limit does not evict keys already live in this interval.
    pub fn set_limits(&self, limits: AggregateLimits, parse_limits: Limits) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = (limits, parse_limits);
    }

    /// New key budgets (a config reload), from the next interval on.
    pub fn set_budgets(&self, budgets: Arc<budget::Budgets>) {
        *self.budgets.write().unwrap_or_else(|e| e.into_inner()) = budgets;
    }

    /// New dialects and mapping rules (a config reload), from the next
    /// interval on.
    pub fn set_keying(&self, keying: Arc<mapping::Keying>) {
        *self.keying.write().unwrap_or_else(|e| e.into_inner()) = keying;
    }

    /// The dialects and mapping rules new intervals get.
    pub fn keying(&self) -> Arc<mapping::Keying> {
        Arc::clone(&self.keying.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves when `max_depth` raw increments are pending in the current
    /// generation (a permit is kept if nobody is waiting yet).
    pub async fn depth_reached(&self) {
        self.depth_reached.notified().await
    }

    /// The current generation (held for the length of one block, or one
    /// batch of datagrams, at most).
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Installs a fresh generation that started at `now` and returns the old
    /// one. Blocks still applying to the old one may hold it for a moment.
    pub fn swap(&self, now: Duration) -> Arc<Generation> {
        let fresh = Arc::new(self.generation(self.next_id.fetch_add(1, Relaxed), now));
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *cur, fresh)
    }

    /// A generation `id` that started at `started`, in this aggregator's
    /// series table (a replayed interval's keys stay for the live ones).
    pub fn generation(&self, id: u64, started: Duration) -> Generation {
        let mut g = Generation::in_table(Arc::clone(&self.series), id, started);
        g.budgets = Arc::clone(&self.budgets.read().unwrap_or_else(|e| e.into_inner()));
        g.keying = self.keying();
        g
    }

    /// Every live key counted per metric (one scan of the series table;
    /// see [`census`]), with the open interval's samples.
    pub fn census(&self) -> census::Census {
        let current = self.current();
        let column = (current.id & 1) as usize;
        let started = current.started;
        drop(current);
        let mut tally = census::Tally::default();
        self.series.scan(column, |key, value| tally.add(key, value));
        let open = crate::clock::wall_clock().saturating_sub(started);
        tally.finish(open.as_secs_f64())
    }

    /// Keys in the series table (this interval's and the last one's).
    pub fn series_len(&self) -> usize {
        self.series.len()
    }

    /// Parses every line of `block` and applies the good ones to the
    /// current generation (malformed lines are counted by reason in `stats`
    /// and skipped). The WAL's order is [`crate::ingest::record`]'s.
    pub fn ingest_block(&self, block: &[u8], scratch: &mut Scratch, stats: &mut BlockStats) {
        stats.blocks += 1;
        stats.bytes += block.len() as u64;
        self.apply_block(&self.current(), block, scratch, stats);
    }

    /// Applies the datagrams of a batch together: one shard-by-shard pass
    /// for the whole batch, so the lookups of many lines overlap their
    /// cache misses.
    ///
    /// `joined` holds the datagrams one after the other, each followed by a
    /// `\n` (so no line runs into the next datagram); `datagrams` are their
    /// ranges in it, without that `\n`, in order.
    pub fn ingest_datagrams(
        &self,
        joined: &[u8],
        datagrams: &[Range<usize>],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) {
        debug_assert!(
            datagrams.windows(2).all(|w| w[0].end < w[1].start)
                && datagrams.last().is_none_or(|d| d.end < joined.len()),
            "datagrams in order, each followed by its \\n"
        );
        for d in datagrams {
            stats.blocks += 1;
            stats.bytes += d.len() as u64;
        }
        self.apply_block(&self.current(), joined, scratch, stats);
    }

    /// Applies a protobuf batch's valid events to the current generation;
    /// returns how many were invalid and skipped.
    pub fn ingest_batch(
        &self,
        batch: &BatchView<'_>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> u32 {
        self.apply_batch(&self.current(), batch, scratch, stats)
    }
}

#[cfg(test)]
mod tests;
