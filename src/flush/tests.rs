//! Unit tests of [`super`].

use super::*;
use crate::aggregate::{AggregateLimits, Scratch};
use crate::fs::RealFs;
use crate::protocol::statsd::Limits;
use crate::telemetry::BlockStats;

/// The queued flush with its bodies, read back from its spool file (the
/// queue holds none: see [`Queued::spooled`]), each body also streamed
/// from its range as the sink sends it.
fn read_back(ledger: &Ledger, q: &Queued) -> Flush {
    let ranges = q.spooled.expect("queued with its bodies' ranges");
    assert_eq!(q.flush.body_len(), 0, "queued without its bodies");
    let whole = ledger
        .read(q.flush.flush_id)
        .expect("read back from the spool");
    for (table, range) in ranges.iter().enumerate() {
        let mut reader = ledger.open_body(&q.flush, *range).expect("open");
        let mut body = Vec::new();
        while let Some(chunk) = reader.next_chunk().expect("chunk") {
            body.extend_from_slice(&chunk);
        }
        assert!(body == whole.tables.bodies[table], "table {table}'s range");
    }
    whole
}

/// `(ts, value, samples)` of the first counter row of a flush, read back
/// from its RowBinary body.
fn first_counter(flush: &Flush) -> (u32, f64, u64) {
    let b = &flush.tables.bodies[0];
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let mut at = 4;
    at += 1 + b[at] as usize; // name (short)
    assert_eq!(b[at], 0, "no tags");
    at += 1;
    at += 1 + b[at] as usize; // host
    at += 8; // flush_id
    (u32_at(0), f64::from_bits(u64_at(at)), u64_at(at + 8))
}

fn paused_clock(base: Duration) -> Clock {
    let start = tokio::time::Instant::now();
    Arc::new(move || base + start.elapsed())
}

struct Fixture {
    aggregator: Arc<Aggregator>,
    rx: mpsc::Receiver<Queued>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
    ledger: Arc<Ledger>,
    _dir: crate::test_dir::TestDir,
}

fn temp_dir() -> crate::test_dir::TestDir {
    crate::test_dir::test_dir("flush")
}

/// Starts a flush loop at 0.5 s past a whole second, with a queue of `queue`.
fn start(max_depth: u64, queue: usize) -> Fixture {
    let aggregator = Arc::new(Aggregator::new(
        AggregateLimits {
            max_keys: 100,
            max_set_members: 10,
            max_depth,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::from_secs(3600),
            interval: std::time::Duration::from_secs(1),
        },
        Limits::default(),
        Duration::from_secs(1_700_000_000),
    ));
    let dir = temp_dir();
    let (tx, rx) = mpsc::channel(queue);
    let (stop, stop_rx) = watch::channel(false);
    let (ledger, _) = Ledger::open(&dir, 60, 1000, 1 << 30, Arc::new(RealFs)).expect("ledger");
    let ledger = Arc::new(ledger);
    let flusher = Flusher {
        aggregator: Arc::clone(&aggregator),
        ledger: Arc::clone(&ledger),
        gauges: GaugeMemory::new(100),
        host: "h".into(),
        queue: tx,
        telemetry: Arc::new(Telemetry::default()),
        clock: paused_clock(Duration::from_millis(1_700_000_000_500)),
        held: None,
        coarsen: Duration::from_secs(60),
        spare: Default::default(),
    };
    let (interval, interval_rx) = watch::channel(Duration::from_secs(1));
    let task = tokio::spawn(async move {
        let _keep = interval;
        run(flusher, interval_rx, stop_rx).await
    });
    Fixture {
        aggregator,
        rx,
        stop,
        task,
        ledger,
        _dir: dir,
    }
}

/// A flusher over a real WAL and ledger whose file operations `fs`
/// counts, with no flush loop: the test closes intervals itself.
fn counted(
    fs: &Arc<crate::fs::CountingFs>,
    dir: &std::path::Path,
) -> (Flusher, mpsc::Receiver<Queued>) {
    over(Arc::clone(fs) as Arc<dyn crate::fs::Fs>, dir)
}

/// A flusher over a real WAL and ledger whose file operations go
/// through `fs`.
fn over(
    fs_dyn: Arc<dyn crate::fs::Fs>,
    dir: &std::path::Path,
) -> (Flusher, mpsc::Receiver<Queued>) {
    over_spool_budget(fs_dyn, dir, 1 << 30)
}

/// [`over`] with a spool budget (`spool.max_size`) of `budget` bytes.
fn over_spool_budget(
    fs_dyn: Arc<dyn crate::fs::Fs>,
    dir: &std::path::Path,
    budget: u64,
) -> (Flusher, mpsc::Receiver<Queued>) {
    let wal_config = crate::wal::WalConfig {
        dir: dir.join("wal"),
        streams: 1,
        segments_per_stream: 4,
        segment_size: 8 << 20,
        sync: crate::wal::SyncMode::Interval,
        sync_interval: Duration::from_millis(100),
        skip_corrupt: false,
    };
    let (wal, _) = crate::wal::Wal::open_with(wal_config, Arc::clone(&fs_dyn)).expect("wal");
    let wal = Arc::new(wal);
    let limits = AggregateLimits {
        max_keys: 100_000,
        max_set_members: 10,
        max_depth: u64::MAX,
        max_memory: u64::MAX,
        timestamp_window: Duration::from_secs(3600),
        interval: Duration::from_secs(1),
    };
    let aggregator = Arc::new(Aggregator::new(
        limits,
        Limits::default(),
        Duration::from_secs(1_700_000_000),
    ));
    let (ledger, _) = Ledger::open(dir, 60, 100_000, budget, fs_dyn).expect("ledger");
    let (tx, rx) = mpsc::channel(1000);
    let flusher = Flusher {
        aggregator,
        ledger: Arc::new(ledger.with_wal(Some(wal))),
        gauges: GaugeMemory::new(100_000),
        host: "h".into(),
        queue: tx,
        telemetry: Arc::new(Telemetry::default()),
        clock: Arc::new(|| Duration::from_secs(1_700_000_000)),
        held: None,
        coarsen: Duration::from_secs(60),
        spare: Default::default(),
    };
    (flusher, rx)
}

/// What ingest records and applies through, as the server's listeners do.
fn recorder(f: &Flusher) -> crate::ingest::record::Recorder {
    crate::ingest::record::Recorder::new(Arc::clone(&f.aggregator), f.ledger.wal())
}

/// fsyncs of one flush of `block` (also protobuf batches of `clients`).
async fn fsyncs_of_a_flush(
    flusher: &mut Flusher,
    fs: &crate::fs::CountingFs,
    block: &str,
    clients: usize,
) -> u64 {
    let before = fs.counts().0;
    let mut scratch = Scratch::default();
    let mut stats = BlockStats::default();
    let recorder = recorder(flusher);
    recorder
        .block(block.as_bytes(), &mut scratch, &mut stats)
        .expect("append");
    for c in 0..clients {
        let batch = crate::protocol::proto::Batch {
            client_id: format!("client-{c}"),
            sequence: 1,
            events: vec![],
            ..Default::default()
        };
        let raw = prost::Message::encode_to_vec(&batch);
        let view = crate::protocol::batch::BatchView::decode(&raw).expect("view");
        flusher
            .ledger
            .dedup
            .admit(&batch.client_id, 1, || {
                recorder.batch(&raw, &view, &mut scratch, &mut stats)
            })
            .expect("admit");
    }
    assert!(flusher.flush(Reason::Tick).await, "recorded");
    fs.counts().0 - before
}

#[tokio::test]
async fn fsyncs_per_flush_are_constant_in_keys_gauges_and_clients_and_an_idle_interval_does_none() {
    let dir = temp_dir();
    let fs = Arc::new(crate::fs::CountingFs::default());
    let (mut flusher, _rx) = counted(&fs, &dir);
    // The first flush with gauges writes the gauge log whole.
    fsyncs_of_a_flush(&mut flusher, &fs, "g:1|g\n", 0).await;
    let small = fsyncs_of_a_flush(&mut flusher, &fs, "c:1|c\ng:+1|g\n", 1).await;
    let keys: String = (0..5_000)
        .map(|i| format!("c{i}:1|c\ng{i}:+1|g\nt{i}:{i}|ms\n"))
        .collect();
    let large = fsyncs_of_a_flush(&mut flusher, &fs, &keys, 500).await;
    assert!(small > 0);
    assert_eq!(
        small, large,
        "5,000 keys of each kind and 500 clients cost more fsyncs"
    );
    let before = fs.counts();
    for _ in 0..10 {
        assert!(flusher.flush(Reason::Tick).await);
    }
    assert_eq!(fs.counts(), before, "idle intervals wrote or synced");
}

#[tokio::test]
async fn with_many_gauges_remembered_a_flush_writes_at_most_twice_its_spool_file() {
    let dir = temp_dir();
    let fs = Arc::new(crate::fs::CountingFs::default());
    let (mut flusher, _rx) = counted(&fs, &dir);
    let many: String = (0..20_000).map(|i| format!("gauge.{i}:{i}|g\n")).collect();
    fsyncs_of_a_flush(&mut flusher, &fs, &many, 0).await;
    for round in 0..20 {
        let before = fs.counts().1;
        let few: String = (0..10)
            .map(|i| format!("gauge.{}:+1|g\nc{i}:1|c\n", round * 10 + i))
            .collect();
        fsyncs_of_a_flush(&mut flusher, &fs, &few, 0).await;
        let written = fs.counts().1 - before;
        let spool = crate::ledger::spool::dir(&dir);
        let newest = std::fs::read_dir(&spool)
            .expect("spool")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "flush"))
            .max()
            .expect("a spool file");
        let file = std::fs::metadata(&newest).expect("meta").len();
        assert!(
            written <= 2 * file + 512,
            "round {round}: {written} bytes written for a {file}-byte spool file"
        );
    }
}

#[tokio::test]
async fn after_a_torn_gauge_append_and_a_failed_record_the_log_is_rewritten_not_appended_to() {
    use crate::fs::{Fault, FaultyFs};
    let dir = temp_dir();
    let fs = Arc::new(FaultyFs::default());
    let (mut flusher, _rx) = over(Arc::clone(&fs) as Arc<dyn crate::fs::Fs>, &dir);
    let ingest = |f: &Flusher, block: &str| {
        recorder(f)
            .block(
                block.as_bytes(),
                &mut Scratch::default(),
                &mut BlockStats::default(),
            )
            .expect("append")
    };
    ingest(&flusher, "g:10|g\n");
    assert!(
        flusher.flush(Reason::Tick).await,
        "the log is written whole"
    );
    // A power cut tears the next append (the flush itself is recorded).
    fs.arm("gauges.log", Fault::TornWrite(5));
    ingest(&flusher, "g:+1|g\n");
    assert!(flusher.flush(Reason::Tick).await);
    fs.heal();
    // The next flush cannot be recorded at all (a full disk), then can.
    fs.arm("spool", Fault::NoSpace);
    ingest(&flusher, "g:+1|g\n");
    assert!(!flusher.flush(Reason::Tick).await, "held");
    fs.heal();
    assert!(flusher.flush(Reason::Tick).await, "recorded");
    let log = std::fs::read(dir.join("gauges.log")).expect("log");
    let read = crate::outbox::gauges::decode_log(&log).expect("decodes");
    assert_eq!(
        read.good_len,
        log.len() as u64,
        "no torn bytes left in the log"
    );
    assert_eq!(read.values.last().map(|v| v.1), Some(12.0));
}

fn ingest(a: &Aggregator, block: &str) {
    a.ingest_block(
        block.as_bytes(),
        &mut Scratch::default(),
        &mut BlockStats::default(),
    );
}

#[test]
fn boundary_is_the_next_whole_interval() {
    let s = Duration::from_secs(1);
    assert_eq!(
        until_next_boundary(Duration::from_millis(10_250), s),
        Duration::from_millis(750)
    );
    assert_eq!(until_next_boundary(Duration::from_secs(10), s), s);
    assert_eq!(
        until_next_boundary(Duration::from_millis(10_250), Duration::from_millis(100)),
        Duration::from_millis(50)
    );
}

#[tokio::test(start_paused = true)]
async fn flushes_at_the_next_second_boundary() {
    let mut f = start(1_000_000, 4);
    ingest(&f.aggregator, "a:1|c");
    tokio::time::sleep(Duration::from_millis(499)).await;
    assert!(f.rx.try_recv().is_err(), "flushed before the boundary");
    tokio::time::sleep(Duration::from_millis(2)).await;
    let q = f.rx.recv().await.expect("flushed at the boundary");
    assert_eq!(
        first_counter(&read_back(&f.ledger, &q)),
        (1_700_000_000, 1.0, 1)
    );
    assert!(!q.resent);
    ingest(&f.aggregator, "a:2|c");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let q = f.rx.recv().await.expect("second flush");
    assert_eq!(
        first_counter(&read_back(&f.ledger, &q)),
        (1_700_000_001, 2.0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn empty_interval_sends_nothing() {
    let mut f = start(1_000_000, 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(f.rx.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn max_depth_flushes_early() {
    let mut f = start(3, 4);
    ingest(&f.aggregator, "a:1|c\na:1|c\nb:1|c");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let q = f.rx.recv().await.expect("early flush");
    assert_eq!((q.flush.samples, q.flush.ts), (3, 1_700_000_000));
}

#[tokio::test(start_paused = true)]
async fn full_queue_parks_each_interval_on_disk() {
    let mut f = start(1_000_000, 1);
    ingest(&f.aggregator, "a:1|c");
    tokio::time::sleep(Duration::from_millis(600)).await; // the queue is full
    ingest(&f.aggregator, "a:2|c");
    tokio::time::sleep(Duration::from_secs(1)).await; // parked
    ingest(&f.aggregator, "a:3|c");
    tokio::time::sleep(Duration::from_secs(1)).await; // parked behind it
    let first = f.rx.recv().await.expect("first");
    assert_eq!(
        first_counter(&read_back(&f.ledger, &first)),
        (1_700_000_000, 1.0, 1)
    );
    let mut parked = Vec::new();
    while let Some(taken) = f.ledger.take_parked() {
        assert!(!taken.earlier);
        for id in taken.ids {
            let flush = f.ledger.read(id).expect("read back");
            parked.push(first_counter(&flush));
        }
    }
    assert_eq!(
        parked,
        vec![(1_700_000_001, 2.0, 1), (1_700_000_002, 3.0, 1)]
    );
}

#[tokio::test(start_paused = true)]
async fn stop_flushes_what_is_pending() {
    let mut f = start(1_000_000, 4);
    ingest(&f.aggregator, "a:7|c");
    f.stop.send(true).expect("loop alive");
    f.task.await.expect("loop ends");
    let q = f.rx.recv().await.expect("final flush");
    assert_eq!(first_counter(&read_back(&f.ledger, &q)).1, 7.0);
    assert!(
        f.rx.recv().await.is_none(),
        "queue closed after the final flush"
    );
}

#[tokio::test]
async fn past_the_spool_budget_an_interval_stays_open_up_to_a_minute_instead_of_a_merge_a_tick() {
    use std::sync::atomic::AtomicU64;
    let dir = temp_dir();
    let fs: Arc<dyn crate::fs::Fs> = Arc::new(crate::fs::RealFs);
    // A budget of one byte: past it after the first flush.
    let (mut flusher, mut rx) = over_spool_budget(fs, &dir, 1);
    let now = Arc::new(AtomicU64::new(1_700_000_000));
    let clock = Arc::clone(&now);
    flusher.clock = Arc::new(move || Duration::from_secs(clock.load(Relaxed)));
    let ingest = |f: &Flusher| {
        recorder(f)
            .block(
                b"c:1|c\n",
                &mut Scratch::default(),
                &mut BlockStats::default(),
            )
            .expect("append")
    };
    let ledger = Arc::clone(&flusher.ledger);
    let sum = |q: Queued| -> f64 {
        let batch = read_back(&ledger, &q).into_batch().expect("decodes");
        batch.counters.iter().map(|r| r.value).sum()
    };
    ingest(&flusher);
    now.fetch_add(1, Relaxed);
    assert!(
        flusher.flush(Reason::Tick).await,
        "under the budget: closed"
    );
    assert_eq!(sum(rx.try_recv().expect("queued")), 1.0);
    for _ in 0..10 {
        ingest(&flusher);
        now.fetch_add(1, Relaxed);
        assert!(
            !flusher.flush(Reason::Tick).await,
            "past the budget: kept open"
        );
        assert!(!flusher.flush(Reason::Depth).await, "a depth trigger too");
    }
    assert!(rx.try_recv().is_err(), "nothing closed meanwhile");
    assert_eq!(flusher.telemetry.flushes_deferred.load(Relaxed), 20);
    now.fetch_add(60, Relaxed);
    assert!(flusher.flush(Reason::Tick).await, "a minute old: closed");
    assert_eq!(
        sum(rx.try_recv().expect("queued")),
        10.0,
        "every sample, once"
    );
    // A stop closes the interval at once.
    ingest(&flusher);
    assert!(flusher.flush(Reason::Shutdown).await);
    assert_eq!(sum(rx.try_recv().expect("queued")), 1.0);
}
