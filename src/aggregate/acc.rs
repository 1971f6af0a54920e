//! One accumulator per key and interval: counter, gauge, distribution, set.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use hdrhistogram::Histogram;

use crate::protocol::statsd::MetricType;

/// Timer, histogram and distribution values are recorded in the HDR histogram
/// as `round(value * SCALE)`, so a timer in milliseconds keeps microseconds.
pub const SCALE: f64 = 1000.0;
/// Significant decimal digits the HDR histograms keep (1 % relative error).
pub const SIGFIGS: u8 = 2;
/// The largest scaled value a histogram takes; larger values are clamped.
const MAX_SCALED: u64 = 1 << 52;

/// The state of one key within one interval.
#[derive(Debug)]
pub enum Acc {
    Counter { sum: f64, samples: u64 },
    Gauge(GaugeAcc),
    Dist(Box<DistAcc>),
    Set(SetAcc),
}

impl Acc {
    /// A fresh accumulator for a key of this type.
    pub fn new(kind: MetricType) -> Acc {
        match kind {
            MetricType::Counter => Acc::Counter {
                sum: 0.0,
                samples: 0,
            },
            MetricType::Gauge => Acc::Gauge(GaugeAcc::default()),
            MetricType::Timer | MetricType::Histogram | MetricType::Distribution => {
                Acc::Dist(Box::default())
            }
            MetricType::Set => Acc::Set(SetAcc::default()),
        }
    }
}

/// A gauge within an interval. While no absolute value has arrived, `value`
/// is the sum of deltas, to be applied to the last flushed value at flush
/// time (so a delta never races with the previous flush).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct GaugeAcc {
    pub value: f64,
    pub absolute: bool,
    pub samples: u64,
}

impl GaugeAcc {
    pub fn apply(&mut self, value: f64, delta: bool) {
        if delta {
            self.value += value;
        } else {
            self.value = value;
            self.absolute = true;
        }
        self.samples += 1;
    }

    /// The gauge's value at the end of the interval, given the value flushed
    /// before it (if any).
    pub fn resolve(&self, previous: Option<f64>) -> f64 {
        if self.absolute {
            self.value
        } else {
            previous.unwrap_or(0.0) + self.value
        }
    }
}

/// Timer / histogram / distribution accumulator.
#[derive(Debug)]
pub struct DistAcc {
    pub hist: Histogram<u64>,
    /// Sample-rate scaled count.
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Raw values received (before sample-rate scaling).
    pub samples: u64,
}

impl Default for DistAcc {
    fn default() -> Self {
        DistAcc {
            // `new` only fails for sigfigs > 5.
            hist: Histogram::new(SIGFIGS).expect("2 significant figures are valid"),
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            samples: 0,
        }
    }
}

impl DistAcc {
    /// Records a non-negative value seen with the given sample rate.
    pub fn record(&mut self, value: f64, sample_rate: f64) {
        let weight = (1.0 / sample_rate).round().max(1.0) as u64;
        let scaled = ((value * SCALE).round() as u64).min(MAX_SCALED);
        // Auto-resizing histogram: recording only fails past u64 range, which
        // MAX_SCALED rules out.
        let _ = self.hist.record_n(scaled, weight);
        self.count += weight;
        self.sum += value * weight as f64;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.samples += 1;
    }

    /// The value at quantile `q` (0..=1), in the unit it was sent in, within
    /// HDR precision and clamped to the exact min and max.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let v = self.hist.value_at_quantile(q) as f64 / SCALE;
        v.clamp(self.min, self.max)
    }

    /// Mergeable buckets: (highest value of the bucket, count), ascending.
    pub fn buckets(&self) -> (Vec<f64>, Vec<u64>) {
        let mut values = Vec::new();
        let mut counts = Vec::new();
        for it in self.hist.iter_recorded() {
            values.push(self.hist.highest_equivalent(it.value_iterated_to()) as f64 / SCALE);
            counts.push(it.count_at_value());
        }
        (values, counts)
    }
}

/// A set: the 64-bit SipHash-2-4 (zero key) of each member, which is what
/// ClickHouse's `sipHash64(member)` returns, so rows can be compared with
/// and merged into data hashed in SQL.
#[derive(Debug, Default)]
pub struct SetAcc {
    pub members: HashSet<u64, BuildHasherDefault<IdentityHasher>>,
    pub samples: u64,
}

impl SetAcc {
    /// Adds a member. Returns false when the set is at `max_members` and the
    /// member is new (it is not added).
    pub fn insert(&mut self, member: &[u8], max_members: usize) -> bool {
        self.samples += 1;
        let h = member_hash(member);
        if self.members.len() >= max_members && !self.members.contains(&h) {
            return false;
        }
        self.members.insert(h);
        true
    }
}

/// The hash stored for a set member (ClickHouse `sipHash64`).
pub fn member_hash(member: &[u8]) -> u64 {
    let mut h = siphasher::sip::SipHasher24::new();
    h.write(member);
    h.finish()
}

/// A hasher for keys that are already hashes.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_last_absolute_wins() {
        let mut g = GaugeAcc::default();
        g.apply(5.0, false);
        g.apply(7.0, false);
        assert_eq!(g.resolve(Some(100.0)), 7.0);
    }

    #[test]
    fn gauge_deltas_apply_to_previous_flush() {
        let mut g = GaugeAcc::default();
        g.apply(2.0, true);
        g.apply(-0.5, true);
        assert_eq!(g.resolve(Some(10.0)), 11.5);
        assert_eq!(g.resolve(None), 1.5);
    }

    #[test]
    fn gauge_delta_after_absolute_applies_to_it() {
        let mut g = GaugeAcc::default();
        g.apply(2.0, true);
        g.apply(10.0, false);
        g.apply(3.0, true);
        assert_eq!(g.resolve(Some(1000.0)), 13.0);
        assert_eq!(g.samples, 3);
    }

    #[test]
    fn dist_exact_summary() {
        let mut d = DistAcc::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            d.record(v, 1.0);
        }
        assert_eq!(
            (d.count, d.sum, d.min, d.max, d.samples),
            (4, 10.0, 1.0, 4.0, 4)
        );
    }

    #[test]
    fn dist_sample_rate_scales_count() {
        let mut d = DistAcc::default();
        d.record(10.0, 0.1);
        assert_eq!((d.count, d.sum, d.samples), (10, 100.0, 1));
    }

    #[test]
    fn dist_quantiles_within_hdr_precision() {
        let mut d = DistAcc::default();
        for v in 1..=1000 {
            d.record(v as f64, 1.0);
        }
        for (q, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = d.quantile(q);
            assert!((got - want).abs() / want <= 0.01, "q{q}: {got} vs {want}");
        }
        assert_eq!(d.quantile(1.0), 1000.0);
    }

    #[test]
    fn dist_buckets_sum_to_count() {
        let mut d = DistAcc::default();
        for v in [0.5, 0.5, 3.0, 250.0] {
            d.record(v, 1.0);
        }
        let (values, counts) = d.buckets();
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert!(values.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn set_counts_distinct_members() {
        let mut s = SetAcc::default();
        for m in ["a", "b", "a", "c", "b"] {
            assert!(s.insert(m.as_bytes(), 10));
        }
        assert_eq!((s.members.len(), s.samples), (3, 5));
    }

    #[test]
    fn set_member_cap() {
        let mut s = SetAcc::default();
        assert!(s.insert(b"a", 1));
        assert!(!s.insert(b"b", 1));
        assert!(s.insert(b"a", 1));
        assert_eq!(s.members.len(), 1);
    }

    #[test]
    fn member_hash_is_clickhouse_siphash64() {
        // SELECT sipHash64('hello') on ClickHouse.
        assert_eq!(member_hash(b"hello"), 10_142_490_492_830_962_361);
    }
}
