//! Unit tests of [`super`].

use super::*;

#[test]
fn quantiles_in_one_pass_agree_with_one_pass_each() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let qs = [0.0, 0.5, 0.9, 0.95, 0.99, 1.0];
    for _ in 0..2_000 {
        let n = (next() % 40) as usize;
        let values: Vec<f64> = (0..n).map(|i| i as f64).collect();
        // Some zero weights, as a merge can leave.
        let weights: Vec<f64> = (0..n).map(|_| (next() % 5) as f64 * 0.5).collect();
        let all = quantiles(&values, &weights, qs);
        for (q, got) in qs.iter().zip(all) {
            assert_eq!(
                got,
                quantile_reference(&values, &weights, *q),
                "q {q} over {weights:?}"
            );
        }
    }
}

fn sketch(values: &[(f64, f64)]) -> Sketch {
    let mut s = Sketch::default();
    for &(v, w) in values {
        s.add(v, w);
    }
    s
}

fn q(s: &Sketch, q: f64) -> f64 {
    let (v, w) = s.buckets();
    quantile(&v, &w, q).expect("not empty")
}

fn within(got: f64, want: f64) -> bool {
    (got - want).abs() <= RELATIVE_ACCURACY * want.abs()
}

#[test]
fn every_value_from_1e_minus_300_to_1e300_is_within_one_percent() {
    let mut v = 1e-300;
    while v < 1e300 {
        for x in [v, -v] {
            let got = q(&sketch(&[(x, 1.0)]), 0.5);
            assert!(within(got, x), "{x}: {got}");
        }
        v *= 7.3;
    }
}

#[test]
fn sub_millisecond_seconds_and_hour_long_nanoseconds_keep_their_percentiles() {
    let s = sketch(&[(0.0001, 1.0), (0.0004, 1.0), (0.0004, 1.0)]);
    assert!(within(q(&s, 0.5), 0.0004), "{}", q(&s, 0.5));
    assert!(within(q(&s, 0.0), 0.0001));
    let n = sketch(&[(3.6e12, 1.0), (7.2e12, 1.0), (7.2e12, 1.0)]);
    assert!(within(q(&n, 0.5), 7.2e12) && within(q(&n, 0.99), 7.2e12));
}

#[test]
fn zero_and_negative_values_sort_below_positive_ones() {
    let s = sketch(&[(-5.0, 1.0), (0.0, 1.0), (3.0, 1.0), (-0.5, 1.0)]);
    let (values, weights) = s.buckets();
    assert!(values.windows(2).all(|p| p[0] < p[1]), "{values:?}");
    assert_eq!(weights, vec![1.0; 4]);
    assert!(within(q(&s, 0.25), -5.0));
    assert_eq!(q(&s, 0.75), 0.0);
}

#[test]
fn weights_are_exact_fractions() {
    let s = sketch(&[(10.0, 1.0 / 0.75); 4]);
    let (_, w) = s.buckets();
    assert!((w.iter().sum::<f64>() - 16.0 / 3.0).abs() < 1e-12);
}

#[test]
fn a_store_turns_dense_and_collapses_its_lowest_buckets_past_the_limit() {
    let mut s = Sketch::default();
    let mut grew = 0;
    for k in 0..SPARSE as i32 {
        grew += s.add(bucket_value(k * 10), 1.0);
    }
    assert_eq!(grew, 16 * SPARSE as u64);
    grew += s.add(1e300, 1.0);
    assert_eq!(grew, s.bytes());
    assert_eq!(s.bytes(), 8 * MAX_BINS as u64, "bounded");
    let (values, weights) = s.buckets();
    assert_eq!(weights.iter().sum::<f64>(), SPARSE as f64 + 1.0);
    assert!(within(*values.last().expect("top"), 1e300));
    assert!(within(q(&s, 1.0), 1e300));
}

#[test]
fn merged_batches_keep_a_sparse_store_within_its_64_buckets() {
    let mut s = Sketch::default();
    let mut grew = 0;
    for batch in (0..SPARSE as i32).collect::<Vec<_>>().chunks(19) {
        grew += s.add_positive(batch, 1.0);
        assert!(s.bytes() <= 16 * SPARSE as u64, "{}", s.bytes());
    }
    assert_eq!((grew, s.positive.len()), (s.bytes(), SPARSE));
    assert!(matches!(s.positive, Store::Sparse(_)));
}

#[test]
fn the_largest_values_have_finite_buckets() {
    let (values, _) = sketch(&[(f64::MAX, 1.0), (-1e308, 1.0), (8.9e307, 1.0)]).buckets();
    assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
}

#[test]
fn tabled_bucket_values_are_the_computed_ones_bit_for_bit() {
    for i in (-TABLED - 3..TABLED + 3).chain([i32::MIN / 2, -38_000, 38_000]) {
        assert_eq!(
            bucket_value(i).to_bits(),
            compute_bucket_value(i).to_bits(),
            "{i}"
        );
    }
}

#[test]
fn bucket_values_are_the_same_for_every_key_and_merge_by_equality() {
    let a = sketch(&[(12.5, 1.0)]).buckets().0;
    let b = sketch(&[(12.49, 1.0)]).buckets().0;
    assert_eq!(a, b, "one bucket, one value, bit for bit");
}

#[test]
fn every_buckets_value_finds_its_bucket_again() {
    for i in -40_000..40_000 {
        let v = bucket_value(i);
        if (f64::MIN_POSITIVE..f64::MAX).contains(&v) {
            assert_eq!(index_of_value(v), i, "bucket {i}, value {v:e}");
        }
    }
}
