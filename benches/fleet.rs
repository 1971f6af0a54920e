//! The fleet tier's pieces, per key: an edge encoding a closed interval's
//! rows as batches of forwarded state (`forward/encode_*`), and an
//! aggregator merging them into an interval that holds the keys already
//! (`aggregator/merge_*`: protobuf decode, key, lookup and merge, as its
//! protobuf listener runs them, without the WAL and the socket): `cargo
//! bench --bench fleet`. Elements are keys.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group};
use tallyd::aggregate::{AggregateLimits, Aggregator, Scratch};
use tallyd::forward::encode::{self, Shape};
use tallyd::outbox::rowbinary::Bodies;
use tallyd::outbox::{gauges::GaugeMemory, rows};
use tallyd::protocol::batch::BatchView;
use tallyd::protocol::statsd::Limits;
use tallyd::telemetry::BlockStats;

fn aggregator() -> Aggregator {
    Aggregator::new(
        AggregateLimits {
            max_keys: 10_000_000,
            max_set_members: 100_000,
            max_depth: u64::MAX,
            max_memory: u64::MAX,
            timestamp_window: Duration::from_secs(3600),
            interval: Duration::from_secs(1),
        },
        Limits::default(),
        Duration::from_secs(1_000),
    )
}

/// An edge's flush bodies of `keys` keys made by `line`.
fn edge_rows(keys: usize, line: fn(usize) -> String) -> Bodies {
    let a = aggregator();
    let mut scratch = Scratch::default();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(40) {
        let block: String = chunk.iter().map(|&k| line(k) + "\n").collect();
        a.ingest_block(block.as_bytes(), &mut scratch, &mut BlockStats::default());
    }
    let g = Arc::try_unwrap(a.swap(Duration::from_secs(1_001))).expect("unique");
    let (flush, _) = rows::build(
        g,
        1 << 20,
        "edge-1",
        1,
        &mut GaugeMemory::new(keys),
        &mut || 2 << 20,
        Default::default(),
    );
    flush.tables
}

fn counter_line(k: usize) -> String {
    format!("app.counter.k{k:07}:1|c|#env:prod")
}

/// A timer key with 30 values in 30 buckets.
fn timer_line(k: usize) -> String {
    let values: Vec<String> = (0..30)
        .map(|i| format!("{}", 1.05f64.powi(i) * 10.0))
        .collect();
    format!("app.timer.k{k:07}:{}|ms", values.join(":"))
}

fn shape(upstreams: &[String], keep_host: bool) -> Shape<'_> {
    Shape {
        upstreams,
        lost: &[],
        client_id: "tallyd-edge/0000000000000001/edge-1",
        flush_id: 1 << 20,
        host: "edge-1",
        keep_host,
        host_except: &[],
        batch_size: 1 << 20,
    }
}

fn fleet(c: &mut Criterion) {
    let upstreams = vec!["agg:8126".to_string()];
    let mut g = c.benchmark_group("fleet");
    g.sample_size(10);
    for (name, keys, line) in [
        (
            "counters",
            100_000usize,
            counter_line as fn(usize) -> String,
        ),
        ("timers_30_buckets", 10_000, timer_line),
    ] {
        let rows = edge_rows(keys, line);
        g.throughput(Throughput::Elements(keys as u64));
        g.bench_function(format!("forward/encode_{name}_{keys}_keys"), |b| {
            b.iter(|| black_box(encode::frames(&rows, &shape(&upstreams, true)).expect("frames")))
        });
        for (mode, keep) in [("keep", true), ("drop", false)] {
            let framed = encode::frames(&rows, &shape(&upstreams, keep)).expect("frames");
            let frames: Vec<&[u8]> = framed[0]
                .frames
                .iter()
                .map(|f| {
                    let (prefix, _) = tallyd::protocol::proto::frame_header(f, usize::MAX)
                        .expect("frame")
                        .expect("whole");
                    &f[prefix..]
                })
                .collect();
            // Into an interval that holds the keys already (another edge's
            // state of them came first): the steady state of an aggregator.
            let a = aggregator();
            let mut scratch = Scratch::default();
            let merge = |scratch: &mut Scratch| {
                for f in &frames {
                    let view = BatchView::decode(f).expect("decodes");
                    let mut stats = BlockStats::default();
                    a.ingest_batch(&view, scratch, &mut stats);
                }
            };
            merge(&mut scratch);
            g.bench_function(format!("aggregator/merge_{name}_{keys}_keys_{mode}"), |b| {
                b.iter(|| merge(&mut scratch))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, fleet);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
