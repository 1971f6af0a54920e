//! Latencies of tallyd's own operations (a flush, an INSERT, a WAL sync, a
//! protobuf ack), for `/metrics` and the status page: HdrHistograms (the
//! `hdrhistogram` crate: fixed precision, a record is an index and an add),
//! in microseconds from 1 µs to 1 h at 2 significant digits, over the last
//! one to two minutes (two histograms in turn). The stored percentiles of
//! timers use the DDSketch instead, for its range and negative values.
//!
//! Pure and cheap: no I/O; a record takes a short lock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::lock;

/// A window's length: figures cover the last one to two of them.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest latency kept (longer ones count as this), microseconds.
const MAX_MICROS: u64 = 3_600_000_000;

/// One operation's recent latencies.
pub struct Latency(Mutex<Window>);

struct Window {
    current: Histogram<u64>,
    last: Histogram<u64>,
    since: Instant,
}

/// What a [`Latency`] holds: seconds, and how many were recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub count: u64,
}

fn histogram() -> Histogram<u64> {
    // Constant bounds, not input: 1 µs to 1 h, 2 significant digits.
    Histogram::new_with_bounds(1, MAX_MICROS, 2).expect("valid constant bounds")
}

impl Default for Latency {
    fn default() -> Self {
        Latency(Mutex::new(Window {
            current: histogram(),
            last: histogram(),
            since: Instant::now(),
        }))
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Latency").field(&self.summary()).finish()
    }
}

impl Window {
    /// Starts a new window when this one is over (the one before is kept).
    fn turn(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.since);
        if age < WINDOW {
            return;
        }
        if age < 2 * WINDOW {
            std::mem::swap(&mut self.current, &mut self.last);
        } else {
            self.last.reset();
        }
        self.current.reset();
        self.since = now;
    }
}

impl Latency {
    /// Records one operation of `d`.
    pub fn record(&self, d: Duration) {
        self.record_at(d, Instant::now());
    }

    fn record_at(&self, d: Duration, now: Instant) {
        let micros = u64::try_from(d.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_MICROS);
        let mut w = lock(&self.0);
        w.turn(now);
        w.current.saturating_record(micros);
    }

    /// p50, p99 and max over the last one to two minutes; `None` when
    /// nothing was recorded then.
    pub fn summary(&self) -> Option<Summary> {
        self.summary_at(Instant::now())
    }

    fn summary_at(&self, now: Instant) -> Option<Summary> {
        let mut w = lock(&self.0);
        w.turn(now);
        let mut h = w.last.clone();
        h.add(&w.current).ok()?;
        let seconds = |us: u64| us as f64 / 1e6;
        (!h.is_empty()).then(|| Summary {
            p50: seconds(h.value_at_quantile(0.5)),
            p99: seconds(h.value_at_quantile(0.99)),
            max: seconds(h.max()),
            count: h.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_two_digits_and_cover_one_to_two_windows() {
        let l = Latency::default();
        let t0 = Instant::now();
        for ms in 1..=100 {
            l.record_at(Duration::from_millis(ms), t0);
        }
        let s = l.summary_at(t0).expect("recorded");
        assert_eq!(s.count, 100);
        assert!((s.p50 - 0.050).abs() <= 0.0005, "{s:?}");
        assert!((s.p99 - 0.099).abs() <= 0.001, "{s:?}");
        assert!((s.max - 0.100).abs() <= 0.001, "{s:?}");
        // A window later the last one still counts; two later, none.
        l.record_at(Duration::from_secs(2), t0 + WINDOW);
        assert_eq!(l.summary_at(t0 + WINDOW).map(|s| s.count), Some(101));
        assert_eq!(l.summary_at(t0 + 3 * WINDOW), None);
    }

    #[test]
    fn a_latency_past_an_hour_counts_as_an_hour() {
        let l = Latency::default();
        l.record(Duration::from_secs(10_000));
        l.record(Duration::ZERO);
        let s = l.summary().expect("recorded");
        assert_eq!(s.count, 2);
        assert!((s.max - 3600.0).abs() / 3600.0 < 0.01, "{s:?}");
    }
}
