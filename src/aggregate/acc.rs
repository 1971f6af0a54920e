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

/// Estimated bytes of a new key beyond its own bytes: the map entry, the
/// boxed key's header and the largest accumulator (the memory budget's
/// unit; `benches/aggregate.rs` measures the real figures).
pub const KEY_OVERHEAD: u64 = 96;
/// Estimated bytes of one more value in a short timer list.
const FEW_VALUE: u64 = 16;
/// Estimated bytes of one more set member (hash, control byte, load factor).
const SET_MEMBER: u64 = 16;

/// Bytes of an HDR histogram's counts at [`SIGFIGS`] = 2: 128 counters of
/// 8 bytes per power of two it spans (its memory grows with the largest
/// value recorded: about 47 KB for the full range).
fn hist_bytes(h: &Histogram<u64>) -> u64 {
    (u64::from(h.buckets()) + 1) * 128 * 8
}

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
    /// Applies a sample; `false` (and nothing changed) when a delta would
    /// take the value past the range of `f64`.
    pub fn apply(&mut self, value: f64, delta: bool) -> bool {
        if delta {
            let next = self.value + value;
            if !next.is_finite() {
                return false;
            }
            self.value = next;
        } else {
            self.value = value;
            self.absolute = true;
        }
        self.samples += 1;
        true
    }

    /// The gauge's value at the end of the interval, given the value flushed
    /// before it (if any). `None` when the deltas would take the previous
    /// value past the range of `f64`.
    pub fn resolve(&self, previous: Option<f64>) -> Option<f64> {
        if self.absolute {
            Some(self.value)
        } else {
            Some(previous.unwrap_or(0.0) + self.value).filter(|v| v.is_finite())
        }
    }
}

/// Timer / histogram / distribution accumulator.
///
/// Most keys see a few values per interval, and an HDR histogram costs
/// kilobytes, so values are first kept as a short list and moved into a
/// histogram only past [`FEW`] entries. Summaries come from an HDR histogram
/// either way (a reused one for short lists), so the percentiles and bucket
/// columns do not depend on which form a key was in.
#[derive(Debug)]
pub struct DistAcc {
    values: Values,
    /// Sample-rate scaled count.
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Raw values received (before sample-rate scaling).
    pub samples: u64,
}

/// Entries a key keeps as a plain list before it gets a histogram.
pub const FEW: usize = 64;

#[derive(Debug)]
enum Values {
    /// (scaled value, weight)
    Few(Vec<(u64, u64)>),
    Hist(Box<Histogram<u64>>),
}

impl Default for DistAcc {
    fn default() -> Self {
        DistAcc {
            values: Values::Few(Vec::new()),
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            samples: 0,
        }
    }
}

/// A fresh histogram of the precision tallyd uses.
pub fn histogram() -> Histogram<u64> {
    // `new` only fails for sigfigs > 5.
    Histogram::new(SIGFIGS).expect("2 significant figures are valid")
}

/// What a flushed distribution row holds beyond count/sum/min/max.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    /// Mergeable buckets: highest value of each bucket, ascending...
    pub bucket_values: Vec<f64>,
    /// ...and how many values fell in it.
    pub bucket_counts: Vec<u64>,
}

impl DistAcc {
    /// Records a non-negative value seen with the given sample rate.
    /// Returns the estimated bytes the accumulator grew by, or `None` (and
    /// records nothing) when the sum would pass the range of `f64`.
    pub fn record(&mut self, value: f64, sample_rate: f64) -> Option<u64> {
        let weight = (1.0 / sample_rate).round().max(1.0) as u64;
        let sum = self.sum + value * weight as f64;
        if !sum.is_finite() {
            return None;
        }
        let scaled = ((value * SCALE).round() as u64).min(MAX_SCALED);
        let grew = match &mut self.values {
            Values::Few(list) if list.len() < FEW => {
                list.push((scaled, weight));
                FEW_VALUE
            }
            Values::Few(list) => {
                let mut hist = Box::new(histogram());
                for &(v, w) in list.iter().chain([(scaled, weight)].iter()) {
                    // Auto-resizing: recording only fails past u64 range,
                    // which MAX_SCALED rules out.
                    let _ = hist.record_n(v, w);
                }
                let grew = hist_bytes(&hist).saturating_sub(FEW as u64 * FEW_VALUE);
                self.values = Values::Hist(hist);
                grew
            }
            Values::Hist(hist) => {
                let before = hist_bytes(hist);
                let _ = hist.record_n(scaled, weight);
                hist_bytes(hist).saturating_sub(before)
            }
        };
        self.count = self.count.saturating_add(weight);
        self.sum = sum;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.samples += 1;
        Some(grew)
    }

    /// Percentiles (within HDR precision, clamped to the exact min and max)
    /// and buckets. `scratch` is a reusable histogram for short lists.
    pub fn summarize(&self, scratch: &mut Histogram<u64>) -> Summary {
        let hist: &Histogram<u64> = match &self.values {
            Values::Hist(h) => h,
            Values::Few(list) => {
                scratch.reset();
                for &(v, w) in list {
                    let _ = scratch.record_n(v, w);
                }
                scratch
            }
        };
        let q = |q: f64| {
            if hist.is_empty() {
                0.0
            } else {
                (hist.value_at_quantile(q) as f64 / SCALE).clamp(self.min, self.max)
            }
        };
        let mut bucket_values = Vec::new();
        let mut bucket_counts = Vec::new();
        for it in hist.iter_recorded() {
            bucket_values.push(hist.highest_equivalent(it.value_iterated_to()) as f64 / SCALE);
            bucket_counts.push(it.count_at_value());
        }
        Summary {
            p50: q(0.50),
            p90: q(0.90),
            p95: q(0.95),
            p99: q(0.99),
            bucket_values,
            bucket_counts,
        }
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
    /// Adds a member and returns the estimated bytes the set grew by, or
    /// `None` when the set is at `max_members` and the member is new (it is
    /// not added).
    pub fn insert(&mut self, member: &[u8], max_members: usize) -> Option<u64> {
        self.samples += 1;
        let h = member_hash(member);
        if self.members.len() >= max_members && !self.members.contains(&h) {
            return None;
        }
        Some(if self.members.insert(h) {
            SET_MEMBER
        } else {
            0
        })
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
        assert_eq!(g.resolve(Some(100.0)), Some(7.0));
    }

    #[test]
    fn gauge_deltas_apply_to_previous_flush() {
        let mut g = GaugeAcc::default();
        g.apply(2.0, true);
        g.apply(-0.5, true);
        assert_eq!(g.resolve(Some(10.0)), Some(11.5));
        assert_eq!(g.resolve(None), Some(1.5));
    }

    #[test]
    fn gauge_delta_after_absolute_applies_to_it() {
        let mut g = GaugeAcc::default();
        g.apply(2.0, true);
        g.apply(10.0, false);
        g.apply(3.0, true);
        assert_eq!(g.resolve(Some(1000.0)), Some(13.0));
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
        let s = d.summarize(&mut histogram());
        for (got, want) in [(s.p50, 500.0), (s.p90, 900.0), (s.p99, 990.0)] {
            assert!((got - want).abs() / want <= 0.01, "{got} vs {want}");
        }
    }

    #[test]
    fn dist_buckets_sum_to_count() {
        let mut d = DistAcc::default();
        for v in [0.5, 0.5, 3.0, 250.0] {
            d.record(v, 1.0);
        }
        let s = d.summarize(&mut histogram());
        assert_eq!(s.bucket_counts.iter().sum::<u64>(), 4);
        assert!(s.bucket_values.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn short_list_and_histogram_give_the_same_summary() {
        let values: Vec<f64> = (0..FEW + 10)
            .map(|i| (i * 37 % 101) as f64 + 0.25)
            .collect();
        let mut few = DistAcc::default();
        let mut scratch = histogram();
        for (i, &v) in values.iter().enumerate() {
            few.record(v, 1.0);
            if i + 1 == FEW {
                // Still a list: compare against a histogram fed the same values.
                let mut direct = histogram();
                for &v in &values[..FEW] {
                    direct.record((v * SCALE).round() as u64).expect("record");
                }
                let s = few.summarize(&mut scratch);
                assert_eq!(s.bucket_counts.iter().sum::<u64>(), FEW as u64);
                assert_eq!(
                    s.p99,
                    (direct.value_at_quantile(0.99) as f64 / SCALE).clamp(few.min, few.max)
                );
            }
        }
        let s = few.summarize(&mut scratch);
        assert_eq!(s.bucket_counts.iter().sum::<u64>(), values.len() as u64);
    }

    #[test]
    fn scratch_histogram_is_reset_between_keys() {
        let mut scratch = histogram();
        let mut a = DistAcc::default();
        a.record(5.0, 1.0);
        let mut b = DistAcc::default();
        b.record(7.0, 1.0);
        a.summarize(&mut scratch);
        assert_eq!(b.summarize(&mut scratch).bucket_counts, vec![1]);
    }

    #[test]
    fn set_counts_distinct_members() {
        let mut s = SetAcc::default();
        let grew: Vec<Option<u64>> = ["a", "b", "a", "c", "b"]
            .iter()
            .map(|m| s.insert(m.as_bytes(), 10))
            .collect();
        assert_eq!(grew, [Some(16), Some(16), Some(0), Some(16), Some(0)]);
        assert_eq!((s.members.len(), s.samples), (3, 5));
    }

    #[test]
    fn set_member_cap() {
        let mut s = SetAcc::default();
        assert_eq!(s.insert(b"a", 1), Some(16));
        assert_eq!(s.insert(b"b", 1), None);
        assert_eq!(s.insert(b"a", 1), Some(0));
        assert_eq!(s.members.len(), 1);
    }

    #[test]
    fn a_timer_reports_its_growth_up_to_the_full_histogram() {
        let mut d = DistAcc::default();
        let few: u64 = (0..FEW).filter_map(|i| d.record(i as f64, 1.0)).sum();
        assert_eq!(few, FEW as u64 * FEW_VALUE);
        // The 65th value, near the top of the range, makes the histogram span
        // every power of two: its counts are the crafted line's 47 KB.
        let hist = d.record(4.5e12, 1.0).expect("finite");
        assert!(
            few + hist >= 45_000 && few + hist <= 50_000,
            "{}",
            few + hist
        );
        assert_eq!(d.record(1.0, 1.0), Some(0), "no new bucket");
    }

    #[test]
    fn member_hash_is_clickhouse_siphash64() {
        // SELECT sipHash64('hello') on ClickHouse.
        assert_eq!(member_hash(b"hello"), 10_142_490_492_830_962_361);
    }
}
