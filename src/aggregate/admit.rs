//! Admission of a key new to an interval: mapping rules, the budget of
//! its metric (folding into the overflow key past it), the key limit and
//! the memory budget, for keys of the interval's own column
//! ([`merge_key`]) and for late samples of other intervals
//! ([`merge_late`]), and the row counts the flush sizes its bodies from.

use std::sync::atomic::Ordering::Relaxed;

use dashmap::mapref::entry::Entry;

use super::acc::{self, Acc};
use super::budget::{self, Fold};
use super::mapping::Mapped;
use super::{AggregateLimits, Generation, MapKey};
use crate::protocol::statsd::MetricType;
use crate::telemetry::BlockStats;

/// The flushed table of a key of type `kind` (counters, gauges, timers,
/// sets) and the estimated bytes of its row beyond the key and the host.
pub(super) fn row_shape(kind: MetricType) -> (usize, usize) {
    match kind {
        MetricType::Counter => (0, 36),
        MetricType::Gauge => (1, 36),
        MetricType::Timer | MetricType::Histogram | MetricType::Distribution => (2, 140),
        MetricType::Set => (3, 44),
    }
}

/// How a key new to the interval is admitted (see [`merge_key`]).
pub(super) enum Admit<'f> {
    /// A line's key: mapped by the interval's rules (see
    /// [`super::mapping`]), then within its metric's budget.
    Line(&'f mut Fold),
    /// An edge's state (the edge mapped it): within its metric's budget.
    State(&'f mut Fold),
    /// A key that is final already (an overflow key).
    Final,
}

impl<'f> Admit<'f> {
    /// The scratch space and whether the interval's rules map `key`;
    /// `None` for a final key. An edge's overflow key is final here too:
    /// it takes no place in the budget that its edge's other keys fill.
    fn split(self, key: &[u8]) -> Option<(&'f mut Fold, bool)> {
        match self {
            Admit::Line(fold) => Some((fold, true)),
            Admit::State(_) if budget::is_overflow(key) => None,
            Admit::State(fold) => Some((fold, false)),
            Admit::Final => None,
        }
    }
}

/// Whether `generation` has room for a new key: neither its key limit nor
/// its memory budget is spent.
fn room(generation: &Generation, limits: &AggregateLimits) -> bool {
    generation.keys() < limits.max_keys && generation.bytes.load(Relaxed) < limits.max_memory
}

/// Maps a line's `key` by `generation`'s rules into `fold`'s buffer:
/// whether a rule changed it, or `None` when one drops it (its `values`
/// counted).
fn map_line(
    generation: &Generation,
    key: &[u8],
    fold: &mut Fold,
    values: u64,
    stats: &mut BlockStats,
) -> Option<bool> {
    let rules = &generation.keying.rules;
    if rules.is_empty() {
        return Some(false);
    }
    match rules.map(key, &mut fold.map) {
        Mapped::Dropped(_) => {
            stats.dropped_mapping += values;
            None
        }
        Mapped::Changed(_) => Some(true),
        Mapped::Unchanged => Some(false),
    }
}

/// Merges into `key`'s value in `generation`'s column of the series table
/// with `merge`, and returns the bytes the accumulator grew by.
///
/// A key new to the interval is admitted as `admit` says: a line's key a
/// rule drops is dropped and counted; one it maps stays in the table under
/// its own key (so that its next lines find it), counted in the budget of
/// the metric it maps to, and recorded as an alias of that key, which the
/// flush merges it into ([`crate::outbox::rows::build`]). Past that
/// metric's budget (see [`super::budget`]) it folds into the overflow key,
/// which is final, as an edge's overflow key is. The key limit and the
/// memory budget come last (values of `shape` dropped and counted past
/// them; a metric is not tallied once they are spent).
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_key(
    generation: &Generation,
    key: &[u8],
    hash: u64,
    shape: (MetricType, u64),
    admit: Admit<'_>,
    stats: &mut BlockStats,
    limits: &AggregateLimits,
    mut merge: impl FnMut(&mut Acc, &mut BlockStats) -> u64,
) -> u64 {
    let series = &generation.series;
    let column = (generation.id & 1) as usize;
    let mut table = series.lock(series.shard_of(hash));
    let id = table.find(hash, key);
    if let Some(id) = id
        && let Some(acc) = table.value(id, column)
    {
        return merge(acc, stats);
    }
    let fold = admit.split(key);
    let overflow = fold.is_none();
    // Whether this key took a place in its metric's budget (the metric
    // of the key a rule maps it to, when one does), and that key.
    let mut taken = false;
    let mut mapped_to: Option<MapKey> = None;
    if let Some((fold, map)) = fold {
        let mapped = if map {
            match map_line(generation, key, fold, shape.1, stats) {
                Some(mapped) => mapped,
                None => return 0,
            }
        } else {
            false
        };
        let target = if mapped { fold.map.key() } else { key };
        // Another key that maps to the same one took its place already.
        let counted = mapped && generation.targets.contains_key(target);
        if !counted && budget::counts(target) {
            if !budget::admit(generation, target, shape.1, room(generation, limits)) {
                drop(table);
                let over = fold.key(generation, (!mapped).then_some(key));
                let hash = series.hash(over);
                return merge_key(
                    generation,
                    over,
                    hash,
                    shape,
                    Admit::Final,
                    stats,
                    limits,
                    merge,
                );
            }
            taken = true;
        }
        if mapped {
            mapped_to = Some(MapKey::from_slice(target));
        }
    }
    let release = || {
        if taken {
            budget::release(generation, mapped_to.as_deref().unwrap_or(key));
        }
    };
    let Some(cost) = admit_key(generation, key.len(), shape, stats, limits) else {
        release();
        return 0;
    };
    let Some(id) = id.or_else(|| table.insert(hash, key, series.hasher())) else {
        drop(table);
        unadmit(generation, key.len(), shape, stats);
        release();
        return 0;
    };
    let mut acc = Acc::new(shape.0);
    let grew = merge(&mut acc, stats);
    table.put(id, column, generation.id, acc);
    drop(table);
    generation.bytes.fetch_add(cost, Relaxed);
    if overflow {
        budget::count_overflow_key(generation, key);
    }
    if let Some(to) = mapped_to {
        // The flush merges it into the key it maps to (see `Generation`).
        let cost = 2 * acc::KEY_OVERHEAD + (key.len() + to.len()) as u64;
        generation.bytes.fetch_add(cost, Relaxed);
        generation.targets.insert(to.clone(), ());
        generation.aliases.insert(MapKey::from_slice(key), to);
    }
    grew
}

/// Merges into `generation`'s late samples under `late_key` (its interval
/// start, 4 bytes LE, then the key) with `merge`, a new key admitted as
/// [`merge_key`] admits one, except that a mapped key is not kept under
/// its own key: its values go to the key it maps to (late samples are
/// few, so each of its lines is mapped). Returns the bytes the accumulator
/// grew by. `|T` lines and an edge's states of other intervals both land
/// here.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_late(
    generation: &Generation,
    late_key: &[u8],
    shape: (MetricType, u64),
    admit: Admit<'_>,
    stats: &mut BlockStats,
    limits: &AggregateLimits,
    mut merge: impl FnMut(&mut Acc, &mut BlockStats) -> u64,
) -> u64 {
    let map = &generation.late;
    if let Some(mut acc) = map.get_mut(late_key) {
        return merge(&mut acc, stats);
    }
    let (start, key) = late_key.split_at(4.min(late_key.len()));
    let fold = admit.split(key);
    let overflow = fold.is_none();
    let taken = fold.is_some() && budget::counts(key);
    if let Some((fold, map)) = fold {
        if map {
            match map_line(generation, key, fold, shape.1, stats) {
                None => return 0,
                Some(true) => {
                    // Its values go to the key it maps to, admitted there.
                    let mapped = fold.late_key(generation, start, None, false);
                    let admit = Admit::State(&mut Fold::default());
                    return merge_late(generation, mapped, shape, admit, stats, limits, merge);
                }
                Some(false) => {}
            }
        }
        if taken && !budget::admit(generation, key, shape.1, room(generation, limits)) {
            let over = fold.late_key(generation, start, Some(key), true);
            return merge_late(generation, over, shape, Admit::Final, stats, limits, merge);
        }
    }
    let release = || {
        if taken {
            budget::release(generation, key);
        }
    };
    let Some(cost) = admit_key(generation, late_key.len(), shape, stats, limits) else {
        release();
        return 0;
    };
    match map.entry(MapKey::from_slice(late_key)) {
        Entry::Occupied(mut e) => {
            // Another worker made it between the lookup and now.
            unadmit(
                generation,
                late_key.len(),
                shape,
                &mut BlockStats::default(),
            );
            release();
            merge(e.get_mut(), stats)
        }
        Entry::Vacant(v) => {
            let mut acc = Acc::new(shape.0);
            let grew = merge(&mut acc, stats);
            v.insert(acc);
            generation.bytes.fetch_add(cost, Relaxed);
            if overflow {
                budget::count_overflow_key(generation, key);
            }
            grew
        }
    }
}

/// Takes a place for a new key of `key_len` bytes in `generation` for
/// `values` values of type `kind`, and returns its estimated cost in bytes;
/// `None` (the values dropped and counted) past the memory budget or the
/// key limit.
pub(super) fn admit_key(
    generation: &Generation,
    key_len: usize,
    (kind, values): (MetricType, u64),
    stats: &mut BlockStats,
    limits: &AggregateLimits,
) -> Option<u64> {
    let cost = acc::KEY_OVERHEAD + key_len as u64 + acc::boxed_bytes(kind);
    if generation.bytes.load(Relaxed).saturating_add(cost) > limits.max_memory {
        stats.dropped_memory += values;
        return None;
    }
    if generation.keys.fetch_add(1, Relaxed) >= limits.max_keys {
        generation.keys.fetch_sub(1, Relaxed);
        stats.dropped_key_limit += values;
        return None;
    }
    let (table, fixed) = row_shape(kind);
    generation.row_counts[table].fetch_add(1, Relaxed);
    generation.row_bytes[table].fetch_add(key_len + fixed, Relaxed);
    Some(cost)
}

/// Gives back a place [`admit_key`] took, for values that did not get it
/// after all (counted as dropped for memory in `stats`).
pub(super) fn unadmit(
    generation: &Generation,
    key_len: usize,
    (kind, values): (MetricType, u64),
    stats: &mut BlockStats,
) {
    generation.keys.fetch_sub(1, Relaxed);
    let (table, fixed) = row_shape(kind);
    generation.row_counts[table].fetch_sub(1, Relaxed);
    generation.row_bytes[table].fetch_sub(key_len + fixed, Relaxed);
    stats.dropped_memory += values;
}
