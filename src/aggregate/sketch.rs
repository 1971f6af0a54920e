//! The distribution sketch of timers, histograms and distributions: a
//! DDSketch (Masson, Rim, Lee, "DDSketch: A Fast and Fully-Mergeable
//! Quantile Sketch with Relative-Error Guarantees", VLDB 2019), which is
//! also what DogStatsD distributions are defined with.
//!
//! # The rule
//!
//! With relative accuracy `α` = [`RELATIVE_ACCURACY`] (1 %), `γ = (1 + α) /
//! (1 − α)`. A value `v > 0` falls in bucket `i = ⌈ln v / ln γ⌉`, which holds
//! `(γ^(i−1), γ^i]`; the bucket's value is `2 γ^i / (γ + 1)`, within `α` of
//! every value in it. Negative values go to a mirrored store by `|v|`;
//! zero (and anything smaller in magnitude than `f64::MIN_POSITIVE`) to a
//! zero bucket. So any finite value, from 1e-300 to 1e300, keeps 1 %
//! relative precision, and a bucket's value depends on the bucket alone:
//! rows of any key, flush and host merge by adding the weights of equal
//! bucket values (`sumMap` in ClickHouse).
//!
//! # Weights and memory
//!
//! Each value carries a weight (`1 / sample rate`, a float: `@0.75` counts
//! 4/3). A store keeps up to [`SPARSE`] buckets as a sorted list of (index,
//! weight), 16 bytes each, then turns dense: one 8-byte weight per bucket
//! between its lowest and highest index, at most [`MAX_BINS`] of them. Past
//! that the lowest buckets collapse into one (the paper's
//! collapsing-lowest store): the upper percentiles keep their precision and
//! memory stays bounded, at most 2 × 8 × [`MAX_BINS`] = 32 KiB per key for a
//! key whose values span more than 17 orders of magnitude on both signs
//! (γ^2048 ≈ 4e17). A typical latency key (1 ms to 10 s) uses about 460
//! buckets, 3.7 KB, once it has seen more than 64 distinct buckets.

/// `α`: every percentile is within this fraction of a value that was sent.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// Buckets a store keeps as a sorted list before it turns dense.
pub const SPARSE: usize = 64;
/// Most buckets of a dense store; past it the lowest collapse.
pub const MAX_BINS: usize = 2048;
/// Most indexes [`Sketch::add_positive`] merges at once.
pub const BATCH: usize = 32;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

/// The bucket of `v` (> 0).
pub fn index(v: f64) -> i32 {
    // |ln v| ≤ 745 for every positive finite f64, so this is within ±38,000.
    (v.ln() / gamma().ln()).ceil() as i32
}

/// The bucket whose value ([`bucket_value`]) is `v` (> 0): [`index`] of
/// it, or a neighbour where rounding in `ln`/`exp` put the value on a
/// bucket's edge. A value that is no bucket's goes where [`index`] puts it.
pub fn index_of_value(v: f64) -> i32 {
    let i = index(v);
    [i, i.saturating_sub(1), i.saturating_add(1)]
        .into_iter()
        .find(|&j| bucket_value(j).to_bits() == v.to_bits())
        .unwrap_or(i)
}

/// The value of bucket `i`: `2 γ^i / (γ + 1)`, at most `f64::MAX` (the
/// top bucket's value would pass it for values near 1.8e308). Buckets of
/// values from about 1e-18 to 1e18 come from a table computed once (32
/// KiB), the others are computed each time: the same bits either way. The
/// `exp` per bucket was most of a timer's flush.
pub fn bucket_value(i: i32) -> f64 {
    static TABLE: std::sync::OnceLock<Box<[f64]>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (-TABLED..TABLED).map(compute_bucket_value).collect());
    match usize::try_from(i + TABLED) {
        Ok(at) if at < table.len() => table[at],
        _ => compute_bucket_value(i),
    }
}

/// Bucket indexes `-TABLED..TABLED` have their value in a table.
const TABLED: i32 = 2048;

fn compute_bucket_value(i: i32) -> f64 {
    // The two logarithms once, not per bucket (the same values, so the
    // same bits as computing them each time).
    static LN: std::sync::OnceLock<(f64, f64)> = std::sync::OnceLock::new();
    let &(ln_gamma, ln_offset) = LN.get_or_init(|| {
        let g = gamma();
        (g.ln(), (2.0 / (g + 1.0)).ln())
    });
    (f64::from(i) * ln_gamma + ln_offset).exp().min(f64::MAX)
}

/// One sign's buckets.
#[derive(Debug, Clone, PartialEq)]
enum Store {
    /// (index, weight), ascending by index.
    Sparse(Vec<(i32, f64)>),
    /// `weights[k]` is bucket `offset + k`.
    Dense { offset: i32, weights: Vec<f64> },
}

impl Default for Store {
    fn default() -> Self {
        Store::Sparse(Vec::new())
    }
}

impl Store {
    /// Adds `w` to bucket `i`; returns the bytes the store grew by.
    fn add(&mut self, i: i32, w: f64) -> u64 {
        match self {
            Store::Sparse(list) => match list.binary_search_by_key(&i, |&(k, _)| k) {
                Ok(at) => {
                    list[at].1 += w;
                    0
                }
                Err(at) if list.len() < SPARSE => {
                    let before = list.capacity();
                    list.insert(at, (i, w));
                    16 * list.capacity().saturating_sub(before) as u64
                }
                Err(_) => {
                    let before = 16 * list.capacity() as u64;
                    let mut dense = Store::Dense {
                        offset: list[0].0,
                        weights: Vec::new(),
                    };
                    for &(k, v) in list.iter().chain([(i, w)].iter()) {
                        dense.add(k, v);
                    }
                    *self = dense;
                    self.bytes().saturating_sub(before)
                }
            },
            Store::Dense { offset, weights } => {
                let before = weights.capacity();
                let lo = i64::from(*offset);
                let hi = lo + weights.len() as i64 - 1;
                let i64_i = i64::from(i);
                if weights.is_empty() {
                    *offset = i;
                    weights.push(w);
                } else if i64_i < lo {
                    let room = MAX_BINS.saturating_sub(weights.len());
                    let grow = ((lo - i64_i) as usize).min(room);
                    if grow > 0 {
                        reserve(weights, weights.len() + grow);
                        weights.splice(0..0, std::iter::repeat_n(0.0, grow));
                        *offset -= grow as i32;
                    }
                    // Collapsed into the lowest bucket kept when there is no
                    // more room.
                    let at = (i64_i - i64::from(*offset)).max(0) as usize;
                    weights[at] += w;
                } else if i64_i > hi {
                    // The lowest bucket kept once `i` is in: buckets below
                    // it collapse into it (never a vector longer than
                    // MAX_BINS, even for a jump across the whole range).
                    let keep_from = (i64_i - MAX_BINS as i64 + 1).max(lo);
                    if keep_from > lo {
                        let cut = ((keep_from - lo) as usize).min(weights.len());
                        let collapsed: f64 = weights.drain(..cut).sum();
                        *offset = keep_from as i32;
                        if weights.is_empty() {
                            weights.push(0.0);
                        }
                        weights[0] += collapsed;
                    }
                    let len = (i64_i - i64::from(*offset) + 1) as usize;
                    reserve(weights, len);
                    weights.resize(len, 0.0);
                    weights[len - 1] += w;
                } else {
                    weights[(i64_i - lo) as usize] += w;
                }
                8 * weights.capacity().saturating_sub(before) as u64
            }
        }
    }

    /// Adds `w` to bucket `i` for each `i` of `sorted` (ascending, repeats
    /// allowed) in one merge from the back, instead of a search and an
    /// insert per index, when the store is sparse and stays so; returns the
    /// bytes it grew by, or `None` (and nothing changed) otherwise. The same
    /// buckets and weights, bit for bit, as [`Store::add`] of each in turn:
    /// a bucket's weights are added in the same order.
    fn merge_sparse(&mut self, sorted: &[i32], w: f64) -> Option<u64> {
        let Store::Sparse(list) = self else {
            return None;
        };
        let len = list.len() + new_buckets(list, sorted);
        if len > SPARSE {
            return None;
        }
        let before = list.capacity();
        if len > before {
            // Doubling as inserts would, but never past SPARSE entries.
            list.reserve_exact((before * 2).clamp(len, SPARSE) - list.len());
        }
        let mut read = list.len();
        list.resize(len, (0, 0.0));
        let mut write = len;
        let mut rest = sorted;
        while let Some((&i, _)) = rest.split_last() {
            let run = rest.iter().rev().take_while(|&&k| k == i).count();
            rest = &rest[..rest.len() - run];
            while read > 0 && list[read - 1].0 > i {
                read -= 1;
                write -= 1;
                list[write] = list[read];
            }
            let mut weight = if read > 0 && list[read - 1].0 == i {
                read -= 1;
                list[read].1 + w
            } else {
                w
            };
            for _ in 1..run {
                weight += w;
            }
            write -= 1;
            list[write] = (i, weight);
        }
        Some(16 * list.capacity().saturating_sub(before) as u64)
    }

    fn bytes(&self) -> u64 {
        match self {
            Store::Sparse(list) => 16 * list.capacity() as u64,
            Store::Dense { weights, .. } => 8 * weights.capacity() as u64,
        }
    }

    /// Each bucket with weight, ascending by index, to `f` (nothing
    /// copied).
    fn each(&self, mut f: impl FnMut(i32, f64)) {
        match self {
            Store::Sparse(list) => list.iter().for_each(|&(i, w)| f(i, w)),
            Store::Dense { offset, weights } => {
                for (k, &w) in weights.iter().enumerate() {
                    if w > 0.0 {
                        f(offset + k as i32, w);
                    }
                }
            }
        }
    }

    /// How many buckets have weight.
    fn len(&self) -> usize {
        match self {
            Store::Sparse(list) => list.len(),
            Store::Dense { weights, .. } => weights.iter().filter(|w| **w > 0.0).count(),
        }
    }
}

/// How many distinct indexes of `sorted` (ascending, repeats allowed) a
/// sparse `list` (ascending by index) does not hold yet.
fn new_buckets(list: &[(i32, f64)], sorted: &[i32]) -> usize {
    let mut new = 0;
    let mut at = 0;
    for (k, &i) in sorted.iter().enumerate() {
        if k > 0 && sorted[k - 1] == i {
            continue;
        }
        while at < list.len() && list[at].0 < i {
            at += 1;
        }
        if at == list.len() || list[at].0 != i {
            new += 1;
        }
    }
    new
}

/// Makes room for `len` weights: doubling, but never past [`MAX_BINS`]
/// (so the bytes the store reports are the bytes it holds).
fn reserve(weights: &mut Vec<f64>, len: usize) {
    if len > weights.capacity() {
        let target = (weights.capacity() * 2).clamp(len, MAX_BINS.max(len));
        weights.reserve_exact(target - weights.len());
    }
}

/// A DDSketch with float weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    positive: Store,
    negative: Store,
    zero: f64,
}

impl Sketch {
    /// Adds finite `v` with weight `w` (> 0); returns the bytes the sketch
    /// grew by.
    pub fn add(&mut self, v: f64, w: f64) -> u64 {
        if v.abs() < f64::MIN_POSITIVE {
            self.zero += w;
            0
        } else if v > 0.0 {
            self.positive.add(index(v), w)
        } else {
            self.negative.add(index(-v), w)
        }
    }

    /// Adds weight `w` to the bucket of every positive value whose bucket
    /// [`index`] is in `indexes`, in that order (at most [`BATCH`]; more
    /// are added one by one); returns the bytes the sketch grew by. The
    /// same sketch, bit for bit, as [`Sketch::add`] of each value in turn:
    /// a sparse store that stays sparse takes them sorted, in one merge;
    /// otherwise they go in one by one, in the order given (collapsed
    /// buckets' float sums depend on it).
    pub fn add_positive(&mut self, indexes: &[i32], w: f64) -> u64 {
        let mut sorted = [0; BATCH];
        if let Some(sorted) = sorted.get_mut(..indexes.len()) {
            sorted.copy_from_slice(indexes);
            sorted.sort_unstable();
            if let Some(grew) = self.positive.merge_sparse(sorted, w) {
                return grew;
            }
        }
        indexes.iter().map(|&i| self.positive.add(i, w)).sum()
    }

    /// Adds weight `w` (> 0) to the bucket whose value (what a row's
    /// `bucket_values` holds, [`Sketch::buckets`]) is `v`: a forwarded
    /// sketch merged into this one. Returns the bytes the sketch grew by.
    pub fn add_bucket(&mut self, v: f64, w: f64) -> u64 {
        if v.abs() < f64::MIN_POSITIVE {
            self.zero += w;
            0
        } else if v > 0.0 {
            self.positive.add(index_of_value(v), w)
        } else {
            self.negative.add(index_of_value(-v), w)
        }
    }

    /// Bytes the buckets use.
    pub fn bytes(&self) -> u64 {
        self.positive.bytes() + self.negative.bytes()
    }

    /// (bucket values ascending, their weights): what a row stores.
    pub fn buckets(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut values, mut weights) = (Vec::new(), Vec::new());
        self.buckets_into(&mut values, &mut weights);
        (values, weights)
    }

    /// [`Sketch::buckets`] into `values` and `weights` (emptied first), so
    /// that a flush reuses two buffers for every key.
    pub fn buckets_into(&self, values: &mut Vec<f64>, weights: &mut Vec<f64>) {
        let done = self.buckets_with_queued(&[], 0.0, values, weights);
        debug_assert!(done, "nothing queued: always done");
    }

    /// [`Sketch::buckets_into`] of this sketch with weight `w` added for
    /// each positive bucket index in `queued` (at most [`BATCH`]), as
    /// [`Sketch::add_positive`] would add it, without changing the sketch:
    /// the same buckets and weights, bit for bit (a bucket's weights are
    /// added in the same order as [`Store::merge_sparse`] adds them). Only
    /// where that merge applies (a sparse store that stays sparse); false,
    /// and nothing written, otherwise. A flush reads a timer once: this
    /// spares it growing and shifting the store's list for the last
    /// values queued.
    pub fn buckets_with_queued(
        &self,
        queued: &[i32],
        w: f64,
        values: &mut Vec<f64>,
        weights: &mut Vec<f64>,
    ) -> bool {
        let mut sorted = [0; BATCH];
        let Some(sorted) = sorted.get_mut(..queued.len()) else {
            return false;
        };
        sorted.copy_from_slice(queued);
        sorted.sort_unstable();
        let list = match &self.positive {
            _ if sorted.is_empty() => None,
            Store::Sparse(list) => {
                if list.len() + new_buckets(list, sorted) > SPARSE {
                    return false;
                }
                Some(list)
            }
            Store::Dense { .. } => return false,
        };
        values.clear();
        weights.clear();
        let n =
            self.negative.len() + usize::from(self.zero > 0.0) + self.positive.len() + sorted.len();
        values.reserve(n);
        weights.reserve(n);
        // Negative values ascend as their indexes descend.
        self.negative.each(|i, w| {
            values.push(-bucket_value(i));
            weights.push(w);
        });
        values[..].reverse();
        weights[..].reverse();
        if self.zero > 0.0 {
            values.push(0.0);
            weights.push(self.zero);
        }
        let mut push = |i: i32, weight: f64| {
            values.push(bucket_value(i));
            weights.push(weight);
        };
        let Some(list) = list else {
            self.positive.each(push);
            return true;
        };
        let (mut a, mut b) = (0, 0);
        while a < list.len() || b < sorted.len() {
            match (list.get(a), sorted.get(b)) {
                (Some(&(i, weight)), q) if q.is_none_or(|&q| i < q) => {
                    push(i, weight);
                    a += 1;
                }
                (l, Some(&q)) => {
                    let run = sorted[b..].iter().take_while(|&&k| k == q).count();
                    let mut weight = match l {
                        Some(&(i, existing)) if i == q => {
                            a += 1;
                            existing + w
                        }
                        _ => w,
                    };
                    for _ in 1..run {
                        weight += w;
                    }
                    push(q, weight);
                    b += run;
                }
                (_, None) => break,
            }
        }
        true
    }
}

/// The `q`-quantile of buckets (values ascending, weights): the value of the
/// first bucket whose cumulative weight reaches `q` × the total. `None`
/// without weight. Used for a flushed key and for rows merged from buckets,
/// so both give the same answer for the same buckets.
pub fn quantile(values: &[f64], weights: &[f64], q: f64) -> Option<f64> {
    quantiles(values, weights, [q])[0]
}

/// [`quantile`] for each of `qs` (ascending), in one pass over the buckets.
pub fn quantiles<const N: usize>(
    values: &[f64],
    weights: &[f64],
    qs: [f64; N],
) -> [Option<f64>; N] {
    let mut out = [None; N];
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return out;
    }
    let mut next = 0;
    let mut seen = 0.0;
    let mut last = None;
    for (v, w) in values.iter().zip(weights) {
        seen += w;
        last = Some(*v);
        while next < N && seen >= qs[next].clamp(0.0, 1.0) * total && *w > 0.0 {
            out[next] = last;
            next += 1;
        }
        if next == N {
            return out;
        }
    }
    for o in &mut out[next..] {
        *o = last;
    }
    out
}

/// [`quantile`] as it was written first, one pass per `q`: what
/// [`quantiles`] must agree with.
#[cfg(test)]
fn quantile_reference(values: &[f64], weights: &[f64], q: f64) -> Option<f64> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let target = q.clamp(0.0, 1.0) * total;
    let mut seen = 0.0;
    let mut last = None;
    for (v, w) in values.iter().zip(weights) {
        seen += w;
        last = Some(*v);
        if seen >= target && *w > 0.0 {
            return last;
        }
    }
    last
}

#[cfg(test)]
mod tests;
