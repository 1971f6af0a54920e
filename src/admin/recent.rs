//! The metrics of the last minute: census scans merged, for the metric
//! search and the top lists. One scan sees only the keys of the series
//! table (written in this interval or the last), so a metric whose client
//! sends every 10 s would be missing most of the time, and one scan's
//! samples per second come from an interval that may be a few ms old.
//! Merged, a metric stays listed for [`WINDOW`] after a scan last saw it
//! (with its keys then), and its samples per second are averaged over the
//! scans of about the last [`DECAY`], each weighted by its interval's age.
//!
//! Scans happen only when the API is asked (at most one per
//! `CENSUS_AGE`): nothing is kept or computed while nobody looks. Pure:
//! scans and times in, a census out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::aggregate::census::{Census, MAX_METRICS, MetricCensus};

/// How long a metric stays listed after a scan last saw it.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The time constant of the samples-per-second average.
pub const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Recent {
    by_metric: HashMap<(&'static str, String), Entry>,
    /// Decayed seconds of open interval the scans covered (the average's
    /// denominator, shared by every metric), and when it was last decayed.
    seconds: f64,
    last: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    /// As the last scan that saw it found it.
    census: MetricCensus,
    seen: Instant,
    /// Decayed samples the scans found (the average's numerator).
    samples: f64,
}

impl Recent {
    /// Merges a scan taken at `at`.
    pub fn add(&mut self, scan: &Census, at: Instant) {
        let decay = self.last.map_or(1.0, |last| {
            (-at.saturating_duration_since(last).as_secs_f64() / DECAY.as_secs_f64()).exp()
        });
        self.last = Some(at);
        self.seconds = self.seconds * decay + scan.open_secs.max(0.0);
        for e in self.by_metric.values_mut() {
            e.samples *= decay;
        }
        // Forget first: a stale entry must not take a new metric's place.
        self.by_metric
            .retain(|_, e| at.saturating_duration_since(e.seen) <= WINDOW);
        for m in &scan.metrics {
            let key = (m.kind, m.name.clone());
            if !self.by_metric.contains_key(&key) && self.by_metric.len() >= MAX_METRICS {
                continue;
            }
            let e = self.by_metric.entry(key).or_insert_with(|| Entry {
                census: m.clone(),
                seen: at,
                samples: 0.0,
            });
            e.census = m.clone();
            e.seen = at;
            e.samples += m.samples as f64;
        }
    }

    /// The merged census: every metric seen in the last [`WINDOW`], with
    /// its keys when last seen and its smoothed samples per second, most
    /// keys first.
    pub fn census(&self, open_secs: f64) -> Census {
        let mut metrics: Vec<MetricCensus> = self
            .by_metric
            .values()
            .map(|e| MetricCensus {
                per_second: e.samples / self.seconds.max(0.001),
                ..e.census.clone()
            })
            .collect();
        metrics.sort_by(|a, b| b.keys.cmp(&a.keys).then_with(|| a.name.cmp(&b.name)));
        Census { metrics, open_secs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(open_secs: f64, metrics: &[(&str, u64, u64)]) -> Census {
        Census {
            metrics: metrics
                .iter()
                .map(|&(name, keys, samples)| MetricCensus {
                    name: name.into(),
                    kind: "counter",
                    keys,
                    samples,
                    per_second: samples as f64 / open_secs,
                    tag_keys: vec![],
                })
                .collect(),
            open_secs,
        }
    }

    #[test]
    fn a_metric_sent_every_ten_seconds_stays_listed_between_its_sends() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        r.add(&scan(0.5, &[("steady", 10, 50), ("sparse", 300, 300)]), t0);
        r.add(
            &scan(0.5, &[("steady", 10, 50)]),
            t0 + Duration::from_secs(2),
        );
        let c = r.census(0.5);
        assert_eq!(c.metrics.len(), 2);
        assert_eq!(
            (c.metrics[0].name.as_str(), c.metrics[0].keys),
            ("sparse", 300)
        );
        r.add(
            &scan(0.5, &[("steady", 10, 50)]),
            t0 + Duration::from_secs(61),
        );
        let c = r.census(0.5);
        assert_eq!(c.metrics.len(), 1, "gone after a minute unseen");
    }

    #[test]
    fn samples_per_second_are_weighted_by_interval_age() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        // 100/s throughout: a scan 10 ms into an interval that found 3
        // samples (300/s alone) weighs little beside one 0.9 s in.
        r.add(&scan(0.9, &[("m", 1, 90)]), t0);
        r.add(&scan(0.01, &[("m", 1, 3)]), t0 + Duration::from_millis(100));
        let rate = r.census(0.01).metrics[0].per_second;
        assert!((rate - 102.0).abs() < 2.0, "{rate}");
        // A scan just after a swap that found nothing yet keeps it listed.
        r.add(&scan(0.001, &[]), t0 + Duration::from_millis(200));
        assert!(r.census(0.001).metrics[0].per_second > 90.0);
    }
}
