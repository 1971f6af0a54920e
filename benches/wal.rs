//! WAL append throughput (1 and 2 threads, datagram-sized records) and
//! replay speed: `cargo bench --bench wal`. The files go to the system temp
//! dir and are removed after each bench; sync mode `never` measures the WAL's own cost (the interval msync
//! runs off the hot path).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tallyd::wal::format::Kind;
use tallyd::wal::{SyncMode, Wal, WalConfig};

const RECORD: usize = 1400;

fn config(tag: &str, streams: u32, size_mib: u64) -> WalConfig {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("tallyd-bench-wal-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    WalConfig {
        dir,
        streams,
        segments_per_stream: 4,
        segment_size: size_mib << 20,
        sync: SyncMode::Never,
        sync_interval: Duration::from_millis(100),
        skip_corrupt: false,
    }
}

fn append(c: &mut Criterion) {
    let payload = vec![b'x'; RECORD];
    let mut g = c.benchmark_group("wal_append");
    g.throughput(Throughput::Bytes(RECORD as u64 * 1000));
    for threads in [1usize, 2] {
        let cfg = config(&format!("append{threads}"), threads as u32, 64);
        let dir = cfg.dir.clone();
        let (wal, _) = Wal::open(cfg).expect("open");
        let wal = Arc::new(wal);
        let mut generation = 1;
        g.bench_function(
            format!("1000_records_of_1400_bytes_{threads}_threads"),
            |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    let handles: Vec<_> = (0..threads)
                        .map(|t| {
                            let (wal, payload) = (Arc::clone(&wal), payload.clone());
                            std::thread::spawn(move || {
                                for _ in 0..iters * 1000 / threads as u64 {
                                    if wal.append(t, generation, Kind::Statsd, &payload).is_err() {
                                        // Full: release everything, as a flush would.
                                        wal.confirm(generation).expect("confirm");
                                    }
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().expect("thread");
                    }
                    let took = start.elapsed();
                    wal.confirm(generation).expect("confirm");
                    generation += 1;
                    took
                })
            },
        );
        drop(wal);
        let _ = std::fs::remove_dir_all(dir);
    }
    g.finish();
}

fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_replay");
    g.sample_size(10);
    let cfg = config("replay", 1, 64);
    let records = (200u64 << 20) / RECORD as u64; // ~200 MiB, within 4 x 64 MiB
    {
        let (wal, _) = Wal::open(cfg.clone()).expect("open");
        let payload = vec![b'y'; RECORD];
        for _ in 0..records {
            wal.append(0, 1, Kind::Statsd, &payload).expect("append");
        }
    }
    g.throughput(Throughput::Bytes(records * RECORD as u64));
    g.bench_function("200_MiB", |b| {
        b.iter(|| {
            let (_, recovery) = Wal::open(cfg.clone()).expect("reopen");
            assert_eq!(recovery.records, records);
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&cfg.dir);
}

criterion_group!(benches, append, replay);
criterion_main!(benches);
