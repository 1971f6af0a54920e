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
//! A block (each datagram) is also the unit of the write-ahead log: with a
//! WAL, it is appended with its generation's id before it is applied.
//!
//! Nothing here does I/O or awaits.

pub mod acc;
pub mod key;
pub mod series;
pub mod sketch;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;

use crate::protocol::batch::{BatchView, EventValue};
use crate::protocol::dogstatsd;
use crate::protocol::proto;
use crate::protocol::statsd::{self, Limits, Line, MetricType, Parsed};
use crate::telemetry::BlockStats;
use crate::wal::format::Kind;
use crate::wal::{AppendError, Wal};
use acc::Acc;
use key::KeyBuf;

/// Limits of the aggregation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateLimits {
    /// Live keys in one generation; samples for new keys beyond it are dropped.
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
    /// Rebuilt from the WAL at start without its live start (see
    /// [`interval_of`]).
    pub replayed: bool,
    /// Its start is recorded in the WAL (a [`Kind::Start`] record).
    start_recorded: std::sync::atomic::AtomicBool,
    /// Its column was taken (see [`Generation::drain`]).
    drained: bool,
}

#[derive(Debug, Default)]
struct Notes {
    events: Vec<dogstatsd::Event>,
    service_checks: Vec<dogstatsd::ServiceCheck>,
}

/// Estimated bytes of a kept event or service check beyond its text.
const NOTE_OVERHEAD: u64 = 160;

/// Estimated bytes of an event or service check parsed from `line`: its
/// text (at most the line), once more for the copies being built, and a
/// string header per tag.
fn note_cost(line: &[u8], tags: usize) -> u64 {
    (line.len() as u64)
        .saturating_mul(2)
        .saturating_add((tags as u64).saturating_mul(24))
}

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
    pub fn take_notes(&self) -> (Vec<dogstatsd::Event>, Vec<dogstatsd::ServiceCheck>) {
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

    /// Gives every key's value, once, to `each` (see [`series::Series::drain`]).
    pub fn drain(&mut self, each: impl FnMut(&[u8], Acc)) {
        self.drained = true;
        self.series.drain(self.id, each);
    }

    /// The value of `key` in this interval (its shard locked meanwhile).
    pub fn get(&self, key: &[u8]) -> Option<series::ValueRef<'_>> {
        self.series.get((self.id & 1) as usize, key)
    }
}

impl Drop for Generation {
    /// A generation dropped without its flush empties its column, which
    /// generation `id + 2` writes next.
    fn drop(&mut self) {
        if !self.drained && self.keys() > 0 {
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
    /// Where each shard's group starts in `order` (and a cursor copy).
    starts: Vec<u32>,
    next: Vec<u32>,
    /// The pending lines' buffer, kept empty between blocks (see [`relabel`]).
    pending: Vec<Pending<'static>>,
}

/// A metric line waiting for its shard, with its key hashed once.
struct Pending<'a> {
    line: Line<'a>,
    hash: u64,
    shard: u32,
    /// The key's bytes in [`Scratch::arena`].
    key: Range<usize>,
}

impl<'a> Pending<'a> {
    /// `line`, waiting under the key of (`kind`, `name`, `tags`), which is
    /// built and hashed once and kept in `scratch`'s arena.
    fn new(
        generation: &Generation,
        scratch: &mut Scratch,
        (kind, name, tags): (MetricType, &[u8], &[u8]),
        line: Line<'a>,
    ) -> Pending<'a> {
        let key = scratch.key.build(kind, name, tags);
        let hash = generation.series.hash(key);
        let start = scratch.arena.len();
        scratch.arena.extend_from_slice(key);
        Pending {
            line,
            hash,
            shard: generation.series.shard_of(hash) as u32,
            key: start..scratch.arena.len(),
        }
    }
}

/// Empties `v` and gives its buffer to lines of another block. The
/// in-place collect of a `vec::IntoIter` keeps the allocation when the
/// element layout is the same, so each worker reuses one buffer.
#[allow(clippy::unnecessary_filter_map)] // `filter` cannot change the lifetime
fn relabel<'b>(v: Vec<Pending<'_>>) -> Vec<Pending<'b>> {
    v.into_iter().filter_map(|_| None).collect()
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
    depth_reached: Notify,
    wal: Option<Arc<Wal>>,
}

impl Aggregator {
    /// An aggregator whose first interval starts at `started` (Unix time).
    pub fn new(limits: AggregateLimits, parse_limits: Limits, started: Duration) -> Aggregator {
        Aggregator::with_wal(limits, parse_limits, started, None, 1)
    }

    /// An aggregator that records every block in `wal` before applying it;
    /// its first generation is `first_id`.
    pub fn with_wal(
        limits: AggregateLimits,
        parse_limits: Limits,
        started: Duration,
        wal: Option<Arc<Wal>>,
        first_id: u64,
    ) -> Aggregator {
        let series = Arc::new(series::Series::new());
        Aggregator {
            current: RwLock::new(Arc::new(Generation::in_table(
                Arc::clone(&series),
                first_id,
                started,
            ))),
            series,
            next_id: AtomicU64::new(first_id + 1),
            limits: RwLock::new((limits, parse_limits)),
            depth_reached: Notify::new(),
            wal,
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
        Generation::in_table(Arc::clone(&self.series), id, started)
    }

    /// Keys in the series table (this interval's and the last one's).
    pub fn series_len(&self) -> usize {
        self.series.len()
    }

    /// Records `block` in the WAL (if there is one), then parses every line
    /// and applies the good ones. Malformed lines are counted by reason in
    /// `stats` and skipped. When the WAL cannot take the block, nothing is
    /// applied and the error is returned.
    pub fn ingest_block(
        &self,
        block: &[u8],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> Result<(), AppendError> {
        let generation = self.current();
        if let Some(wal) = &self.wal {
            record_start(wal, scratch.wal_stream, &generation)?;
            wal.append(scratch.wal_stream, generation.id, Kind::Statsd, block)?;
        }
        stats.blocks += 1;
        stats.bytes += block.len() as u64;
        self.apply_block(&generation, block, scratch, stats);
        Ok(())
    }

    /// Records each datagram of a batch in the WAL (a record each, as
    /// [`ingest_block`](Self::ingest_block) would), then parses and applies
    /// the recorded ones together: one shard-by-shard pass for the whole
    /// batch, so the lookups of many lines overlap their cache misses.
    ///
    /// `joined` holds the datagrams one after the other, each followed by a
    /// `\n` (so no line runs into the next datagram); `datagrams` are their
    /// ranges in it, without that `\n`, in order. A datagram the WAL
    /// refuses is not applied; its error goes to `refused`.
    pub fn ingest_datagrams(
        &self,
        joined: &[u8],
        datagrams: &[Range<usize>],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
        mut refused: impl FnMut(AppendError),
    ) {
        debug_assert!(
            datagrams.windows(2).all(|w| w[0].end < w[1].start)
                && datagrams.last().is_none_or(|d| d.end < joined.len()),
            "datagrams in order, each followed by its \\n"
        );
        let generation = self.current();
        // The start of the recorded datagrams not yet applied.
        let mut from = 0;
        for d in datagrams {
            let Some(datagram) = joined.get(d.clone()) else {
                continue;
            };
            if let Some(wal) = &self.wal
                && let Err(e) = record_start(wal, scratch.wal_stream, &generation).and_then(|()| {
                    wal.append(scratch.wal_stream, generation.id, Kind::Statsd, datagram)
                })
            {
                refused(e);
                let before = joined.get(from..d.start).unwrap_or_default();
                self.apply_block(&generation, before, scratch, stats);
                from = d.end;
                continue;
            }
            stats.blocks += 1;
            stats.bytes += datagram.len() as u64;
        }
        let rest = joined.get(from..).unwrap_or_default();
        self.apply_block(&generation, rest, scratch, stats);
    }

    /// With `wal.sync = always`, syncs what this blocking thread appended to
    /// its WAL stream (see [`Wal::settle`]); call it outside other locks.
    pub fn settle(&self, wal_stream: usize) {
        if let Some(wal) = &self.wal {
            wal.settle(wal_stream);
        }
    }

    /// Records a protobuf batch (`raw`, its encoded bytes) in the WAL, then
    /// applies its valid events. Returns the WAL ticket (0 without a WAL)
    /// and how many events were invalid and skipped.
    pub fn ingest_batch(
        &self,
        raw: &[u8],
        batch: &BatchView<'_>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> Result<(u64, u32), AppendError> {
        let generation = self.current();
        let ticket = match &self.wal {
            Some(wal) => {
                record_start(wal, scratch.wal_stream, &generation)?;
                wal.append(scratch.wal_stream, generation.id, Kind::Proto, raw)?
            }
            None => 0,
        };
        Ok((ticket, self.apply_batch(&generation, batch, scratch, stats)))
    }

    /// Applies a batch's valid events to `generation` (also WAL replay).
    /// Returns how many were invalid.
    pub fn apply_batch(
        &self,
        generation: &Generation,
        batch: &BatchView<'_>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> u32 {
        let before = stats.samples;
        let (limits, parse_limits) = self.limits();
        let mut rejected = 0;
        let mut tags = std::mem::take(&mut scratch.tags);
        let mut pending = relabel(std::mem::take(&mut scratch.pending));
        scratch.arena.clear();
        for event in batch.events() {
            stats.lines += 1;
            let line = match proto::event_line(&event, &mut tags, &parse_limits) {
                Ok(line) => line,
                Err(e) => {
                    stats.parse_errors[e.index()] += 1;
                    rejected += 1;
                    continue;
                }
            };
            // The key holds the name and tags. The line waits with its
            // values only, which borrow the batch (not the reused tags).
            let member = match event.value {
                Some(EventValue::SetMember(m)) => m,
                _ => b"",
            };
            let values = Line {
                name: b"",
                kind: line.kind,
                first: line.first,
                first_is_delta: line.first_is_delta,
                raw_values: member,
                sample_rate: line.sample_rate,
                tags: b"",
                timestamp: None,
                skipped_fields: 0,
            };
            let key = (line.kind, line.name, line.tags);
            pending.push(Pending::new(generation, scratch, key, values));
        }
        scratch.tags = tags;
        self.apply_pending(generation, &mut pending, scratch, stats, &limits);
        scratch.pending = relabel(pending);
        self.count_pending(generation, stats.samples - before, limits.max_depth);
        rejected
    }

    fn count_pending(&self, generation: &Generation, added: u64, max_depth: u64) {
        if added > 0 {
            let was = generation.pending.fetch_add(added, Relaxed);
            if was < max_depth && was + added >= max_depth {
                self.depth_reached.notify_one();
            }
        }
    }

    /// Applies a block to `generation` without logging it (WAL replay).
    pub fn apply_block(
        &self,
        generation: &Generation,
        block: &[u8],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) {
        let before = stats.samples;
        let (limits, parse_limits) = self.limits();
        let mut pending = relabel(std::mem::take(&mut scratch.pending));
        scratch.arena.clear();
        for line in statsd::lines(block) {
            stats.lines += 1;
            match statsd::parse_line(line, &parse_limits) {
                Ok(Parsed::Metric(l)) => {
                    if l.skipped_fields > 0 {
                        stats.skipped_fields += u64::from(l.skipped_fields);
                    }
                    match l.timestamp.map(|t| interval_of(t, generation, &limits)) {
                        None | Some(Interval::This) => {
                            let key = (l.kind, l.name, l.tags);
                            pending.push(Pending::new(generation, scratch, key, l));
                        }
                        Some(Interval::Other(start)) => {
                            // Another interval's map (`late`, keyed apart).
                            // The lines before it go first, so that the key
                            // limit and memory budget meet lines in order.
                            self.apply_pending(generation, &mut pending, scratch, stats, &limits);
                            self.apply_late(generation, &l, start, scratch, stats, &limits);
                        }
                        Some(Interval::OutOfWindow) => {
                            stats.dropped_timestamp += l.value_count() as u64;
                        }
                    }
                }
                Ok(Parsed::Event) => match dogstatsd::parse_event(line, &parse_limits) {
                    Ok(e) => {
                        self.apply_pending(generation, &mut pending, scratch, stats, &limits);
                        let cost = note_cost(line, e.tags.len());
                        if self.keep(generation, cost, stats, &limits, |n| n.events.push(e)) {
                            stats.events += 1;
                        }
                    }
                    Err(e) => stats.parse_errors[e.index()] += 1,
                },
                Ok(Parsed::ServiceCheck) => {
                    match dogstatsd::parse_service_check(line, &parse_limits) {
                        Ok(c) => {
                            self.apply_pending(generation, &mut pending, scratch, stats, &limits);
                            let cost = note_cost(line, c.tags.len());
                            if self.keep(generation, cost, stats, &limits, |n| {
                                n.service_checks.push(c)
                            }) {
                                stats.service_checks += 1;
                            }
                        }
                        Err(e) => stats.parse_errors[e.index()] += 1,
                    }
                }
                Err(e) => stats.parse_errors[e.index()] += 1,
            }
        }
        self.apply_pending(generation, &mut pending, scratch, stats, &limits);
        scratch.pending = relabel(pending);
        self.count_pending(generation, stats.samples - before, limits.max_depth);
    }

    /// Applies `pending` (and empties it) shard by shard: one lock per
    /// shard, and the lookups under it run back to back, so the CPU waits
    /// for several entries' cache misses at once instead of one per line.
    /// Keys not yet in the map are then made one by one in arrival order,
    /// with the key and hash already taken (a key's lines all miss
    /// together, as its shard stays locked while they are looked up).
    fn apply_pending(
        &self,
        generation: &Generation,
        pending: &mut Vec<Pending<'_>>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
        limits: &AggregateLimits,
    ) {
        if pending.is_empty() {
            return;
        }
        let series = &generation.series;
        let column = (generation.id & 1) as usize;
        // A counting sort by shard: stable, so a key's lines keep their order.
        let mut starts = std::mem::take(&mut scratch.starts);
        starts.clear();
        starts.resize(series.shard_count() + 1, 0);
        for p in pending.iter() {
            starts[p.shard as usize + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut order = std::mem::take(&mut scratch.order);
        order.clear();
        order.resize(pending.len(), 0);
        let mut next = std::mem::take(&mut scratch.next);
        next.clone_from(&starts);
        for (i, p) in pending.iter().enumerate() {
            order[next[p.shard as usize] as usize] = i as u32;
            next[p.shard as usize] += 1;
        }
        let mut missed = std::mem::take(&mut scratch.missed);
        missed.clear();
        // Bytes grown per table (timers' buckets, sets' members).
        let mut grew = [0u64; 4];
        for (shard, range) in starts.windows(2).enumerate() {
            let group = &order[range[0] as usize..range[1] as usize];
            if group.is_empty() {
                continue;
            }
            // The memory budget, as it stands before this shard's lines.
            let full = generation
                .bytes
                .load(Relaxed)
                .saturating_add(grew.iter().sum())
                >= limits.max_memory;
            let mut table = series.lock(shard);
            // Touch the group's entries first, with nothing depending on
            // the loads: their cache misses overlap, and the lookups below
            // find them in cache.
            if group.len() > 1 {
                let mut touched = 0usize;
                for &i in group {
                    touched ^= table.touch(pending[i as usize].hash, column);
                }
                std::hint::black_box(touched);
            }
            for &i in group {
                let p = &pending[i as usize];
                let key = &scratch.arena[p.key.clone()];
                // A key not yet written in this interval is admitted below.
                let Some(id) = table.find(p.hash, key) else {
                    missed.push(i);
                    continue;
                };
                match table.value(id, column, generation.id) {
                    Some(acc) => {
                        grew[row_shape(p.line.kind).0] += merge(acc, &p.line, stats, limits, full)
                    }
                    None => missed.push(i),
                }
            }
        }
        scratch.order = order;
        scratch.starts = starts;
        scratch.next = next;
        for (table, &g) in grew.iter().enumerate() {
            generation.grew(table, g);
        }
        // Keys new to this interval, in arrival order (the key limit admits
        // the first ones).
        missed.sort_unstable();
        for &i in &missed {
            let p = &pending[i as usize];
            let key = &scratch.arena[p.key.clone()];
            let full = generation.bytes.load(Relaxed) >= limits.max_memory;
            let mut table = series.lock(p.shard as usize);
            let id = table.find(p.hash, key);
            if let Some(id) = id
                && let Some(acc) = table.value(id, column, generation.id)
            {
                // Another worker (or a line before) admitted it meanwhile.
                let grew = merge(acc, &p.line, stats, limits, full);
                drop(table);
                generation.grew(row_shape(p.line.kind).0, grew);
                continue;
            }
            let Some(cost) = admit_key(generation, key.len(), &p.line, stats, limits) else {
                continue;
            };
            let id = match id {
                Some(id) => id,
                None => match table.insert(p.hash, key, series.hasher()) {
                    Some(id) => id,
                    None => {
                        drop(table);
                        unadmit(generation, key.len(), &p.line, stats);
                        continue;
                    }
                },
            };
            let mut acc = Acc::new(p.line.kind);
            let grew = merge(&mut acc, &p.line, stats, limits, full);
            *table.value(id, column, generation.id) = Some(acc);
            drop(table);
            generation.bytes.fetch_add(cost, Relaxed);
            generation.grew(row_shape(p.line.kind).0, grew);
        }
        scratch.missed = missed;
        pending.clear();
        scratch.arena.clear();
    }

    /// Keeps an event or service check of `cost` bytes of text in
    /// `generation`, within the memory budget (else it is dropped and
    /// counted). Returns whether it was kept.
    fn keep(
        &self,
        generation: &Generation,
        cost: u64,
        stats: &mut BlockStats,
        limits: &AggregateLimits,
        add: impl FnOnce(&mut Notes),
    ) -> bool {
        let cost = cost.saturating_add(NOTE_OVERHEAD);
        if generation.bytes.load(Relaxed).saturating_add(cost) > limits.max_memory {
            stats.dropped_memory += 1;
            return false;
        }
        generation.bytes.fetch_add(cost, Relaxed);
        add(&mut generation.notes.lock().unwrap_or_else(|e| e.into_inner()));
        true
    }

    /// Applies a line stamped (`|T`) for another interval, the one that
    /// starts at `start`, to `generation`'s late samples.
    fn apply_late(
        &self,
        generation: &Generation,
        line: &Line<'_>,
        start: u32,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
        limits: &AggregateLimits,
    ) {
        let key = scratch.key.build(line.kind, line.name, line.tags);
        scratch.late_key.clear();
        scratch.late_key.extend_from_slice(&start.to_le_bytes());
        scratch.late_key.extend_from_slice(key);
        let (map, key) = (&generation.late, &scratch.late_key[..]);
        let full = generation.bytes.load(Relaxed) >= limits.max_memory;
        if let Some(mut acc) = map.get_mut(key) {
            let grew = merge(&mut acc, line, stats, limits, full);
            drop(acc);
            generation.grew(row_shape(line.kind).0, grew);
            return;
        }
        let Some(cost) = admit_key(generation, key.len(), line, stats, limits) else {
            return;
        };
        let grew = match map.entry(MapKey::from_slice(key)) {
            Entry::Occupied(mut e) => {
                // Another worker created it between our lookup and now.
                unadmit(generation, key.len(), line, &mut BlockStats::default());
                merge(e.get_mut(), line, stats, limits, full)
            }
            Entry::Vacant(v) => {
                let mut acc = Acc::new(line.kind);
                let grew = merge(&mut acc, line, stats, limits, full);
                v.insert(acc);
                generation.bytes.fetch_add(cost, Relaxed);
                grew
            }
        };
        generation.grew(row_shape(line.kind).0, grew);
    }
}

/// The flushed table of a key of type `kind` (counters, gauges, timers,
/// sets) and the estimated bytes of its row beyond the key and the host.
fn row_shape(kind: MetricType) -> (usize, usize) {
    match kind {
        MetricType::Counter => (0, 36),
        MetricType::Gauge => (1, 36),
        MetricType::Timer | MetricType::Histogram | MetricType::Distribution => (2, 140),
        MetricType::Set => (3, 44),
    }
}

/// Takes a place for a new key of `key_len` bytes in `generation` and
/// returns its estimated cost in bytes; `None` (the line's values dropped
/// and counted) past the memory budget or the key limit.
fn admit_key(
    generation: &Generation,
    key_len: usize,
    line: &Line<'_>,
    stats: &mut BlockStats,
    limits: &AggregateLimits,
) -> Option<u64> {
    let cost = acc::KEY_OVERHEAD + key_len as u64 + acc::boxed_bytes(line.kind);
    if generation.bytes.load(Relaxed).saturating_add(cost) > limits.max_memory {
        stats.dropped_memory += line.value_count() as u64;
        return None;
    }
    if generation.keys.fetch_add(1, Relaxed) >= limits.max_keys {
        generation.keys.fetch_sub(1, Relaxed);
        stats.dropped_key_limit += line.value_count() as u64;
        return None;
    }
    let (table, fixed) = row_shape(line.kind);
    generation.row_counts[table].fetch_add(1, Relaxed);
    generation.row_bytes[table].fetch_add(key_len + fixed, Relaxed);
    Some(cost)
}

/// Gives back a place [`admit_key`] took, for a line that did not get it
/// after all (counted as dropped for memory in `stats`).
fn unadmit(generation: &Generation, key_len: usize, line: &Line<'_>, stats: &mut BlockStats) {
    generation.keys.fetch_sub(1, Relaxed);
    let (table, fixed) = row_shape(line.kind);
    generation.row_counts[table].fetch_sub(1, Relaxed);
    generation.row_bytes[table].fetch_sub(key_len + fixed, Relaxed);
    stats.dropped_memory += line.value_count() as u64;
}

/// Where a timestamped sample belongs.
enum Interval {
    /// The generation's own interval.
    This,
    /// Another interval, by its start (Unix seconds).
    Other(u32),
    /// Further than `timestamp_window` from the generation's start.
    OutOfWindow,
}

/// Appends `generation`'s start to the WAL before its first block, so that
/// a replay rebuilds it with the live start (its `ts` and `|T` window).
/// Nothing is written for a generation that gets no block. If the append
/// fails, the next block tries again.
fn record_start(wal: &Wal, stream: usize, generation: &Generation) -> Result<(), AppendError> {
    use std::sync::atomic::Ordering::{Acquire, Relaxed};
    if generation.start_recorded.load(Relaxed) || generation.start_recorded.swap(true, Acquire) {
        return Ok(());
    }
    let payload = crate::wal::format::encode_start(generation.started);
    wal.append(stream, generation.id, Kind::Start, &payload)
        .map(|_| ())
        .inspect_err(|_| generation.start_recorded.store(false, Relaxed))
}

/// The interval of a sample stamped `t` (Unix seconds), judged against
/// `generation`'s start. A generation rebuilt from a WAL without its start
/// (an earlier release's) has the start of the replay, so there the window
/// is not applied: a stamped sample still lands in its own interval.
fn interval_of(t: u64, generation: &Generation, limits: &AggregateLimits) -> Interval {
    let started = generation.started.as_secs();
    let window = limits.timestamp_window.as_secs();
    let outside = t.saturating_add(window) < started || t > started.saturating_add(window);
    if outside && !generation.replayed {
        return Interval::OutOfWindow;
    }
    let step = limits.interval.as_secs().max(1);
    let start = t - t % step;
    if start == started - started % step {
        return Interval::This;
    }
    u32::try_from(start).map_or(Interval::OutOfWindow, Interval::Other)
}

/// Whether two keys are equal, compared 8 bytes at a time in line: keys are
/// short, and a call to libc's `memcmp` cost more than the compare.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |s: &[u8]| u64::from_ne_bytes(s.try_into().unwrap_or([0; 8]));
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .all(|(x, y)| x == y);
    tail && a8.zip(b8).all(|(x, y)| word(x) == word(y))
}

/// Merges a line's values into its key's accumulator and returns the bytes
/// it grew by. When the generation is `full` (its memory budget spent),
/// what would grow it (timer values, new set members) is dropped and
/// counted instead; counters and gauges never grow.
fn merge(
    acc: &mut Acc,
    line: &Line<'_>,
    stats: &mut BlockStats,
    limits: &AggregateLimits,
    full: bool,
) -> u64 {
    let mut grew = 0;
    // Values whose result would not be finite (a sum past ±1.8e308) are
    // refused and counted; the key keeps what it had.
    let mut overflow = 0;
    match acc {
        Acc::Counter { sum, samples } => {
            for v in line.values() {
                let next = *sum + v.value / line.sample_rate;
                if next.is_finite() {
                    *sum = next;
                    *samples += 1;
                } else {
                    overflow += 1;
                }
            }
        }
        Acc::Gauge(g) => line.values().for_each(|v| {
            if !g.apply(v.value, v.delta) {
                overflow += 1;
            }
        }),
        Acc::Dist(_) if full => {
            stats.dropped_memory += line.value_count() as u64;
            return 0;
        }
        Acc::Dist(d) => line
            .values()
            .for_each(|v| match d.record(v.value, line.sample_rate) {
                Some(g) => grew += g,
                None => overflow += 1,
            }),
        Acc::Set(s) => {
            let max = if full {
                s.members.len()
            } else {
                limits.max_set_members
            };
            match s.insert(line.raw_values, max) {
                Some(g) => grew = g,
                None if full => {
                    stats.dropped_memory += 1;
                    return 0;
                }
                None => {
                    stats.dropped_set_members += 1;
                    return 0;
                }
            }
        }
    }
    stats.samples += line.value_count() as u64 - overflow;
    stats.dropped_overflow += overflow;
    grew
}

#[cfg(test)]
mod tests;
