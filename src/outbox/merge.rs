//! Two consecutive unsent flushes of one host folded into one coarser
//! interval, with the same totals: the spool past its budget
//! ([`crate::ledger`]) merges each new flush into the newest parked one.
//!
//! Counters and gauges, nearly every row, are merged in their RowBinary
//! bytes ([`flushes`]): a row's key columns (name, tags, host) stay in the
//! bodies and the merge keeps a hash table of borrowed slices (a 48-byte
//! entry a key) beside the two bodies and the merged one, where decoding
//! made an owned row (three strings and a vector) per row of both flushes.
//! Timers, sets, events and service checks are decoded into rows and merged
//! by [`merge`].

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::flush::Flush;
use super::rowbinary::{Bodies, RowView, each_row};
use super::rows::{Batch, CounterRow, GaugeRow, SetRow, TimerRow};

/// Merges the unsent `older` and `newer` (one host's, consecutive) into one
/// flush with `newer`'s id, generation and instance and `older`'s `ts`,
/// absorbing `older` (and what each absorbed). Errors when a body does not
/// decode.
pub fn flushes(mut older: Flush, mut newer: Flush) -> Result<Flush, String> {
    let mut absorbed = std::mem::take(&mut older.absorbed);
    absorbed.push(older.flush_id);
    absorbed.extend(&newer.absorbed);
    let (ts, id, instance) = (older.ts, newer.flush_id, newer.instance);
    let mut merged = Bodies::default();
    for (table, gauge) in [(0, false), (1, true)] {
        let (a, b) = (
            std::mem::take(&mut older.tables.bodies[table]),
            std::mem::take(&mut newer.tables.bodies[table]),
        );
        let rows = older.tables.rows[table].max(newer.tables.rows[table]);
        fold_in_place(&a, &b, gauge, rows as usize, ts, id, &mut merged)?;
        older.tables.rows[table] = 0;
        newer.tables.rows[table] = 0;
    }
    // The rest as rows (their counter and gauge bodies are empty now).
    let mut out = Flush::seal(
        merge(older.into_batch()?, newer.into_batch()?, id),
        instance,
    );
    for table in [0, 1] {
        out.tables.bodies[table] = std::mem::take(&mut merged.bodies[table]);
        out.tables.rows[table] = merged.rows[table];
    }
    out.absorbed = absorbed;
    Ok(out)
}

/// Folds the counter (`gauge` false) or gauge rows of bodies `a` (older)
/// and `b` into `out`, one row per key, as [`merge`] folds rows: counters
/// add up; a gauge keeps the value of its newest row by (`ts`, version)
/// and sums the samples. Rows get `ts`, counters `flush_id`.
fn fold_in_place(
    a: &[u8],
    b: &[u8],
    gauge: bool,
    rows: usize,
    ts: u32,
    flush_id: u64,
    out: &mut Bodies,
) -> Result<(), String> {
    type Hasher = foldhash::fast::RandomState;
    /// A key's row so far (32 bytes; with its key, a 48-byte entry).
    struct Folded {
        ts: u32,
        value: f64,
        order: u64,
        samples: u64,
    }
    let mut by_key: HashMap<&[u8], Folded, Hasher> =
        HashMap::with_capacity_and_hasher(rows, Hasher::default());
    for body in [a, b] {
        each_row(body, gauge, true, |r| match by_key.entry(r.key) {
            Entry::Vacant(e) => {
                e.insert(Folded {
                    ts: r.ts,
                    value: r.value,
                    order: r.order,
                    samples: r.samples,
                });
            }
            Entry::Occupied(mut e) => {
                let m = e.get_mut();
                m.samples = m.samples.saturating_add(r.samples);
                if !gauge {
                    m.value += r.value;
                } else if (r.ts, r.order) >= (m.ts, m.order) {
                    (m.ts, m.value, m.order) = (r.ts, r.value, r.order);
                }
            }
        })?;
    }
    out.bodies[usize::from(gauge)].reserve(a.len().max(b.len()));
    for (key, m) in by_key {
        // A gauge keeps its own version (see `merge`).
        let order = if gauge { m.order } else { flush_id };
        let (value, samples) = (m.value, m.samples);
        out.push_view(
            gauge,
            RowView {
                ts,
                key,
                value,
                order,
                samples,
            },
        );
    }
    Ok(())
}

/// Merges two consecutive flushes of one host into one coarser interval with
/// the same totals: `older`'s `ts`, the given `flush_id` (also the gauges'
/// version). Counters and set members add up; a gauge keeps its newer value;
/// timers add counts, sums and histogram buckets, and their percentiles are
/// read again from the merged buckets (within the buckets' precision).
pub fn merge(older: Batch, newer: Batch, flush_id: u64) -> Batch {
    let ts = older.ts;
    // Events and service checks are not aggregated: each keeps its row and
    // identity.
    let mut events = older.events;
    events.extend(newer.events);
    let mut service_checks = older.service_checks;
    service_checks.extend(newer.service_checks);
    let counters = fold(
        older.counters.into_iter().chain(newer.counters),
        |r| (r.name.clone(), r.tags.clone()),
        |m, r| {
            m.value += r.value;
            m.samples = m.samples.saturating_add(r.samples);
        },
    );
    let gauges = fold(
        older.gauges.into_iter().chain(newer.gauges),
        |r| (r.name.clone(), r.tags.clone()),
        |m, r| {
            // The newest value wins: by interval, then flush (a row of a
            // past interval, from a |T timestamp, has a newer flush id).
            let samples = m.samples.saturating_add(r.samples);
            if (r.ts, r.version) >= (m.ts, m.version) {
                *m = GaugeRow { samples, ..r };
            } else {
                m.samples = samples;
            }
        },
    );
    let timers = fold(
        older.timers.into_iter().chain(newer.timers),
        |r| (r.name.clone(), r.tags.clone(), r.kind.clone()),
        merge_timer,
    );
    let sets = fold(
        older.sets.into_iter().chain(newer.sets),
        |r| (r.name.clone(), r.tags.clone()),
        |m, r| {
            m.member_hashes.extend(r.member_hashes);
            m.member_hashes.sort_unstable();
            m.member_hashes.dedup();
            m.cardinality = m.member_hashes.len() as u64;
            m.samples = m.samples.saturating_add(r.samples);
        },
    );
    let mut gauge_values: HashMap<Box<[u8]>, f64> = older.gauge_values.into_iter().collect();
    gauge_values.extend(newer.gauge_values);
    Batch {
        generation: newer.generation,
        host: newer.host,
        flush_id,
        ts,
        samples: older.samples.saturating_add(newer.samples),
        counters: counters.map(|r| CounterRow { ts, flush_id, ..r }).collect(),
        // A gauge keeps its own version (the newest folded row's): a live
        // row's is its flush id, a stamped one's its interval start's, so a
        // stamped value never outranks a live one sent before it.
        gauges: gauges.map(|r| GaugeRow { ts, ..r }).collect(),
        timers: timers.map(|r| TimerRow { ts, flush_id, ..r }).collect(),
        sets: sets.map(|r| SetRow { ts, flush_id, ..r }).collect(),
        events,
        service_checks,
        gauge_values: gauge_values.into_iter().collect(),
    }
}

/// Rows with one row per `key`, later ones folded into earlier ones by `add`.
fn fold<K: std::hash::Hash + Eq, R>(
    rows: impl Iterator<Item = R>,
    key: impl Fn(&R) -> K,
    add: impl Fn(&mut R, R),
) -> impl Iterator<Item = R> {
    let mut by_key: HashMap<K, R> = HashMap::new();
    for r in rows {
        match by_key.entry(key(&r)) {
            std::collections::hash_map::Entry::Occupied(mut e) => add(e.get_mut(), r),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(r);
            }
        }
    }
    by_key.into_values()
}

fn merge_timer(m: &mut TimerRow, r: TimerRow) {
    m.count += r.count;
    m.sum += r.sum;
    m.min = m.min.min(r.min);
    m.max = m.max.max(r.max);
    m.samples = m.samples.saturating_add(r.samples);
    let mut values = Vec::with_capacity(m.bucket_values.len() + r.bucket_values.len());
    let mut counts = Vec::with_capacity(values.capacity());
    let (mut i, mut j) = (0, 0);
    let (a, b) = (
        (&m.bucket_values, &m.bucket_counts),
        (&r.bucket_values, &r.bucket_counts),
    );
    while i < a.0.len() || j < b.0.len() {
        let take_a = j >= b.0.len() || (i < a.0.len() && a.0[i] <= b.0[j]);
        let take_b = i >= a.0.len() || (j < b.0.len() && b.0[j] <= a.0[i]);
        let (v, mut c) = if take_a {
            (a.0[i], a.1.get(i).copied().unwrap_or(0.0))
        } else {
            (b.0[j], 0.0)
        };
        if take_a {
            i += 1;
        }
        if take_b {
            c += b.1.get(j).copied().unwrap_or(0.0);
            j += 1;
        }
        values.push(v);
        counts.push(c);
    }
    let at = |q: f64| {
        crate::aggregate::sketch::quantile(&values, &counts, q)
            .map_or(m.max, |v| v.clamp(m.min, m.max))
    };
    (m.p50, m.p90, m.p95, m.p99) = (at(0.50), at(0.90), at(0.95), at(0.99));
    m.bucket_values = values;
    m.bucket_counts = counts;
}

#[cfg(test)]
mod tests;
