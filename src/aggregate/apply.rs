//! The striped apply: a block's metric lines, hashed once and grouped by
//! shard, applied to a generation's column of the series table one shard
//! lock at a time, keys new to the interval admitted in arrival order
//! ([`super::admit`]), and the merge of a line's values into an
//! accumulator.

use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;

use super::acc::Acc;
use super::admit::{Admit, merge_key, merge_late, row_shape};
use super::{AggregateLimits, Aggregator, Generation, NOTE_OVERHEAD, Notes, Scratch};
use crate::protocol::batch::{BatchView, EventValue};
use crate::protocol::dogstatsd;
use crate::protocol::proto;
use crate::protocol::statsd::{self, Line, MetricType, Parsed};
use crate::telemetry::BlockStats;

/// A metric line waiting for its shard, with its key hashed once.
pub(super) struct Pending<'a> {
    line: Line<'a>,
    hash: u64,
    shard: u32,
    /// The key's bytes in [`Scratch::arena`].
    key: Range<usize>,
}

impl<'a> Pending<'a> {
    /// `line`, waiting under its key: `arena`'s bytes from `start` on,
    /// hashed once.
    fn new(generation: &Generation, arena: &[u8], start: usize, line: Line<'a>) -> Self {
        let key = start..arena.len();
        let hash = generation.series.hash(&arena[key.clone()]);
        Pending {
            line,
            hash,
            shard: generation.series.shard_of(hash) as u32,
            key,
        }
    }
}

/// Empties `v` and gives its buffer to lines of another block. The
/// in-place collect of a `vec::IntoIter` keeps the allocation when the
/// element layout is the same, so each worker reuses one buffer.
#[allow(clippy::unnecessary_filter_map)] // `filter` cannot change the lifetime
pub(super) fn relabel<'b>(v: Vec<Pending<'_>>) -> Vec<Pending<'b>> {
    v.into_iter().filter_map(|_| None).collect()
}

/// Estimated bytes of an event or service check of `text` bytes of text
/// (at most its line) and `tags` tags: the text, once more for the copies
/// being built, and a string header per tag.
pub(super) fn note_cost(text: usize, tags: usize) -> u64 {
    (text as u64)
        .saturating_mul(2)
        .saturating_add((tags as u64).saturating_mul(24))
}

impl Aggregator {
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
            if event.value.as_ref().is_some_and(super::forwarded::is_state) {
                // An edge's state (see `forwarded`): the lines before it go
                // first, so that the key limit meets events in order.
                self.apply_pending(generation, &mut pending, scratch, stats, &limits);
                let host = batch.host.as_bytes();
                let limits = (&limits, &parse_limits);
                if let Err(e) =
                    self.apply_state(generation, &event, host, &mut tags, scratch, stats, limits)
                {
                    stats.parse_errors[e.index()] += 1;
                    rejected += 1;
                }
                continue;
            }
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
                name_tags: None,
                timestamp: None,
                skipped_fields: 0,
            };
            let start = scratch.arena.len();
            scratch
                .key
                .append(line.kind, line.name, line.tags, &mut scratch.arena);
            pending.push(Pending::new(generation, &scratch.arena, start, values));
        }
        scratch.tags = tags;
        self.apply_pending(generation, &mut pending, scratch, stats, &limits);
        scratch.pending = relabel(pending);
        if batch.notes > 0 {
            rejected += self.apply_notes(generation, batch, stats, &limits);
        }
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
        let (limits, mut parse_limits) = self.limits();
        // The interval's own dialects: a reload changes them at the next.
        parse_limits.dialects = generation.keying.dialects;
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
                            let start = scratch.arena.len();
                            scratch.key.append_line(&l, &mut scratch.arena);
                            pending.push(Pending::new(generation, &scratch.arena, start, l));
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
                        let cost = note_cost(line.len(), e.tags.len());
                        if self.keep(generation, cost, stats, &limits, |n| {
                            n.events.push((e, Default::default()))
                        }) {
                            stats.events += 1;
                        }
                    }
                    Err(e) => stats.parse_errors[e.index()] += 1,
                },
                Ok(Parsed::ServiceCheck) => {
                    match dogstatsd::parse_service_check(line, &parse_limits) {
                        Ok(c) => {
                            self.apply_pending(generation, &mut pending, scratch, stats, &limits);
                            let cost = note_cost(line.len(), c.tags.len());
                            if self.keep(generation, cost, stats, &limits, |n| {
                                n.service_checks.push((c, Default::default()))
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
        let mut candidates = std::mem::take(&mut scratch.candidates);
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
            // the loads, so that their cache misses overlap and the lookups
            // below find them in cache: the index entries in one pass, the
            // slots and keys they name in another, and the boxed
            // accumulators of timers and sets in a third.
            if group.len() > 1 {
                candidates.clear();
                candidates.extend(
                    group
                        .iter()
                        .filter_map(|&i| table.candidate(pending[i as usize].hash)),
                );
                let mut touched = 0usize;
                for &c in &candidates {
                    touched ^= table.touch(c, column);
                }
                for &c in &candidates {
                    touched ^= table.touch_boxed(c, column);
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
                match table.value(id, column) {
                    Some(acc) => {
                        grew[row_shape(p.line.kind).0] += merge(acc, &p.line, stats, limits, full)
                    }
                    None => missed.push(i),
                }
            }
        }
        scratch.order = order;
        scratch.candidates = candidates;
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
            let fold = Admit::Line(&mut scratch.fold);
            let grew = merge_key(
                generation,
                key,
                p.hash,
                shape_of(&p.line),
                fold,
                stats,
                limits,
                |acc, stats| merge(acc, &p.line, stats, limits, full),
            );
            generation.grew(row_shape(p.line.kind).0, grew);
        }
        scratch.missed = missed;
        pending.clear();
        scratch.arena.clear();
    }

    /// Keeps an event or service check of `cost` bytes of text in
    /// `generation`, within the memory budget (else it is dropped and
    /// counted). Returns whether it was kept.
    pub(super) fn keep(
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
        let key = scratch.key.build_line(line);
        scratch.late_key.clear();
        scratch.late_key.extend_from_slice(&start.to_le_bytes());
        scratch.late_key.extend_from_slice(key);
        let full = generation.bytes.load(Relaxed) >= limits.max_memory;
        let grew = merge_late(
            generation,
            &scratch.late_key,
            shape_of(line),
            Admit::Line(&mut scratch.fold),
            stats,
            limits,
            |acc, stats| merge(acc, line, stats, limits, full),
        );
        generation.grew(row_shape(line.kind).0, grew);
    }
}

/// A line's type and how many values it carries (what a dropped line
/// counts for).
fn shape_of(line: &Line<'_>) -> (MetricType, u64) {
    (line.kind, line.value_count() as u64)
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

/// The interval of a sample stamped `t` (Unix seconds), judged against
/// `generation`'s start. A generation rebuilt from a WAL without its start
/// (an earlier release's) has the start of the replay, so there the window
/// is not applied: a stamped sample still lands in its own interval.
fn interval_of(t: u64, generation: &Generation, limits: &AggregateLimits) -> Interval {
    let started = generation.started.as_secs();
    if !super::within_window(t, started, limits.timestamp_window) && !generation.replayed {
        return Interval::OutOfWindow;
    }
    let start = super::interval_start(t, limits.interval);
    if start == super::interval_start(started, limits.interval) {
        return Interval::This;
    }
    u32::try_from(start).map_or(Interval::OutOfWindow, Interval::Other)
}

/// Whether two keys are equal, compared 8 bytes at a time in line: keys are
/// short, and a call to libc's `memcmp` cost more than the compare.
pub(super) fn same_key(a: &[u8], b: &[u8]) -> bool {
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
            // Most lines have no sample rate: no division for them.
            let rate = line.sample_rate;
            for v in line.values() {
                let next = *sum + if rate == 1.0 { v.value } else { v.value / rate };
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
