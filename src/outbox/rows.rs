//! Rows: a closed generation encoded as one RowBinary row per key, per
//! table ([`build`]), and the row structs that spooled flushes are decoded
//! into to be merged ([`super::merge`]).

use super::flush::Flush;
use super::gauges::GaugeMemory;
use super::rowbinary::{Bodies, Head, Tags, TimerColumns};
use crate::aggregate::acc::{Acc, Summary};
use crate::aggregate::key;
use crate::aggregate::{Generation, MapKey};

#[derive(Debug, Clone, PartialEq)]
pub struct CounterRow {
    pub ts: u32,
    pub name: String,
    pub tags: Vec<String>,
    pub host: String,
    pub flush_id: u64,
    pub value: f64,
    pub samples: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GaugeRow {
    pub ts: u32,
    pub name: String,
    pub tags: Vec<String>,
    pub host: String,
    pub value: f64,
    pub version: u64,
    pub samples: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TimerRow {
    pub ts: u32,
    pub name: String,
    pub tags: Vec<String>,
    pub host: String,
    pub flush_id: u64,
    pub kind: String,
    /// Values weighted by `1 / sample rate`.
    pub count: f64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub samples: u64,
    pub bucket_values: Vec<f64>,
    pub bucket_counts: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetRow {
    pub ts: u32,
    pub name: String,
    pub tags: Vec<String>,
    pub host: String,
    pub flush_id: u64,
    pub cardinality: u64,
    pub samples: u64,
    pub member_hashes: Vec<u64>,
}

/// A DogStatsD event, one row each (not aggregated). `ts`, `host`,
/// `flush_id` and `seq` (its place in the flush) identify it, so a re-sent
/// flush collapses like any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub ts: u32,
    pub host: String,
    pub flush_id: u64,
    pub seq: u32,
    /// The event's own time (`d:`), else the interval's start.
    pub event_ts: u32,
    pub title: String,
    pub text: String,
    pub hostname: String,
    pub aggregation_key: String,
    pub priority: String,
    pub source_type: String,
    pub alert_type: String,
    pub tags: Vec<String>,
}

/// A DogStatsD service check, one row each; identified as [`EventRow`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCheckRow {
    pub ts: u32,
    pub host: String,
    pub flush_id: u64,
    pub seq: u32,
    pub check_ts: u32,
    pub name: String,
    pub status: u8,
    pub hostname: String,
    pub tags: Vec<String>,
    pub message: String,
}

/// The rows of one flush: one per key, split by table.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    /// The generation (interval) the rows come from.
    pub generation: u64,
    pub host: String,
    pub flush_id: u64,
    /// Start of the interval, Unix seconds.
    pub ts: u32,
    pub counters: Vec<CounterRow>,
    pub gauges: Vec<GaugeRow>,
    pub timers: Vec<TimerRow>,
    pub sets: Vec<SetRow>,
    pub events: Vec<EventRow>,
    pub service_checks: Vec<ServiceCheckRow>,
    /// Raw increments the batch compacts.
    pub samples: u64,
    /// (key, value) of every gauge row: the gauge memory after this flush.
    pub gauge_values: Vec<(Box<[u8]>, f64)>,
}

impl Batch {
    /// `ts` and every distinct `ts` of the rows, ascending.
    pub fn intervals(&self) -> Vec<u32> {
        let mut out: Vec<u32> = std::iter::once(self.ts)
            .chain(self.counters.iter().map(|r| r.ts))
            .chain(self.gauges.iter().map(|r| r.ts))
            .chain(self.timers.iter().map(|r| r.ts))
            .chain(self.sets.iter().map(|r| r.ts))
            .chain(self.events.iter().map(|r| r.ts))
            .chain(self.service_checks.iter().map(|r| r.ts))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn rows(&self) -> usize {
        self.counters.len()
            + self.gauges.len()
            + self.timers.len()
            + self.sets.len()
            + self.events.len()
            + self.service_checks.len()
    }
}

/// Turns a closed generation into its flush (step 3 of the durable order):
/// one row per key, encoded as RowBinary straight from the accumulators, so
/// no row struct or owned string is made per counter or gauge (timers and
/// sets go through a row struct for their vectors). The bodies are written
/// into `spare`'s buffers ([`Bodies::recycle`]: the previous flush's, or
/// `Bodies::default()`). Returns the flush and how many gauges could not
/// be remembered.
#[allow(clippy::too_many_arguments)]
pub fn build(
    mut generation: Generation,
    flush_id: u64,
    host: &str,
    instance: u64,
    gauges: &mut GaugeMemory,
    next_id: &mut dyn FnMut() -> u64,
    spare: Bodies,
) -> (Flush, u64) {
    gauges.start_flush();
    let ts = u32::try_from(generation.started.as_secs()).unwrap_or(u32::MAX);
    let at = |t: Option<u64>| t.map_or(ts, |t| u32::try_from(t).unwrap_or(u32::MAX));
    let (events, service_checks) = generation.take_notes();
    let mut intervals = vec![ts];
    intervals.extend(events.iter().filter_map(|(_, o)| o.interval));
    intervals.extend(service_checks.iter().filter_map(|(_, o)| o.interval));
    let mut out = Rows {
        tables: Bodies::recycle(spare),
        gauge_values: Vec::new(),
        host,
        instance,
        summary: Summary::default(),
    };
    for ((e, origin), seq) in events.into_iter().zip(0u32..) {
        out.tables.event(&EventRow {
            ts: origin.interval.unwrap_or(ts),
            host: origin.host.unwrap_or_else(|| host.to_owned()),
            flush_id,
            seq,
            event_ts: at(e.timestamp),
            title: e.title,
            text: e.text,
            hostname: e.hostname,
            aggregation_key: e.aggregation_key,
            priority: e.priority.to_owned(),
            source_type: e.source_type,
            alert_type: e.alert_type.to_owned(),
            tags: e.tags,
        });
    }
    for ((c, origin), seq) in service_checks.into_iter().zip(0u32..) {
        out.tables.service_check(&ServiceCheckRow {
            ts: origin.interval.unwrap_or(ts),
            host: origin.host.unwrap_or_else(|| host.to_owned()),
            flush_id,
            seq,
            check_ts: at(c.timestamp),
            name: c.name,
            status: c.status,
            hostname: c.hostname,
            tags: c.tags,
            message: c.message,
        });
    }
    let generation_id = generation.id;
    let samples = generation
        .pending
        .load(std::sync::atomic::Ordering::Relaxed);
    out.reserve(&generation);
    let mut forgotten = 0;
    // Keys that mapping rules change, and those another key maps to, are
    // merged by the key they are flushed under (see `aggregate::mapping`).
    let mut remap = generation.remap();
    let mut merged: std::collections::HashMap<MapKey, Acc> = Default::default();
    generation.drain(|k, acc| match remap.key(k) {
        None => forgotten += out.push(k, acc, ts, flush_id, Some(&mut *gauges)),
        Some(to) => match merged.entry(MapKey::from_slice(to)) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().absorb(acc),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(acc);
            }
        },
    });
    for (k, acc) in merged {
        forgotten += out.push(&k, acc, ts, flush_id, Some(&mut *gauges));
    }
    // Samples stamped (`|T`) for other intervals: rows of their interval,
    // each interval under a flush id of its own, so that they never
    // collapse with that key's row of this interval. A late gauge is its
    // own value (a delta applies to 0), does not move the gauge memory, and
    // orders by its interval's start, never after a live value.
    let mut late: std::collections::BTreeMap<u32, KeyedAccs> = Default::default();
    for (k, acc) in std::mem::take(&mut generation.late) {
        if let Some((start, key)) = k.split_first_chunk::<4>() {
            late.entry(u32::from_le_bytes(*start))
                .or_default()
                .push((crate::aggregate::MapKey::from_slice(key), acc));
        }
    }
    intervals.extend(late.keys());
    intervals.sort_unstable();
    intervals.dedup();
    for (start, rows) in late {
        let id = next_id();
        for (k, acc) in rows {
            out.push(&k, acc, start, id, None);
        }
    }
    let flush = Flush {
        instance,
        flush_id,
        generation: generation_id,
        ts,
        samples,
        host: host.to_owned(),
        tables: out.tables,
        gauges: out.gauge_values,
        intervals,
        absorbed: Vec::new(),
        legacy_token: false,
    };
    (flush, forgotten)
}

/// Accumulators with their keys.
type KeyedAccs = Vec<(crate::aggregate::MapKey, Acc)>;

/// A flush's bodies as [`build`] fills them.
struct Rows<'a> {
    tables: Bodies,
    /// (key, value) of every gauge row: the gauge memory after this flush.
    gauge_values: Vec<(Box<[u8]>, f64)>,
    host: &'a str,
    instance: u64,
    /// A timer's percentiles and buckets, reused for every timer key.
    summary: Summary,
}

impl Rows<'_> {
    /// Sizes each body once for the rows of `generation` (a row is about
    /// its key, the host and its fixed columns), so that a body does not
    /// grow by doubling: each step of that touches the old and the new copy
    /// at once, up to three times the body at 1M keys. Timers and sets are
    /// estimated; they grow if they need more.
    fn reserve(&mut self, generation: &Generation) {
        let sizes = generation.row_sizes();
        for (body, (rows, bytes)) in self.tables.bodies.iter_mut().zip(sizes) {
            body.reserve(bytes.saturating_add(rows.saturating_mul(self.host.len())));
        }
        self.gauge_values.reserve(sizes[1].0);
    }

    /// Adds the row of key `k` for interval `ts` under `flush_id`. A gauge
    /// resolves against (and updates) `gauges` when given; returns 1 when
    /// it could not be remembered.
    fn push(
        &mut self,
        k: &[u8],
        acc: Acc,
        ts: u32,
        flush_id: u64,
        gauges: Option<&mut GaugeMemory>,
    ) -> u64 {
        let Some((kind, name, tags)) = key::parts(k) else {
            return 0;
        };
        let head = Head {
            ts,
            name,
            tags: Tags::Key(tags),
            host: key::host(k).unwrap_or(self.host),
        };
        let mut forgotten = 0;
        match acc {
            Acc::Counter { sum, samples } => self.tables.counter(head, flush_id, sum, samples),
            Acc::Gauge(g) => {
                // A live gauge's version is its flush id; a stamped one's is
                // the id of its interval's start, below every live row
                // flushed since (see `flush::flush_id`).
                let (value, version) = match gauges {
                    Some(memory) => {
                        let (value, lost) = memory.settle(k, &g);
                        self.gauge_values.push((k.into(), value));
                        forgotten += u64::from(lost);
                        (value, flush_id)
                    }
                    None => {
                        let start = std::time::Duration::from_secs(u64::from(ts));
                        let version =
                            super::flush::flush_id(super::flush::tick_of(start), self.instance);
                        (g.resolve(None).unwrap_or(0.0), version)
                    }
                };
                self.tables.gauge(head, value, version, g.samples);
            }
            Acc::Dist(mut d) => {
                d.summarize_into(&mut self.summary);
                let s = &self.summary;
                self.tables.timer(
                    head,
                    TimerColumns {
                        flush_id,
                        kind: kind.as_str(),
                        count: d.count,
                        sum_min_max: [d.sum, d.min, d.max],
                        percentiles: [s.p50, s.p90, s.p95, s.p99],
                        samples: d.samples,
                        bucket_values: &s.bucket_values,
                        bucket_counts: &s.bucket_counts,
                    },
                );
            }
            Acc::Set(s) => {
                let mut member_hashes: Vec<u64> = s.members.into_iter().collect();
                member_hashes.sort_unstable();
                let row = SetRow {
                    ts,
                    name: String::new(),
                    tags: Vec::new(),
                    host: String::new(),
                    flush_id,
                    cardinality: member_hashes.len() as u64,
                    samples: s.samples,
                    member_hashes,
                };
                self.tables.set(head, &row);
            }
        }
        forgotten
    }
}

#[cfg(test)]
mod tests;
