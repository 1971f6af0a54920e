//! Ingest cost per sample (parse + canonical key + map merge) at 1k, 100k and
//! 1M live keys, on one and two threads, per datagram and per batch of
//! datagrams, and the flush's cost per key (a
//! closed interval of counters encoded as RowBinary bodies):
//! `cargo bench --bench aggregate`. Subtract the `parse/*_with_key` figure
//! to get the aggregation alone. Before the benches it prints the memory
//! cost per live key.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use tallyd::aggregate::{AggregateLimits, Aggregator, Generation, Scratch};
use tallyd::outbox::rows;
use tallyd::protocol::statsd::Limits;
use tallyd::telemetry::BlockStats;

const LINES_PER_BLOCK: usize = 40;
/// Datagrams a UDP worker applies together when they queue up (its batch).
const DATAGRAMS_PER_BATCH: usize = 16;

fn aggregator() -> Aggregator {
    Aggregator::new(
        AggregateLimits {
            max_keys: 10_000_000,
            max_set_members: 100_000,
            max_depth: u64::MAX,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    )
}

/// Datagram-sized blocks that visit every key once, in a scattered order.
fn blocks(keys: usize, line: fn(usize) -> String) -> Vec<Vec<u8>> {
    let stride = 7919; // prime: visits every key when keys is not a multiple
    let mut order: Vec<usize> = (0..keys).map(|i| (i * stride) % keys).collect();
    order.dedup();
    order
        .chunks(LINES_PER_BLOCK)
        .map(|c| {
            c.iter()
                .map(|&k| line(k) + "\n")
                .collect::<String>()
                .into_bytes()
        })
        .collect()
}

fn counter_line(k: usize) -> String {
    format!("app.counter.k{k:07}:1|c")
}

/// A timer key with 30 values, each in a bucket of its own (5 % apart, the
/// sketch's buckets 2 % wide).
fn timer_line(k: usize) -> String {
    let values: Vec<String> = (0..30).map(|j| format!("{:.3}", 1.05f64.powi(j))).collect();
    format!("app.timer.k{k:07}:{}|ms", values.join(":"))
}

fn ingest_all(a: &Aggregator, blocks: &[Vec<u8>], scratch: &mut Scratch) {
    let mut stats = BlockStats::default();
    for b in blocks {
        a.ingest_block(black_box(b), scratch, &mut stats);
    }
}

/// The blocks joined as a UDP worker joins queued datagrams: each followed
/// by `\n`, with their ranges.
fn batches(blocks: &[Vec<u8>]) -> Vec<(Vec<u8>, Vec<std::ops::Range<usize>>)> {
    blocks
        .chunks(DATAGRAMS_PER_BATCH)
        .map(|c| {
            let (mut joined, mut ranges) = (Vec::new(), Vec::new());
            for b in c {
                ranges.push(joined.len()..joined.len() + b.len());
                joined.extend_from_slice(b);
                joined.push(b'\n');
            }
            (joined, ranges)
        })
        .collect()
}

fn ingest_batches(
    a: &Aggregator,
    batches: &[(Vec<u8>, Vec<std::ops::Range<usize>>)],
    scratch: &mut Scratch,
) {
    let mut stats = BlockStats::default();
    for (joined, ranges) in batches {
        a.ingest_datagrams(black_box(joined), ranges, scratch, &mut stats);
    }
}

fn aggregate(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    for keys in [1_000usize, 100_000, 1_000_000] {
        let data = blocks(keys, counter_line);
        let a = aggregator();
        ingest_all(&a, &data, &mut Scratch::default()); // keys are live
        g.throughput(Throughput::Elements(keys as u64));
        let mut scratch = Scratch::default();
        g.bench_function(format!("counters_{keys}_keys_1_thread"), |b| {
            b.iter(|| ingest_all(&a, &data, &mut scratch))
        });
        let batches = batches(&data);
        g.bench_function(format!("counters_{keys}_keys_1_thread_batched"), |b| {
            b.iter(|| ingest_batches(&a, &batches, &mut scratch))
        });
        let a = Arc::new(a);
        let halves: Vec<Arc<Vec<Vec<u8>>>> = data
            .chunks(data.len().div_ceil(2))
            .map(|c| Arc::new(c.to_vec()))
            .collect();
        g.bench_function(format!("counters_{keys}_keys_2_threads"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let threads: Vec<_> = halves
                    .iter()
                    .map(|half| {
                        let (a, half) = (Arc::clone(&a), Arc::clone(half));
                        std::thread::spawn(move || {
                            let mut scratch = Scratch::default();
                            for _ in 0..iters {
                                ingest_all(&a, &half, &mut scratch);
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().expect("bench thread");
                }
                start.elapsed()
            })
        });
        // The same from a fresh interval: every key is new once.
        g.bench_function(format!("counters_{keys}_keys_2_threads_new_keys"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    drop(a.swap(Duration::ZERO));
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for half in &halves {
                            let a = &a;
                            s.spawn(move || ingest_all(a, half, &mut Scratch::default()));
                        }
                    });
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    let mixed = blocks(10_000, |k| match k % 4 {
        0 => format!("app.c.k{k:06}:1|c|#env:prod"),
        1 => format!("app.g.k{k:06}:{}|g", k % 100),
        2 => format!("app.ms.k{k:06}:{}|ms", k % 1000),
        _ => format!("app.s.k{k:06}:u{}|s", k % 50),
    });
    let a = aggregator();
    ingest_all(&a, &mixed, &mut Scratch::default());
    g.throughput(Throughput::Elements(10_000));
    let mut scratch = Scratch::default();
    g.bench_function("mixed_10000_keys_1_thread", |b| {
        b.iter(|| ingest_all(&a, &mixed, &mut scratch))
    });
    let mixed_batches = batches(&mixed);
    g.bench_function("mixed_10000_keys_1_thread_batched", |b| {
        b.iter(|| ingest_batches(&a, &mixed_batches, &mut scratch))
    });
    // Timers as statsd-blast sends them, values uniform in 0..1000 ms, one
    // interval of 400,000 lines: 2,000 keys get 200 values each (a sketch
    // turns dense after about 70, its first 64 buckets, and ends with about
    // 200 buckets); 10,000 keys get 40 each and stay sparse (the 10k mixed
    // workload at 2 M lines/s).
    let mut seed = 42u64;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    for keys in [2_000, 10_000] {
        let timers: Vec<Vec<u8>> = (0..10_000)
            .map(|_| {
                (0..LINES_PER_BLOCK)
                    .map(|_| format!("app.ms.k{:05}:{}|ms\n", next(keys), next(1_000)))
                    .collect::<String>()
                    .into_bytes()
            })
            .collect();
        let timer_batches = batches(&timers);
        let a = aggregator();
        g.throughput(Throughput::Elements((10_000 * LINES_PER_BLOCK) as u64));
        g.bench_function(
            format!("timers_{keys}_keys_1_thread_batched_one_interval"),
            |b| {
                b.iter_batched(
                    || drop(a.swap(Duration::ZERO)),
                    |()| ingest_batches(&a, &timer_batches, &mut scratch),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

/// Counts live heap bytes, for the memory figure.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most `LIVE` has been since it was last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(live, Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn memory_per_key() {
    let keys = 100_000;
    for (name, line) in [
        ("counter", counter_line as fn(usize) -> String),
        ("gauge", |k| format!("app.gauge.k{k:07}:{}|g", k % 100)),
        ("timer, 1 value", |k| {
            format!("app.timer.k{k:07}:{}|ms", k % 1000)
        }),
        ("timer, 100 values 1..100 (about 100 buckets)", |k| {
            let values: Vec<String> = (1..=100).map(|v| v.to_string()).collect();
            format!("app.timer.k{k:07}:{}|ms", values.join(":"))
        }),
        ("timer, 100 values 1 ms..10 s (460 buckets)", |k| {
            let values: Vec<String> = (0..100)
                .map(|i| format!("{:.3}", 10f64.powf(f64::from(i) * 4.0 / 99.0)))
                .collect();
            format!("app.timer.k{k:07}:{}|ms", values.join(":"))
        }),
        ("timer, 30 values in 30 buckets", timer_line),
        ("set, 1 member", |k| format!("app.set.k{k:07}:u|s")),
    ] {
        let keys = if name.contains("100 values") {
            keys / 100
        } else {
            keys
        };
        let data = blocks(keys, line);
        let a = aggregator();
        let before = LIVE.load(Relaxed);
        ingest_all(&a, &data, &mut Scratch::default());
        let after = LIVE.load(Relaxed);
        println!(
            "memory: {name}: {} bytes per live key ({keys} keys)",
            (after - before) / keys
        );
    }
}

/// The heap a spool merge takes beyond its two flushes (the spool past its
/// budget folds each new flush into the newest parked one).
fn merge_memory() {
    let keys = 1_000_000;
    let data = blocks(keys, counter_line);
    let flush = |id| {
        let mut gauges = tallyd::outbox::gauges::GaugeMemory::new(0);
        rows::build(
            closed_interval(keys, &data),
            id,
            "host-a",
            1,
            &mut gauges,
            &mut || 0,
            Default::default(),
        )
        .0
    };
    let (older, newer) = (flush(1), flush(2));
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let merged = older.merge(newer).expect("merges");
    let peak = PEAK.load(Relaxed) - before;
    println!(
        "memory: merging two flushes of {keys} counter keys ({} MB of bodies each): peak {} MB above them",
        merged.body_len() / 1_000_000,
        peak / 1_000_000
    );
}

/// A closed interval holding `keys` keys.
fn closed_interval(keys: usize, data: &[Vec<u8>]) -> Generation {
    let a = aggregator();
    ingest_all(&a, data, &mut Scratch::default());
    let old = a.swap(Duration::from_secs(1));
    let generation = Arc::try_unwrap(old).expect("no other holder");
    assert_eq!(generation.keys(), keys);
    generation
}

/// The flush of a closed interval to RowBinary, as the flush loop runs it:
/// into the previous flush's buffers (`Bodies::recycle`). `_fresh_buffers`:
/// into new ones, as the first flush after a start or an idle interval.
fn flush(c: &mut Criterion) {
    let mut g = c.benchmark_group("flush");
    g.sample_size(10);
    for (name, keys, line, recycled) in [
        (
            "counters",
            100_000usize,
            counter_line as fn(usize) -> String,
            true,
        ),
        ("counters", 100_000, counter_line, false),
        ("counters", 1_000_000, counter_line, true),
        ("timers_30_buckets", 100_000, timer_line, true),
        ("timers_30_buckets", 100_000, timer_line, false),
        ("timers_30_buckets", 1_000_000, timer_line, true),
    ] {
        let data = blocks(keys, line);
        let spare = std::cell::RefCell::new(tallyd::outbox::rowbinary::Bodies::default());
        let fresh = if recycled { "" } else { "_fresh_buffers" };
        g.throughput(Throughput::Elements(keys as u64));
        g.bench_function(format!("{name}_{keys}_keys_to_rowbinary{fresh}"), |b| {
            b.iter_batched(
                || (closed_interval(keys, &data), spare.take()),
                |(generation, spare_bodies)| {
                    let mut gauges = tallyd::outbox::gauges::GaugeMemory::new(keys);
                    let (flush, forgotten) = rows::build(
                        generation,
                        1,
                        "host-a",
                        1,
                        &mut gauges,
                        &mut || 2,
                        spare_bodies,
                    );
                    black_box(forgotten);
                    if recycled {
                        *spare.borrow_mut() = flush.tables;
                        None
                    } else {
                        // Dropped after the timing, as before.
                        Some(flush)
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, aggregate, flush);

fn main() {
    memory_per_key();
    merge_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
