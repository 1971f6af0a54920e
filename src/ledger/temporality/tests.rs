//! Unit tests of [`super`].

use super::*;
use crate::fs::{Fault, FaultyFs, RealFs};
use crate::protocol::otlp::metrics::exponential_histogram_data_point::Buckets;
use crate::protocol::otlp::metrics::{
    ExponentialHistogramDataPoint as Expo, HistogramDataPoint, SummaryDataPoint,
};
use crate::test_dir::{TestDir, test_dir};
use Verdict::{Decrease, Full, Reference, Retry, Whole};

/// tallyd's start in these tests, Unix nanoseconds.
const STARTED: u64 = 1_000;
/// A series' start before tallyd's: it ran before tallyd could see it.
const EARLY: u64 = 500;
/// A budget nothing reaches.
const ANY: u64 = u64::MAX;
const SERIES: u64 = SERIES_BYTES;

fn open(dir: &Path) -> Temporality {
    Temporality::open(dir, STARTED, Arc::new(RealFs)).expect("open")
}

/// A state of its own in a fresh directory.
fn fresh() -> (TestDir, Temporality) {
    let dir = test_dir("otlp-series");
    let s = open(&dir);
    (dir, s)
}

fn refused(dir: &Path) -> io::ErrorKind {
    let e = Temporality::open(dir, STARTED, Arc::new(RealFs)).err();
    e.expect("refused").kind()
}

/// Series `series`' cumulative point, of the kind of its value (a number:
/// a monotonic Sum).
fn pt(series: u128, start: u64, time: u64, value: Value<'_>) -> Point<'_> {
    let kind = match value {
        Value::Number(_) => Kind::MonotonicSum,
        Value::Histogram(_) => Kind::Histogram,
        Value::Exponential(_) => Kind::ExponentialHistogram,
        Value::Summary(_) => Kind::Summary,
    };
    let (name, host, tags, temporality) = ("m", None, &[][..], T::Cumulative);
    Point {
        series,
        name,
        host,
        tags,
        kind,
        temporality,
        start,
        time,
        value,
    }
}

/// `p` as a point of `kind` and temporality `temporality`.
fn as_(kind: Kind, temporality: T, mut p: Point<'_>) -> Point<'_> {
    (p.kind, p.temporality) = (kind, temporality);
    p
}

fn counter(series: u128, start: u64, time: u64, v: f64) -> Point<'static> {
    pt(series, start, time, Value::Number(v))
}

/// A delta Sum's point.
fn delta(series: u128, start: u64, time: u64) -> Point<'static> {
    let p = counter(series, start, time, 1.0);
    as_(Kind::MonotonicSum, T::Delta, p)
}

/// A histogram point; `sum` a number or `None`.
fn histogram(
    count: u64,
    sum: impl Into<Option<f64>>,
    bounds: &[f64],
    counts: &[u64],
) -> HistogramDataPoint {
    let (explicit_bounds, bucket_counts, sum) = (bounds.to_vec(), counts.to_vec(), sum.into());
    HistogramDataPoint {
        count,
        sum,
        explicit_bounds,
        bucket_counts,
        ..Default::default()
    }
}

/// An exponential histogram, its count the sum of its buckets.
fn expo(scale: i32, zero_count: u64, pos: (i32, &[u64]), neg: (i32, &[u64]), sum: f64) -> Expo {
    let count = zero_count + pos.1.iter().sum::<u64>() + neg.1.iter().sum::<u64>();
    let side = |(offset, c): (i32, &[u64])| {
        Some(Buckets {
            offset,
            bucket_counts: c.to_vec(),
        })
    };
    let (positive, negative, sum) = (side(pos), side(neg), Some(sum));
    Expo {
        count,
        sum,
        scale,
        zero_count,
        positive,
        negative,
        ..Default::default()
    }
}

fn number(d: f64) -> Verdict {
    Verdict::Delta(Delta::Number(d))
}

fn hist(count: u64, sum: impl Into<Option<f64>>, counts: &[u64]) -> Verdict {
    let (counts, sum) = (counts.to_vec(), sum.into());
    Verdict::Delta(Delta::Histogram { count, sum, counts })
}

fn exp(count: u64, sum: f64, zero: u64, pos: (i32, &[u64]), neg: (i32, &[u64])) -> Verdict {
    let (positive, negative) = ((pos.0, pos.1.to_vec()), (neg.0, neg.1.to_vec()));
    Verdict::Delta(Delta::Exponential {
        count,
        sum: Some(sum),
        zero,
        positive,
        negative,
    })
}

/// Judges `p` as a request of its own and commits it if it moves its series.
fn take(state: &Temporality, p: &Point<'_>) -> Verdict {
    let mut g = state.lock();
    let v = g.judge(p, ANY);
    if v.moves() {
        g.stage(p);
    }
    g.commit();
    v
}

/// Takes each point in turn, checking its verdict.
fn script(state: &Temporality, steps: &[(Point<'_>, Verdict)]) {
    for (i, (p, want)) in steps.iter().enumerate() {
        assert_eq!(&take(state, p), want, "step {i}: {p:?}");
    }
}

/// Judges `p` without moving anything.
fn peek(state: &Temporality, p: &Point<'_>) -> Verdict {
    state.lock().judge(p, ANY)
}

fn written(state: &Temporality) -> StateWrite {
    let w = state.snapshot();
    state.write(&w).expect("write");
    w
}

/// The `Chunk` of the one record `bytes` hold.
fn chunk(bytes: &[u8]) -> Chunk {
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    assert_eq!(len, bytes.len() - 8, "one record");
    Chunk::decode(&bytes[8..]).expect("a chunk")
}

#[test]
fn a_point_that_stands_alone_is_whole_and_one_at_or_before_the_last_time_a_retry() {
    let steps = [
        (delta(1, 100, 200), Whole), // although it started before tallyd
        (delta(1, 100, 200), Retry), // the same point again
        (delta(1, 50, 150), Retry),  // an earlier window
        (delta(1, 200, 300), Whole), // the next window
        (delta(1, 100, 400), Retry), // an older start
        (delta(1, 300, 400), Whole),
    ];
    script(&fresh().1, &steps);
    let gauge = |time| as_(Kind::Gauge, T::Delta, counter(7, 0, time, 3.0));
    let steps = [
        (gauge(500), Whole),
        (gauge(400), Retry),
        (gauge(500), Retry),
    ];
    script(&fresh().1, &steps);
    // A cumulative non-monotonic Sum is a value: never a reference, and
    // a lower one no decrease.
    let sum = |start, time, v| as_(Kind::Sum, T::Cumulative, counter(3, start, time, v));
    let steps = [
        (sum(EARLY, 2_000, 5.0), Whole),
        (sum(EARLY, 3_000, 2.0), Whole),
        (sum(EARLY, 3_000, 4.0), Retry),
        (sum(EARLY - 1, 4_000, 4.0), Retry), // an older start
    ];
    script(&fresh().1, &steps);
}

#[test]
fn a_first_cumulative_point_is_a_reference_if_its_series_started_before_tallyd_else_whole() {
    let (_dir, s) = fresh();
    let steps = [
        (counter(1, EARLY, 1_500, 10.0), Reference),
        (counter(2, STARTED, 1_500, 10.0), Reference), // at tallyd's start
        (counter(3, 0, 1_500, 10.0), Reference),       // an unknown start
        (counter(4, STARTED + 1, 1_500, 10.0), Whole),
    ];
    script(&s, &steps);
    assert_eq!(s.size(), (4, 4 * SERIES));
}

#[test]
fn a_cumulative_counter_is_the_exact_delta_since_its_last_point_until_a_newer_start() {
    let steps = [
        (counter(1, EARLY, 2_000, 10.5), Reference),
        (counter(1, EARLY, 3_000, 17.75), number(7.25)),
        (counter(1, EARLY, 3_000, 20.0), Retry), // the same time
        (counter(1, EARLY, 2_500, 30.0), Retry), // an earlier time
        (counter(1, EARLY, 4_000, 17.75), number(0.0)),
        (counter(1, EARLY, 5_000, 18.0), number(0.25)),
        (counter(1, 1_800, 6_000, 5.0), Whole),   // a reset
        (counter(1, EARLY, 7_000, 200.0), Retry), // an older start
        (counter(1, 1_800, 7_000, 9.0), number(4.0)),
    ];
    script(&fresh().1, &steps);
}

#[test]
fn a_lower_cumulative_value_with_the_same_start_is_a_decrease_and_the_next_delta_is_from_it() {
    let steps = [
        (counter(1, EARLY, 2_000, 10.0), Reference),
        (counter(1, EARLY, 3_000, 4.0), Decrease),
        (counter(1, EARLY, 3_000, 4.0), Retry), // the state moved to it
        (counter(1, EARLY, 4_000, 6.0), number(2.0)),
    ];
    script(&fresh().1, &steps);
}

#[test]
fn a_cumulative_summary_becomes_the_delta_of_its_count_and_sum() {
    let summary = |count, sum| SummaryDataPoint {
        count,
        sum,
        ..Default::default()
    };
    let (a, b) = (summary(4, 10.0), summary(7, 16.5));
    let at = |time, v| pt(1, EARLY, time, Value::Summary(v));
    let steps = [
        (at(2_000, &a), Reference),
        (at(3_000, &b), hist(3, 6.5, &[])),
    ];
    script(&fresh().1, &steps);
}

#[test]
fn a_cumulative_histogram_becomes_exact_per_bucket_deltas_and_changed_bounds_a_decrease() {
    let (_dir, s) = fresh();
    let at = |time, h| pt(1, EARLY, time, Value::Histogram(h));
    let a = histogram(6, 10.0, &[1.0, 5.0], &[1, 2, 3]);
    let b = histogram(10, 22.5, &[1.0, 5.0], &[2, 5, 3]);
    // A bucket goes down, although the count and the sum go up.
    let c = histogram(11, 23.0, &[1.0, 5.0], &[3, 4, 4]);
    // The same counts, other bounds; then a delta from them.
    let d = histogram(11, 23.0, &[1.0, 10.0], &[3, 4, 4]);
    let e = histogram(13, 24.0, &[1.0, 10.0], &[4, 4, 5]);
    script(&s, &[(at(2_000, &a), Reference)]);
    assert_eq!(s.size(), (1, SERIES + 3 * 8));
    let steps = [
        (at(3_000, &b), hist(4, 12.5, &[1, 3, 0])),
        (at(4_000, &c), Decrease),
        (at(5_000, &d), Decrease),
        (at(6_000, &e), hist(2, 1.0, &[1, 0, 1])),
    ];
    script(&s, &steps);
}

#[test]
fn a_histogram_delta_has_a_sum_only_when_both_points_have_one() {
    let at = |time, h| pt(1, EARLY, time, Value::Histogram(h));
    let a = histogram(3, None, &[1.0], &[1, 2]);
    let b = histogram(5, None, &[1.0], &[2, 3]);
    let c = histogram(6, 4.0, &[1.0], &[2, 4]);
    let d = histogram(7, 6.5, &[1.0], &[3, 4]);
    let steps = [
        (at(2_000, &a), Reference),
        (at(3_000, &b), hist(2, None, &[1, 1])),
        (at(4_000, &c), hist(1, None, &[0, 1])),
        (at(5_000, &d), hist(1, 2.5, &[1, 0])),
    ];
    script(&fresh().1, &steps);
}

#[test]
fn an_exponential_histogram_at_the_same_scale_gives_bucket_deltas_over_shifted_offsets() {
    let at = |time, e| pt(1, EARLY, time, Value::Exponential(e));
    // Positive buckets 3..=4, then 2..=5; negative -1, then -2..=-1.
    let a = expo(2, 1, (3, &[1, 2]), (-1, &[4]), 10.0);
    let b = expo(2, 3, (2, &[1, 1, 5, 1]), (-2, &[0, 6]), 25.0);
    let ab = exp(9, 15.0, 2, (2, &[1, 0, 3, 1]), (-2, &[0, 2]));
    // Buckets 2 and 3 held counts and are gone, although the count went up.
    let c = expo(2, 3, (4, &[6, 10]), (-2, &[0, 6]), 30.0);
    let steps = [
        (at(2_000, &a), Reference),
        (at(3_000, &b), ab),
        (at(4_000, &c), Decrease),
    ];
    script(&fresh().1, &steps);
}

#[test]
fn a_downscaled_exponential_histogram_is_compared_with_the_last_one_merged_to_its_scale() {
    let at = |time, e| pt(1, EARLY, time, Value::Exponential(e));
    // Scale 3: positive indices -3..=1, negative 1..=2.
    let a = expo(3, 0, (-3, &[1, 2, 3, 4, 5]), (1, &[2, 3]), 1.0);
    // Scale 2, 1 down: index i goes to i >> 1, so a is positive -3→-2,
    // -2→-1, -1→-1, 0→0, 1→0: (-2, [1, 5, 9]); negative 1→0, 2→1: (0, [2, 3]).
    let b = expo(2, 0, (-2, &[2, 7, 9, 1]), (0, &[3, 3]), 2.0);
    let ab = exp(5, 1.0, 0, (-2, &[1, 2, 0, 1]), (0, &[1, 0]));
    // Scale 0, 2 down: i goes to i >> 2, so b is positive -2→-1, -1→-1,
    // 0→0, 1→0: (-1, [9, 10]); negative 0→0, 1→0: (0, [6]).
    let c = expo(0, 0, (-2, &[1, 9, 12]), (0, &[7]), 4.0);
    let bc = exp(4, 2.0, 0, (-2, &[1, 0, 2]), (0, &[1]));
    let steps = [
        (at(2_000, &a), Reference),
        (at(3_000, &b), ab),
        (at(4_000, &c), bc),
    ];
    script(&fresh().1, &steps);
}

#[test]
fn an_upscaled_exponential_histogram_with_the_same_start_is_a_decrease() {
    let at = |time, e| pt(1, EARLY, time, Value::Exponential(e));
    let a = expo(2, 0, (0, &[1, 1]), (0, &[]), 1.0);
    let b = expo(3, 5, (0, &[2, 2, 2, 2]), (0, &[]), 9.0);
    script(
        &fresh().1,
        &[(at(2_000, &a), Reference), (at(3_000, &b), Decrease)],
    );
}

#[test]
fn an_exponential_scale_far_below_the_last_one_is_a_decrease_not_an_overflow() {
    let at = |time, e| pt(1, EARLY, time, Value::Exponential(e));
    let a = expo(20, 0, (0, &[1]), (0, &[]), 1.0);
    let b = expo(i32::MIN, 0, (0, &[2]), (0, &[]), 2.0);
    script(
        &fresh().1,
        &[(at(2_000, &a), Reference), (at(3_000, &b), Decrease)],
    );
}

#[test]
fn a_second_point_of_a_series_in_one_request_is_judged_against_the_first_staged_one() {
    let (_dir, s) = fresh();
    let a = counter(1, EARLY, 2_000, 10.0);
    let b = counter(1, EARLY, 3_000, 15.0);
    let mut g = s.lock();
    assert_eq!(g.judge(&a, ANY), Reference);
    g.stage(&a);
    assert_eq!(g.judge(&b, ANY), number(5.0));
    g.stage(&b);
    assert_eq!(g.judge(&b, ANY), Retry); // b twice in one request
    let staged: Vec<(u128, u64)> = g.staged().map(|m| (m.series(), m.time)).collect();
    assert_eq!(staged, [(1, 3_000)]); // b's mark replaced a's
    assert_eq!(g.size(), (0, 0)); // nothing applied before the commit
    g.commit();
    assert_eq!(s.size(), (1, SERIES));
    script(&s, &[(counter(1, EARLY, 4_000, 16.0), number(1.0))]);
}

#[test]
fn a_guard_dropped_without_its_commit_leaves_the_state_as_it_was() {
    let (_dir, s) = fresh();
    script(&s, &[(counter(1, EARLY, 2_000, 10.0), Reference)]);
    let b = counter(1, EARLY, 3_000, 15.0);
    let mut g = s.lock();
    assert_eq!(g.judge(&b, ANY), number(5.0));
    g.stage(&b);
    g.stage(&delta(2, 0, 3_000));
    drop(g);
    assert_eq!(s.size(), (1, SERIES));
    script(&s, &[(b, number(5.0)), (delta(2, 0, 3_000), Whole)]); // neither a retry
}

#[test]
fn a_new_series_past_the_budget_is_full_and_a_known_one_is_still_judged() {
    let (_dir, s) = fresh();
    script(&s, &[(delta(1, 0, 200), Whole)]);
    let mut g = s.lock();
    assert_eq!(g.judge(&delta(2, 0, 100), 2 * SERIES - 1), Full);
    assert_eq!(g.judge(&delta(2, 0, 100), 2 * SERIES), Whole); // exactly at it
    assert_eq!(g.judge(&delta(1, 0, 300), 0), Whole); // a known series, at any budget
    assert_eq!(g.judge(&delta(1, 0, 100), 0), Retry);
    g.stage(&delta(2, 0, 100));
    // A new series staged in the same request counts.
    assert_eq!(g.judge(&delta(3, 0, 100), 3 * SERIES - 1), Full);
    assert_eq!(g.judge(&delta(3, 0, 100), 3 * SERIES), Whole);
    g.commit();
    assert_eq!(s.size(), (2, 2 * SERIES));
    assert!(!Full.moves() && !Retry.moves() && Decrease.moves() && Reference.moves());
}

#[test]
fn a_state_written_and_reopened_gives_the_same_verdicts() {
    let (dir, s) = fresh();
    let at = |time, h| pt(3, EARLY, time, Value::Histogram(h));
    let a = histogram(3, None, &[1.0], &[1, 2]); // no sum: none in the delta either
    let b = histogram(5, 4.0, &[1.0], &[2, 3]);
    let c = counter(1, EARLY, 2_000, 10.0);
    script(
        &s,
        &[
            (c, Reference),
            (delta(2, 0, 2_000), Whole),
            (at(2_000, &a), Reference),
        ],
    );
    let StateWrite::Rewrite(file) = written(&s) else {
        panic!("the first write makes the file")
    };
    assert_eq!(std::fs::read(dir.join(FILE)).expect("read"), file);
    drop(s);
    let s = open(&dir);
    assert_eq!(s.size(), (3, 3 * SERIES + 2 * 8));
    let c = counter(1, EARLY, 3_000, 12.5);
    let h = hist(2, None, &[1, 1]);
    script(
        &s,
        &[
            (c, number(2.5)),
            (delta(2, 0, 2_000), Retry),
            (at(3_000, &b), h),
        ],
    );
}

#[test]
fn marks_replayed_from_the_wal_twice_change_nothing() {
    let (_dir, s) = fresh();
    let a = counter(1, EARLY, 2_000, 10.0);
    let b = counter(1, EARLY, 3_000, 15.0);
    let next = counter(1, EARLY, 4_000, 16.0);
    script(&s, &[(a.clone(), Reference)]);
    let mut g = s.lock();
    assert_eq!(g.judge(&b, ANY), number(5.0));
    g.stage(&b);
    let marks: Vec<Mark> = g.staged().cloned().collect();
    assert_eq!(marks, [mark(&b)]);
    g.commit();
    for m in marks.iter().chain(&marks).chain([&mark(&a)]) {
        s.observe(m.clone());
    }
    assert_eq!((peek(&s, &next), s.size()), (number(1.0), (1, SERIES))); // not back to a
    // A restart before the state was written: the WAL's marks alone.
    let (_other, r) = fresh();
    for m in marks.iter().chain(&marks) {
        r.observe(m.clone());
    }
    assert_eq!((peek(&r, &next), peek(&r, &b)), (number(1.0), Retry));
    assert_eq!(r.size(), (1, SERIES));
}

#[test]
fn a_snapshot_after_a_rewrite_appends_only_the_series_moved_since() {
    let (dir, s) = fresh();
    script(&s, &[(delta(1, 0, 100), Whole), (delta(2, 0, 100), Whole)]);
    let StateWrite::Rewrite(file) = written(&s) else {
        panic!("the first write makes the file")
    };
    script(&s, &[(delta(2, 0, 200), Whole)]);
    let StateWrite::Append(record) = written(&s) else {
        panic!("an append")
    };
    let (c, m) = (chunk(&record), mark(&delta(2, 0, 200)));
    assert_eq!((c.now, c.marks), (3, vec![Mark { seen: 2, ..m }]));
    let on_disk = std::fs::read(dir.join(FILE)).expect("read");
    assert_eq!(on_disk, [file, record].concat());
    drop(s);
    let s = open(&dir);
    assert_eq!(peek(&s, &delta(1, 0, 100)), Retry);
    assert_eq!(peek(&s, &delta(2, 0, 200)), Retry); // the appended mark
    assert_eq!(peek(&s, &delta(2, 0, 201)), Whole);
}

#[test]
fn the_file_is_rewritten_as_one_record_once_an_append_would_take_it_past_twice_64_kib() {
    let (dir, s) = fresh();
    let path = dir.join(FILE);
    const N: u128 = 100;
    // Times from 2^60: each mark's varints keep their length, so every
    // append of all the series is the same size.
    let base = 1u64 << 60;
    let move_all = |round: u64| {
        for n in 1..=N {
            assert_eq!(take(&s, &delta(n, base, base + round)), Whole);
        }
    };
    move_all(0);
    assert!(matches!(written(&s), StateWrite::Rewrite(_)));
    let (mut appended, limit) = (None, 2 * COMPACT_FLOOR as usize);
    for round in 1..100 {
        move_all(round);
        let before = std::fs::metadata(&path).expect("stat").len() as usize;
        match written(&s) {
            StateWrite::Append(record) => {
                assert!(before + record.len() <= limit);
                assert_eq!(*appended.get_or_insert(record.len()), record.len());
            }
            StateWrite::Rewrite(all) => {
                let each = appended.take().expect("appends before the rewrite");
                assert!(before + each > limit, "{before} + {each}");
                assert_eq!(std::fs::read(&path).expect("read"), all);
                assert_eq!(chunk(&all[HEADER..]).marks.len(), N as usize);
                break;
            }
        }
    }
    assert_eq!(appended, None, "never rewritten");
    move_all(1_000);
    assert!(matches!(written(&s), StateWrite::Append(_)));
    drop(s);
    let s = open(&dir);
    assert_eq!(s.size(), (N as usize, N as u64 * SERIES));
    assert_eq!(peek(&s, &delta(N, base, base + 1_000)), Retry);
}

/// A file of two records, series 1 in the first and 2 in the second;
/// returns the first record's end.
fn two_records(dir: &Path) -> usize {
    let s = open(dir);
    script(&s, &[(delta(1, 0, 100), Whole)]);
    let StateWrite::Rewrite(first) = written(&s) else {
        panic!("a rewrite first")
    };
    script(&s, &[(delta(2, 0, 100), Whole)]);
    assert!(matches!(written(&s), StateWrite::Append(_)));
    first.len()
}

#[test]
fn a_torn_last_record_is_cut_off_at_open_and_the_records_before_it_kept() {
    let dir = test_dir("otlp-series");
    let path = dir.join(FILE);
    let good = two_records(&dir);
    let full = std::fs::read(&path).expect("read");
    let mut flipped = full.clone();
    *flipped.last_mut().expect("bytes") ^= 0x40; // whole, but does not check
    let cuts = [
        &full[..full.len() - 3],
        &full[..good + 5],
        &full[..good + 1],
        &flipped[..],
    ];
    for bytes in cuts {
        std::fs::write(&path, bytes).expect("tear");
        let s = open(&dir);
        let cut = std::fs::metadata(&path).expect("stat").len() as usize;
        assert_eq!((cut, s.size()), (good, (1, SERIES)), "{bytes:?}");
        assert_eq!(peek(&s, &delta(1, 0, 100)), Retry);
        script(&s, &[(delta(2, 0, 100), Whole)]); // lost with its record
        assert!(matches!(written(&s), StateWrite::Append(_))); // the length is known
        assert_eq!(open(&dir).size().0, 2);
    }
}

#[test]
fn a_record_that_does_not_check_with_a_record_after_it_is_invalid_data() {
    let dir = test_dir("otlp-series");
    let path = dir.join(FILE);
    two_records(&dir);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[HEADER + 8] ^= 0x01;
    std::fs::write(&path, &bytes).expect("damage");
    assert_eq!(refused(&dir), io::ErrorKind::InvalidData);
    assert_eq!(std::fs::read(&path).expect("read"), bytes); // left as it was
}

#[test]
fn a_file_without_the_magic_or_version_1_is_invalid_data_and_a_bare_header_no_series() {
    let dir = test_dir("otlp-series");
    let path = dir.join(FILE);
    let (mut wrong_magic, mut wrong_version) = (header(), header());
    wrong_magic[0] = b'X';
    wrong_version[8] = 2;
    for bytes in [wrong_magic, wrong_version, b"TALLY".to_vec()] {
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(refused(&dir), io::ErrorKind::InvalidData, "{bytes:?}");
    }
    std::fs::write(&path, header()).expect("write");
    let s = open(&dir);
    assert_eq!(s.size(), (0, 0));
    assert!(matches!(s.snapshot(), StateWrite::Append(_))); // a header is a file
}

#[test]
fn a_series_without_a_point_for_more_than_its_window_is_forgotten() {
    let (_dir, s) = fresh();
    s.set_window(2);
    let steps = [
        (counter(1, EARLY, 2_000, 10.0), Reference),
        (counter(2, EARLY, 2_000, 10.0), Reference),
    ];
    script(&s, &steps);
    s.snapshot();
    script(&s, &[(counter(2, EARLY, 3_000, 11.0), number(1.0))]);
    s.snapshot();
    assert_eq!(s.size().0, 2); // series 1: two snapshots without a point
    s.snapshot();
    // The third forgets series 1's value; its start and time stay as a
    // tombstone.
    assert_eq!(s.size(), (2, 2 * SERIES));
    // The same run of it resumes: only a reference, never counted whole
    // (it started after tallyd did); a retry is still a retry.
    let late = STARTED + 1;
    script(&s, &[(counter(3, late, 2_000, 5.0), Whole)]);
    for _ in 0..3 {
        s.snapshot();
    }
    assert_eq!(peek(&s, &counter(3, late, 2_000, 9.0)), Retry);
    script(&s, &[(counter(3, late, 5_000, 9.0), Reference)]);
    script(&s, &[(counter(3, late, 6_000, 10.0), number(1.0))]);
    // A new run of a forgotten series counts whole.
    script(&s, &[(counter(1, late, 4_000, 20.0), Whole)]);
    // Tombstones go after 24 windows without a point.
    for _ in 0..60 {
        s.snapshot();
    }
    assert_eq!(s.size(), (0, 0));
    assert_eq!(peek(&s, &counter(2, EARLY, 7_000, 12.0)), Reference);
}

#[test]
fn the_state_s_epoch_is_its_first_start_so_a_series_born_while_tallyd_was_down_counts_whole() {
    let dir = test_dir("otlp-series");
    let s = open(&dir);
    script(&s, &[(counter(1, STARTED + 1, 2_000, 5.0), Whole)]);
    written(&s);
    // A restart later: a series that began between the two starts was
    // never seen, so all of it counts.
    let s = Temporality::open(&dir, STARTED + 10_000, Arc::new(RealFs)).expect("reopen");
    assert_eq!(peek(&s, &counter(2, STARTED + 5_000, 12_000, 7.0)), Whole);
    assert_eq!(peek(&s, &counter(3, EARLY, 12_000, 7.0)), Reference);
}

#[test]
fn a_snapshot_not_written_or_a_failed_write_makes_the_next_one_a_rewrite_of_every_series() {
    let dir = test_dir("otlp-series");
    let fs = Arc::new(FaultyFs::default());
    let s = Temporality::open(&dir, STARTED, fs.clone()).expect("open");
    script(&s, &[(delta(1, 0, 100), Whole)]);
    assert!(matches!(written(&s), StateWrite::Rewrite(_)));
    script(&s, &[(delta(2, 0, 100), Whole)]);
    assert!(matches!(s.snapshot(), StateWrite::Append(_)));
    s.write_failed();
    script(&s, &[(delta(3, 0, 100), Whole)]);
    let StateWrite::Rewrite(all) = written(&s) else {
        panic!("a rewrite")
    };
    let marks = chunk(&all[HEADER..]).marks;
    let mut series: Vec<u128> = marks.iter().map(Mark::series).collect();
    series.sort_unstable();
    assert_eq!(series, [1, 2, 3]);
    script(&s, &[(delta(4, 0, 100), Whole)]);
    fs.arm(FILE, Fault::SyncFails);
    let w = s.snapshot();
    assert!(matches!(w, StateWrite::Append(_)) && s.write(&w).is_err());
    fs.heal();
    assert!(matches!(written(&s), StateWrite::Rewrite(_)));
    assert_eq!(open(&dir).size().0, 4);
}

#[test]
fn a_series_resuming_after_its_tombstone_went_is_a_reference_by_the_horizon() {
    let dir = test_dir("otlp-series");
    let s = open(&dir);
    s.set_window(1);
    let late = STARTED + 1;
    script(&s, &[(counter(1, late, 2_000, 5.0), Whole)]);
    // Forgotten after a window, its tombstone gone after 24 more.
    for _ in 0..30 {
        written(&s);
    }
    assert_eq!(s.size(), (0, 0));
    // The same run resumes: it may have been counted, so a reference; a
    // run that began after the tombstone's last point counts whole.
    assert_eq!(peek(&s, &counter(1, late, 9_000, 9.0)), Reference);
    assert_eq!(peek(&s, &counter(2, 2_500, 9_000, 9.0)), Whole);
    // The horizon is kept in the file.
    let s = open(&dir);
    assert_eq!(peek(&s, &counter(1, late, 9_000, 9.0)), Reference);
}
