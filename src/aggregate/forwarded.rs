//! Forwarded state (protocol version 2): the aggregate of one key over one
//! interval, as an edge tallyd sends it upstream ([`crate::forward`]),
//! merged here into the accumulator of that key and interval, the same
//! [`Acc`] that raw samples build. So an aggregator's row of a key is the
//! merge of every edge's row of it, and a rollup of rollups stays exact:
//! counters add sums and samples, gauges take the value (an edge sends the
//! value at the end of its interval, deltas applied), distributions add
//! weighted counts, sums and sketch buckets and keep the extremes, sets
//! take the union of member hashes.
//!
//! A state keeps its interval: one whose `interval_start` falls in this
//! generation's interval merges into the series table, any other into the
//! generation's late samples (as a `|T` sample does), and is flushed as a
//! row of its own interval; a gauge delta (`GaugeState.delta`, from OTLP)
//! always applies to the open interval. Only the future side of `timestamp_window`
//! applies: an edge's backlog after a partition lands in its own past
//! intervals however old; a state without an interval is refused.
//!
//! With a `host` (the edge's), the key carries it
//! ([`super::key::KeyBuf::with_host`]) and the row keeps it, unless the
//! state says `host_dropped` (`forward.host = "drop"`, or a name in
//! `forward.host_except`): then the fleet's states of a key merge into one
//! row. Events and service checks keep the batch's host.

use std::sync::atomic::Ordering::Relaxed;

use super::acc::Acc;
use super::admit::{Admit, merge_key, merge_late, row_shape};
use super::apply::note_cost;
use super::{AggregateLimits, Aggregator, Generation, Origin, Scratch};
use crate::protocol::batch::{BatchView, DistributionView, EventValue, EventView, Note, SetView};
use crate::protocol::dogstatsd;
use crate::protocol::proto::{self, pb};
use crate::protocol::statsd::{Limits, MetricType, ParseError};
use crate::telemetry::BlockStats;

/// A forwarded state, checked.
#[derive(Clone, Copy)]
enum State<'a> {
    Counter {
        sum: f64,
        samples: u64,
    },
    Gauge {
        value: f64,
        samples: u64,
        delta: bool,
    },
    Distribution(MetricType, DistributionView<'a>),
    Set(SetView<'a>),
}

impl State<'_> {
    fn kind(&self) -> MetricType {
        match self {
            State::Counter { .. } => MetricType::Counter,
            State::Gauge { .. } => MetricType::Gauge,
            State::Distribution(kind, _) => *kind,
            State::Set(_) => MetricType::Set,
        }
    }

    /// The raw samples it stands for (at least 1, what a drop counts).
    fn samples(&self) -> u64 {
        match self {
            State::Counter { samples, .. } | State::Gauge { samples, .. } => *samples,
            State::Distribution(_, d) => d.samples,
            State::Set(s) => s.samples,
        }
        .max(1)
    }
}

/// Whether `value` is a forwarded state rather than a raw sample.
pub fn is_state(value: &EventValue<'_>) -> bool {
    matches!(
        value,
        EventValue::CounterState { .. }
            | EventValue::GaugeState { .. }
            | EventValue::DistributionState(_)
            | EventValue::SetState(_)
    )
}

/// The state of `value`; `InvalidValue` for a number that is not finite
/// (a count or weight that is negative included).
fn state<'a>(value: &EventValue<'a>) -> Result<State<'a>, ParseError> {
    let finite = |v: f64| v.is_finite().then_some(()).ok_or(ParseError::InvalidValue);
    Ok(match *value {
        EventValue::CounterState { sum, samples } => {
            finite(sum)?;
            State::Counter { sum, samples }
        }
        EventValue::GaugeState {
            value,
            samples,
            delta,
        } => {
            finite(value)?;
            State::Gauge {
                value,
                samples,
                delta,
            }
        }
        EventValue::DistributionState(d) => {
            for v in [d.count, d.sum, d.min, d.max] {
                finite(v)?;
            }
            if d.count < 0.0 || d.min > d.max {
                return Err(ParseError::InvalidValue);
            }
            let kind = match d.kind {
                1 => MetricType::Histogram,
                2 => MetricType::Distribution,
                _ => MetricType::Timer,
            };
            State::Distribution(kind, d)
        }
        EventValue::SetState(s) => State::Set(s),
        _ => return Err(ParseError::UnknownType),
    })
}

/// Merges `state` into `acc` (of the same type); returns the bytes it
/// grew by. A merge that would not be finite, or members past the set's
/// limit, are counted in `stats` and left out.
fn merge(
    acc: &mut Acc,
    state: &State<'_>,
    stats: &mut BlockStats,
    limits: &AggregateLimits,
    full: bool,
) -> u64 {
    let mut grew = 0;
    let applied = match (acc, state) {
        (Acc::Counter { sum, samples }, State::Counter { sum: s, samples: n }) => {
            let next = *sum + s;
            next.is_finite() && {
                *sum = next;
                *samples = samples.saturating_add(*n);
                true
            }
        }
        (
            Acc::Gauge(g),
            State::Gauge {
                value,
                samples,
                delta,
            },
        ) => {
            // A delta (only from OTLP) applies as a `+N|g` line does.
            let next = if *delta { g.value + value } else { *value };
            next.is_finite() && {
                g.value = next;
                g.absolute |= !*delta;
                g.samples = g.samples.saturating_add(*samples);
                true
            }
        }
        (Acc::Dist(_), State::Distribution(..)) if full => {
            stats.dropped_memory += state.samples();
            return 0;
        }
        (Acc::Dist(acc), State::Distribution(_, d)) => {
            match acc.merge([d.count, d.sum, d.min, d.max], d.samples, d.buckets()) {
                Some(g) => {
                    grew = g;
                    true
                }
                None => false,
            }
        }
        (Acc::Set(acc), State::Set(s)) => {
            let max = if full {
                acc.members.len()
            } else {
                limits.max_set_members
            };
            let (g, refused) = acc.merge(s.member_hashes(), s.samples, max);
            grew = g;
            if full {
                stats.dropped_memory += refused;
            } else {
                stats.dropped_set_members += refused;
            }
            true
        }
        // A key's type is in its key: an accumulator of another type
        // cannot be found under it.
        _ => false,
    };
    if applied {
        stats.samples += state.samples();
    } else {
        stats.dropped_overflow += state.samples();
    }
    grew
}

impl Aggregator {
    /// Keeps the forwarded DogStatsD events and service checks of `batch`
    /// (with their interval and, when the batch names one, their host),
    /// within the memory budget. Returns how many were invalid (a status
    /// above 3, a priority or alert type DogStatsD does not have).
    pub(super) fn apply_notes(
        &self,
        generation: &Generation,
        batch: &BatchView<'_>,
        stats: &mut BlockStats,
        limits: &AggregateLimits,
    ) -> u32 {
        let host = (!batch.host.is_empty()).then(|| batch.host.to_owned());
        let mut rejected = 0;
        for note in batch.notes() {
            stats.lines += 1;
            match note {
                Note::Event(e) => {
                    let origin = origin(e.interval_start, &host);
                    let Some(e) = event(e) else {
                        stats.parse_errors[ParseError::InvalidEvent.index()] += 1;
                        rejected += 1;
                        continue;
                    };
                    let cost = note_cost(e.title.len() + e.text.len(), e.tags.len());
                    if self.keep(generation, cost, stats, limits, |n| {
                        n.events.push((e, origin))
                    }) {
                        stats.events += 1;
                    }
                }
                Note::ServiceCheck(c) => {
                    let origin = origin(c.interval_start, &host);
                    let Ok(status) = u8::try_from(c.status)
                        .map_err(drop)
                        .and_then(|s| (s <= 3).then_some(s).ok_or(()))
                    else {
                        stats.parse_errors[ParseError::InvalidServiceCheck.index()] += 1;
                        rejected += 1;
                        continue;
                    };
                    let c = dogstatsd::ServiceCheck {
                        name: c.name,
                        status,
                        timestamp: (c.timestamp > 0).then_some(c.timestamp),
                        hostname: c.hostname,
                        tags: c.tags,
                        message: c.message,
                    };
                    let cost = note_cost(c.name.len() + c.message.len(), c.tags.len());
                    if self.keep(generation, cost, stats, limits, |n| {
                        n.service_checks.push((c, origin))
                    }) {
                        stats.service_checks += 1;
                    }
                }
            }
        }
        rejected
    }

    /// Merges one forwarded state event into `generation`, in the interval
    /// of its `interval_start`, under a key that carries `host` when it is
    /// not empty. Errors (the event is counted as invalid and skipped) for
    /// a bad name, tags or number.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_state(
        &self,
        generation: &Generation,
        event: &EventView<'_>,
        host: &[u8],
        tags: &mut Vec<u8>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
        (limits, parse_limits): (&AggregateLimits, &Limits),
    ) -> Result<(), ParseError> {
        let Some(value) = &event.value else {
            return Err(ParseError::MissingValue);
        };
        let state = state(value)?;
        proto::event_key(event, tags, parse_limits)?;
        scratch.key.build(state.kind(), event.name, tags);
        let key = scratch
            .key
            .with_host(if event.host_dropped { b"" } else { host });
        let step = limits.interval.as_secs().max(1);
        let started = generation.started.as_secs();
        // A state names its interval; none, or one further ahead than the
        // timestamp window (a clock far off), is refused. A past one is
        // taken however old: an edge's backlog after a partition.
        let ahead = started.saturating_add(limits.timestamp_window.as_secs());
        if event.interval_start == 0 || event.interval_start > ahead {
            return Err(ParseError::InvalidTimestamp);
        }
        let start = event.interval_start - event.interval_start % step;
        let full = generation.bytes.load(Relaxed) >= limits.max_memory;
        // A gauge delta (only OTLP's) changes the gauge's current value: it
        // applies to the open interval, as a `+N|g` line without `|T` does
        // (a late gauge starts from 0 and moves no gauge memory).
        let delta = matches!(state, State::Gauge { delta: true, .. });
        let shape = (state.kind(), state.samples());
        let fold = Admit::State(&mut scratch.fold);
        let grew = if delta || start == started - started % step {
            let hash = generation.series.hash(key);
            merge_key(
                generation,
                key,
                hash,
                shape,
                fold,
                stats,
                limits,
                |acc, stats| merge(acc, &state, stats, limits, full),
            )
        } else {
            let start = u32::try_from(start).map_err(|_| ParseError::InvalidTimestamp)?;
            scratch.late_key.clear();
            scratch.late_key.extend_from_slice(&start.to_le_bytes());
            scratch.late_key.extend_from_slice(key);
            merge_late(
                generation,
                &scratch.late_key,
                shape,
                fold,
                stats,
                limits,
                |acc, stats| merge(acc, &state, stats, limits, full),
            )
        };
        generation.grew(row_shape(state.kind()).0, grew);
        Ok(())
    }
}

/// Where a forwarded note comes from: its interval, and its edge's host.
fn origin(interval_start: u64, host: &Option<String>) -> Origin {
    Origin {
        interval: u32::try_from(interval_start).ok().filter(|&t| t > 0),
        host: host.clone(),
    }
}

/// A forwarded event as the parser would have made it; `None` for a
/// priority or alert type DogStatsD does not have.
fn event(e: pb::DogstatsdEvent) -> Option<dogstatsd::Event> {
    let priority = ["normal", "low"]
        .into_iter()
        .find(|&p| p == e.priority || (e.priority.is_empty() && p == "normal"))?;
    let alert_type = ["info", "error", "warning", "success"]
        .into_iter()
        .find(|&t| t == e.alert_type || (e.alert_type.is_empty() && t == "info"))?;
    Some(dogstatsd::Event {
        title: e.title,
        text: e.text,
        timestamp: (e.timestamp > 0).then_some(e.timestamp),
        hostname: e.hostname,
        aggregation_key: e.aggregation_key,
        priority,
        source_type: e.source_type,
        alert_type,
        tags: e.tags,
    })
}
