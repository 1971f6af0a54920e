//! One accumulator per key and interval: counter, gauge, distribution, set.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use super::sketch::{self, Sketch};
use crate::protocol::statsd::MetricType;

/// Estimated bytes of a key new to an interval beyond its own bytes and a
/// boxed accumulator's ([`boxed_bytes`]): its slot in the series table
/// (64 bytes, with both interval values) and its index bucket at the
/// table's load factor, rounded up (the memory budget's unit;
/// `benches/aggregate.rs` measures the real figures: 123 bytes for a
/// counter key with its 21 bytes, 320 for a timer key with one value).
pub const KEY_OVERHEAD: u64 = 120;
/// Estimated bytes of one more set member (hash, control byte, load factor).
const SET_MEMBER: u64 = 16;

/// The state of one key within one interval. Boxed where larger than a
/// gauge, so that a value column (24 bytes a key, `Option<Acc>`) stays
/// small for the common counters and gauges.
#[derive(Debug)]
pub enum Acc {
    Counter { sum: f64, samples: u64 },
    Gauge(GaugeAcc),
    Dist(Box<DistAcc>),
    Set(Box<SetAcc>),
}

/// Bytes a new key's accumulator takes on the heap beside its map entry:
/// the box of a timer's or a set's, none for counters and gauges (what
/// [`KEY_OVERHEAD`] does not cover).
pub fn boxed_bytes(kind: MetricType) -> u64 {
    match kind {
        MetricType::Counter | MetricType::Gauge => 0,
        MetricType::Timer | MetricType::Histogram | MetricType::Distribution => {
            std::mem::size_of::<DistAcc>() as u64
        }
        MetricType::Set => std::mem::size_of::<SetAcc>() as u64,
    }
}

impl Acc {
    /// Reads a word of a timer's or set's boxed accumulator (0 for
    /// counters and gauges, which hold theirs in place), so that a merge
    /// soon after finds it in cache.
    #[inline]
    pub fn touch(&self) -> usize {
        match self {
            Acc::Counter { .. } | Acc::Gauge(_) => 0,
            Acc::Dist(d) => d.samples as usize,
            Acc::Set(s) => s.samples as usize,
        }
    }

    /// Takes in `other`, the same interval's accumulator of another key
    /// that maps to this one (see [`super::mapping`]), whatever the order:
    /// counters add (a sum past the range of `f64` keeps this one's), sets
    /// unite, timers merge their sketches; of gauges, the largest absolute
    /// value wins and deltas add to it. Accumulators of another type are
    /// left.
    pub fn absorb(&mut self, other: Acc) {
        match (self, other) {
            (Acc::Counter { sum, samples }, Acc::Counter { sum: s, samples: n })
                if (*sum + s).is_finite() =>
            {
                *sum += s;
                *samples = samples.saturating_add(n);
            }
            (Acc::Gauge(g), Acc::Gauge(o)) => {
                let value = match (g.absolute, o.absolute) {
                    (true, true) => g.value.max(o.value),
                    _ => g.value + o.value,
                };
                if value.is_finite() {
                    (g.value, g.absolute) = (value, g.absolute || o.absolute);
                    g.samples = g.samples.saturating_add(o.samples);
                }
            }
            (Acc::Dist(d), Acc::Dist(mut o)) => {
                o.drain();
                let (values, weights) = o.sketch.buckets();
                let buckets = values.into_iter().zip(weights);
                let _ = d.merge([o.count, o.sum, o.min, o.max], o.samples, buckets);
            }
            (Acc::Set(s), Acc::Set(o)) => {
                s.merge(o.members.iter().copied(), o.samples, usize::MAX);
            }
            _ => {}
        }
    }

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
            MetricType::Set => Acc::Set(Box::default()),
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

/// Timer / histogram / distribution accumulator: exact count (weighted by
/// `1 / sample rate`), sum, min and max, and a [`Sketch`] for percentiles
/// and mergeable buckets (see [`super::sketch`] for the precision, range and
/// memory).
///
/// A positive value's bucket index waits in a queue beside the exact
/// fields, and the queue goes into the sketch [`QUEUE`] at a time (or when
/// the weight changes): a value then costs the cache lines of this struct,
/// instead of a search through the sketch's buckets elsewhere on the heap.
/// The buckets are the same, bit for bit, as a value-by-value sketch's.
/// `repr(C)` keeps the fields a value writes in the struct's first 128
/// bytes.
#[derive(Debug)]
#[repr(C)]
pub struct DistAcc {
    /// Sum of the weights: `@0.75` counts 4/3.
    pub count: f64,
    /// Sum of value × weight.
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Raw values received (before sample-rate scaling).
    pub samples: u64,
    /// The weight of every queued index.
    queued_weight: f64,
    queued_len: u32,
    /// Bucket indexes of positive values not yet in the sketch.
    queued: [i32; QUEUE],
    sketch: Sketch,
}

/// Bucket indexes a [`DistAcc`] queues before they go into its sketch.
pub const QUEUE: usize = 19;
const _: () = assert!(QUEUE <= sketch::BATCH);

impl Default for DistAcc {
    fn default() -> Self {
        DistAcc {
            count: 0.0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            samples: 0,
            queued_weight: 0.0,
            queued_len: 0,
            queued: [0; QUEUE],
            sketch: Sketch::default(),
        }
    }
}

/// What a flushed distribution row holds beyond count/sum/min/max.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    /// Mergeable buckets: each bucket's value, ascending...
    pub bucket_values: Vec<f64>,
    /// ...and the weight of the values that fell in it.
    pub bucket_counts: Vec<f64>,
}

impl DistAcc {
    /// Records a finite value seen with the given sample rate (in (0, 1],
    /// with a finite inverse, as the parser guarantees). Returns the bytes
    /// the accumulator grew by, or `None` (and records nothing) when the sum
    /// or the count would pass the range of `f64`.
    pub fn record(&mut self, value: f64, sample_rate: f64) -> Option<u64> {
        // Most lines have no sample rate: no division for them.
        let weight = if sample_rate == 1.0 {
            1.0
        } else {
            1.0 / sample_rate
        };
        let sum = self.sum + value * weight;
        let count = self.count + weight;
        if !sum.is_finite() || !count.is_finite() {
            return None;
        }
        let grew = if value >= f64::MIN_POSITIVE {
            self.queue(sketch::index(value), weight)
        } else {
            self.sketch.add(value, weight)
        };
        self.count = count;
        self.sum = sum;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.samples += 1;
        Some(grew)
    }

    /// Queues bucket `index` with weight `w`, first emptying the queue into
    /// the sketch when it is full or holds another weight; returns the
    /// bytes the sketch grew by.
    fn queue(&mut self, index: i32, w: f64) -> u64 {
        let mut grew = 0;
        let len = self.queued_len as usize;
        if len == QUEUE || (len > 0 && w.to_bits() != self.queued_weight.to_bits()) {
            grew = self.drain();
        }
        self.queued[self.queued_len as usize] = index;
        self.queued_len += 1;
        self.queued_weight = w;
        grew
    }

    /// Adds the queued indexes to the sketch; returns the bytes it grew by.
    fn drain(&mut self) -> u64 {
        let len = self.queued_len as usize;
        self.queued_len = 0;
        self.sketch
            .add_positive(&self.queued[..len], self.queued_weight)
    }

    /// Merges another accumulator's state of the same key and interval
    /// (forwarded by an edge): weighted count, sum, min, max, raw samples,
    /// and buckets as (bucket value, weight). Returns the bytes it grew
    /// by, or `None` (nothing changed) when the sum or the count would pass
    /// the range of `f64`.
    pub fn merge(
        &mut self,
        [count, sum, min, max]: [f64; 4],
        samples: u64,
        buckets: impl Iterator<Item = (f64, f64)>,
    ) -> Option<u64> {
        let (sum, count) = (self.sum + sum, self.count + count);
        if !sum.is_finite() || !count.is_finite() {
            return None;
        }
        (self.sum, self.count) = (sum, count);
        self.min = self.min.min(min);
        self.max = self.max.max(max);
        self.samples = self.samples.saturating_add(samples);
        Some(
            buckets
                .filter(|&(v, w)| v.is_finite() && w.is_finite() && w > 0.0)
                .map(|(v, w)| self.sketch.add_bucket(v, w))
                .sum(),
        )
    }

    /// Percentiles (within the sketch's 1 %, clamped to the exact min and
    /// max) and buckets, the queued values added first.
    pub fn summarize(&mut self) -> Summary {
        self.drain();
        let mut summary = Summary::default();
        self.summarize_into(&mut summary);
        summary
    }

    /// [`DistAcc::summarize`] into `out`, reusing its buffers. The values
    /// still queued are read into the buckets without going into the
    /// sketch where [`Sketch::buckets_with_queued`] can (the same buckets
    /// and weights; a flush reads each timer once).
    pub fn summarize_into(&mut self, out: &mut Summary) {
        let queued = &self.queued[..self.queued_len as usize];
        let (values, counts) = (&mut out.bucket_values, &mut out.bucket_counts);
        if !self
            .sketch
            .buckets_with_queued(queued, self.queued_weight, values, counts)
        {
            self.drain();
            self.sketch.buckets_into(values, counts);
        }
        [out.p50, out.p90, out.p95, out.p99] = sketch::quantiles(
            &out.bucket_values,
            &out.bucket_counts,
            [0.50, 0.90, 0.95, 0.99],
        )
        .map(|q| q.map_or(0.0, |v| v.clamp(self.min, self.max)));
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

impl SetAcc {
    /// Merges forwarded member hashes and raw samples; returns the bytes
    /// the set grew by and how many new members were refused (past
    /// `max_members`).
    pub fn merge(
        &mut self,
        hashes: impl Iterator<Item = u64>,
        samples: u64,
        max_members: usize,
    ) -> (u64, u64) {
        self.samples = self.samples.saturating_add(samples);
        let (mut grew, mut refused) = (0, 0);
        for h in hashes {
            if self.members.len() >= max_members && !self.members.contains(&h) {
                refused += 1;
            } else if self.members.insert(h) {
                grew += SET_MEMBER;
            }
        }
        (grew, refused)
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
            (4.0, 10.0, 1.0, 4.0, 4)
        );
    }

    #[test]
    fn dist_count_and_sum_are_weighted_by_exactly_one_over_the_rate() {
        let mut h = DistAcc::default();
        h.record(10.0, 0.4);
        h.record(10.0, 0.4);
        assert_eq!((h.count, h.sum, h.samples), (5.0, 50.0, 2));
        let mut t = DistAcc::default();
        for _ in 0..4 {
            t.record(10.0, 0.75);
        }
        assert!((t.count - 16.0 / 3.0).abs() < 1e-12, "{}", t.count);
        let mut tiny = DistAcc::default();
        tiny.record(1.0, 1e-19);
        tiny.record(1.0, 1e-19);
        assert_eq!(tiny.count, 2e19, "no integer to overflow");
        let s = tiny.summarize();
        assert_eq!(s.bucket_counts.iter().sum::<f64>(), 2e19);
    }

    #[test]
    fn dist_quantiles_within_one_percent() {
        let mut d = DistAcc::default();
        for v in 1..=1000 {
            d.record(v as f64, 1.0);
        }
        let s = d.summarize();
        for (got, want) in [(s.p50, 500.0), (s.p90, 900.0), (s.p99, 990.0)] {
            assert!((got - want).abs() / want <= 0.01, "{got} vs {want}");
        }
    }

    #[test]
    fn dist_buckets_sum_to_count_and_negative_values_have_their_own() {
        let mut d = DistAcc::default();
        for v in [0.5, 0.5, 3.0, 250.0, -2.0, 0.0] {
            d.record(v, 1.0);
        }
        let s = d.summarize();
        assert_eq!(s.bucket_counts.iter().sum::<f64>(), 6.0);
        assert!(s.bucket_values.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((d.min, d.max), (-2.0, 250.0));
        assert_eq!(s.bucket_values[1], 0.0);
    }

    #[test]
    fn a_timer_reports_its_growth_and_a_crafted_line_stays_small() {
        let mut d = DistAcc::default();
        // The line that cost 46 KB with the HDR histogram: 64 small values
        // (in distinct buckets) and one near 4.5e12; then 19 more, so that
        // the queue takes them all into the sketch.
        let values = (1..=64)
            .map(|k| 1.1f64.powi(k))
            .chain([4.5e12])
            .chain([1.0; 19]);
        let grew: u64 = values.filter_map(|v| d.record(v, 1.0)).sum();
        assert_eq!(grew, d.sketch.bytes(), "all the growth is reported");
        assert!(
            grew > 16 * 64 && grew <= 8 * 2048,
            "dense and bounded: {grew}"
        );
        let again: u64 = (0..40).filter_map(|_| d.record(4.5e12, 1.0)).sum();
        assert_eq!(again, 0, "no new bucket");
    }

    proptest::proptest! {
        /// The queue changes when a value reaches the sketch, never what it
        /// holds: after a drain, the sketch equals a value-by-value one (the
        /// same stores, sparse or dense, offsets and weights bit for bit),
        /// through the turn to dense and the collapse of the lowest buckets,
        /// and the growth reported never exceeds the bytes it holds.
        #[test]
        fn a_queued_timer_has_the_sketch_of_a_value_by_value_one(
            runs in proptest::collection::vec(
                (0usize..4, 1usize..40, 0u8..4, 0.0f64..1.0), 0..30),
        ) {
            let mut d = DistAcc::default();
            let mut plain = Sketch::default();
            let mut grew = 0;
            let mut n = 0u64;
            for (r, &(rate, len, range, seed)) in runs.iter().enumerate() {
                // Each run keeps one sample rate (as a client's call site
                // does), so the queue fills; the ranges reach sparse, dense
                // and collapsed stores, negative values and zero.
                let rate = [1.0, 0.75, 0.5, 0.1][rate];
                for k in 0..len {
                    n += 1;
                    let x = (seed + k as f64 * 0.618_034).fract();
                    let v = match range {
                        0 => 1e-3 + x,
                        1 => (x * 1000.0).trunc(),
                        2 => 10f64.powf(600.0 * x - 300.0),
                        _ => -10f64.powf(12.0 * x - 6.0) * f64::from(u8::from(k % 5 != 0)),
                    };
                    grew += d.record(v, rate).expect("finite");
                    plain.add(v, 1.0 / rate);
                }
                if r % 3 == 2 || r + 1 == runs.len() {
                    // The flush's read, queued values merged on the fly,
                    // equals the read after a drain, bit for bit.
                    let mut fast = Summary::default();
                    d.summarize_into(&mut fast);
                    let s = d.summarize();
                    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    proptest::prop_assert_eq!(bits(&fast.bucket_values), bits(&s.bucket_values));
                    proptest::prop_assert_eq!(bits(&fast.bucket_counts), bits(&s.bucket_counts));
                    proptest::prop_assert_eq!(
                        bits(&[fast.p50, fast.p90, fast.p95, fast.p99]),
                        bits(&[s.p50, s.p90, s.p95, s.p99])
                    );
                    proptest::prop_assert_eq!(&d.sketch, &plain);
                    let (pv, _) = plain.buckets();
                    proptest::prop_assert_eq!(s.bucket_values, pv);
                    proptest::prop_assert!(grew <= d.sketch.bytes());
                }
            }
            proptest::prop_assert_eq!(d.samples, n);
        }
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
    fn member_hash_is_clickhouse_siphash64() {
        // SELECT sipHash64('hello') on ClickHouse.
        assert_eq!(member_hash(b"hello"), 10_142_490_492_830_962_361);
    }
}
