//! Protobuf decode + aggregate cost per event: `cargo bench --bench proto`.
//! `decode_*` reads a batch in place (what tallyd does); `prost_decode_*`
//! decodes it into prost's owned types, for comparison.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use tallyd::aggregate::{AggregateLimits, Aggregator, Scratch};
use tallyd::protocol::batch::BatchView;
use tallyd::protocol::proto::pb::event::Value;
use tallyd::protocol::proto::{Batch, Event, Tag};
use tallyd::protocol::statsd::Limits;
use tallyd::telemetry::BlockStats;

fn batch() -> Vec<u8> {
    let events = (0..1000)
        .map(|i| Event {
            name: format!("app.events.k{:04}", i % 1000),
            tags: vec![
                Tag {
                    key: "env".into(),
                    value: "prod".into(),
                },
                Tag {
                    key: "service".into(),
                    value: "api".into(),
                },
            ],
            value: Some(match i % 4 {
                0 | 1 => Value::Counter(1.0),
                2 => Value::TimerMs(f64::from(i % 300)),
                _ => Value::Gauge(f64::from(i)),
            }),
            sample_rate: 0.0,
            ..Default::default()
        })
        .collect();
    Batch {
        client_id: "bench".into(),
        sequence: 1,
        events,
        ..Default::default()
    }
    .encode_to_vec()
}

fn decode_and_aggregate(c: &mut Criterion) {
    let raw = batch();
    let a = Aggregator::new(
        AggregateLimits {
            max_keys: 1_000_000,
            max_set_members: 1000,
            max_depth: u64::MAX,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    );
    let mut scratch = Scratch::default();
    let mut g = c.benchmark_group("proto");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_1000_events", |b| {
        b.iter(|| {
            let batch = BatchView::decode(black_box(&raw[..])).expect("decodes");
            // Reading the events is part of decoding them.
            batch
                .events()
                .map(|e| e.tags().count() + e.name.len())
                .sum::<usize>()
        })
    });
    g.bench_function("prost_decode_1000_events", |b| {
        b.iter(|| Batch::decode(black_box(&raw[..])).expect("decodes"))
    });
    g.bench_function("decode_and_aggregate_1000_events", |b| {
        b.iter(|| {
            let batch = BatchView::decode(black_box(&raw[..])).expect("decodes");
            let mut stats = BlockStats::default();
            a.ingest_batch(&batch, &mut scratch, &mut stats)
        })
    });
    g.finish();
}

criterion_group!(benches, decode_and_aggregate);
criterion_main!(benches);
