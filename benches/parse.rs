//! Parse cost per line: `cargo bench --bench parse`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tallyd::aggregate::key::KeyBuf;
use tallyd::protocol::statsd::{Limits, Parsed, lines, parse_line};

fn block(line: impl Fn(usize) -> String) -> Vec<u8> {
    (0..1000)
        .map(|i| line(i) + "\n")
        .collect::<String>()
        .into_bytes()
}

fn parse(c: &mut Criterion) {
    let cases = [
        (
            "plain_counter",
            block(|i| format!("app.requests.k{:05}:1|c", i % 100)),
        ),
        (
            "tagged_counter",
            block(|i| {
                format!(
                    "app.requests.k{:05}:1|c|@0.5|#env:prod,region:eu-west-1,service:api,host:web{}",
                    i % 100,
                    i % 7
                )
            }),
        ),
        (
            "timer",
            block(|i| format!("app.latency.k{:05}:{}.{}|ms", i % 100, i % 500, i % 10)),
        ),
    ];
    let limits = Limits::default();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1000));
    for (name, data) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut n = 0usize;
                for line in lines(black_box(data)) {
                    if let Ok(Parsed::Metric(l)) = parse_line(line, &limits) {
                        n += l.name.len();
                    }
                }
                n
            })
        });
    }
    // Parse plus building the canonical key (sorting tags): what the hot
    // path does before it touches the map.
    let mut key = KeyBuf::default();
    for (name, data) in &cases {
        g.bench_function(format!("{name}_with_key"), |b| {
            b.iter(|| {
                let mut n = 0usize;
                for line in lines(black_box(data)) {
                    if let Ok(Parsed::Metric(l)) = parse_line(line, &limits) {
                        n += key.build(l.kind, l.name, l.tags).len();
                    }
                }
                n
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
