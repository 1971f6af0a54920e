//! The flush stage: decides when an interval closes, turns it into rows and
//! queues them for the sink.
//!
//! An interval closes at every wall-clock boundary of `flush_interval` (a 1 s
//! interval closes at each whole second) or as soon as `max_depth` raw
//! increments are pending, whichever is first. Closing swaps in a fresh
//! generation, so ingest never waits. When the sink's queue is full, the tick
//! is skipped (counted in `tallyd_flushes_deferred_total`) and the interval
//! keeps aggregating: nothing is dropped, memory stays bounded by the key
//! limit, and the row's `ts` is the start of the longer interval.
//!
//! Every flush gets a `flush_id`: Unix microseconds at the flush, forced
//! strictly above every id this data dir has issued before (kept in the file
//! `flush_id` under the data dir), so ids and gauge versions keep growing
//! across restarts even if the clock steps back.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::aggregate::{Aggregator, Generation};
use crate::sink::rows::{self, Batch, GaugeMemory};
use crate::telemetry::Telemetry;
use crate::wal::{Intent, Wal};

/// The wall clock, as a duration since the Unix epoch (injected for tests).
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// How long until the next multiple of `interval` after `now`.
pub fn until_next_boundary(now: Duration, interval: Duration) -> Duration {
    let step = interval.as_nanos().max(1);
    let into = now.as_nanos() % step;
    Duration::from_nanos((step - into) as u64)
}

/// Issues flush ids that grow across restarts.
#[derive(Debug)]
pub struct FlushIds {
    path: PathBuf,
    last: u64,
}

impl FlushIds {
    /// Reads the last issued id from `dir/flush_id` (0 if there is none).
    pub fn open(dir: &Path) -> io::Result<FlushIds> {
        let path = dir.join("flush_id");
        let last = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a flush id: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(FlushIds { path, last })
    }

    /// The next id: `now` in microseconds, or one past the last id if that is
    /// larger. The id is recorded before it is returned.
    pub fn next(&mut self, now: Duration) -> io::Result<u64> {
        let id = (now.as_micros() as u64).max(self.last + 1);
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{id}\n"))?;
        std::fs::rename(&tmp, &self.path)?;
        self.last = id;
        Ok(id)
    }
}

/// Why an interval closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Tick,
    Depth,
    Shutdown,
    Replay,
}

pub struct Flusher {
    pub aggregator: Arc<Aggregator>,
    pub wal: Option<Arc<Wal>>,
    pub ids: FlushIds,
    pub gauges: GaugeMemory,
    pub host: String,
    pub queue: mpsc::Sender<Batch>,
    pub telemetry: Arc<Telemetry>,
    pub clock: Clock,
}

impl Flusher {
    /// Closes the current interval and queues its rows. On a tick or depth
    /// flush with a full queue, does nothing and returns false; a shutdown
    /// flush waits for room.
    pub async fn flush(&mut self, reason: Reason) -> bool {
        let permit = if reason == Reason::Shutdown {
            match self.queue.clone().reserve_owned().await {
                Ok(p) => p,
                Err(_) => return false,
            }
        } else {
            match self.queue.clone().try_reserve_owned() {
                Ok(p) => p,
                Err(_) => {
                    self.telemetry.flushes_deferred.fetch_add(1, Relaxed);
                    return false;
                }
            }
        };
        let started = Instant::now();
        let now = (self.clock)();
        let generation = take(self.aggregator.swap(now)).await;
        if generation.keys() == 0 {
            self.confirm_empty(generation.id);
            return true;
        }
        let id = self.next_id(now);
        self.send(generation, id, reason, started, permit);
        true
    }

    /// Queues a generation rebuilt from the WAL at start: with its intent's
    /// flush id and interval start if it had been sent before, so the copy
    /// that may already be in ClickHouse collapses with it.
    pub async fn flush_replayed(&mut self, mut generation: Generation, intent: Option<Intent>) {
        let Ok(permit) = self.queue.clone().reserve_owned().await else {
            return;
        };
        if generation.keys() == 0 {
            self.confirm_empty(generation.id);
            return;
        }
        let id = match intent {
            Some(i) => {
                generation.started = Duration::from_secs(u64::from(i.ts));
                i.flush_id
            }
            None => self.next_id((self.clock)()),
        };
        self.send(generation, id, Reason::Replay, Instant::now(), permit);
    }

    fn next_id(&mut self, now: Duration) -> u64 {
        match self.ids.next(now) {
            Ok(id) => id,
            Err(e) => {
                // The id is still unique within this run; only its survival
                // across a restart is at stake.
                tracing::error!(error = %e, "could not record the flush id");
                self.ids.last = (self.ids.last + 1).max(now.as_micros() as u64);
                self.ids.last
            }
        }
    }

    /// A generation with no keys has nothing to write: its WAL records (only
    /// malformed lines, if any) can go at once.
    fn confirm_empty(&self, generation: u64) {
        if let Some(wal) = &self.wal
            && let Err(e) = wal.confirm(generation)
        {
            tracing::error!(error = %e, "could not record the WAL checkpoint");
        }
    }

    fn send(
        &mut self,
        generation: Generation,
        id: u64,
        reason: Reason,
        started: Instant,
        permit: mpsc::OwnedPermit<Batch>,
    ) {
        if let Some(wal) = &self.wal {
            let ts = u32::try_from(generation.started.as_secs()).unwrap_or(u32::MAX);
            if let Err(e) = wal.record_intent(generation.id, Intent { flush_id: id, ts }) {
                tracing::error!(error = %e, "could not record the flush intent; after a crash this flush may be counted twice");
            }
            crate::failpoint::hit("after_intent");
        }
        let (batch, forgotten) = rows::build(generation, id, &self.host, &mut self.gauges);
        let t = &self.telemetry;
        t.dropped_gauge_memory.fetch_add(forgotten, Relaxed);
        t.flushes.fetch_add(1, Relaxed);
        if reason == Reason::Depth {
            t.flushes_by_depth.fetch_add(1, Relaxed);
        }
        t.backlog_batches.fetch_add(1, Relaxed);
        t.backlog_rows.fetch_add(batch.rows() as u64, Relaxed);
        t.flush_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        tracing::debug!(
            flush_id = id,
            rows = batch.rows(),
            samples = batch.samples,
            ?reason,
            "interval closed"
        );
        permit.send(batch);
    }
}

/// Waits until no ingest worker holds the generation any more (they hold it
/// for one block at most) and takes it.
async fn take(mut generation: Arc<Generation>) -> Generation {
    loop {
        match Arc::try_unwrap(generation) {
            Ok(g) => return g,
            Err(shared) => {
                generation = shared;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Runs the flush schedule until `stop` turns true, then closes the last
/// interval (waiting for room in the queue) and returns. Dropping the flusher
/// closes the queue, which tells the sink that no more batches come. A new
/// `interval` (a config reload) applies from the next boundary.
pub async fn run(
    mut flusher: Flusher,
    mut interval: watch::Receiver<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let aggregator = Arc::clone(&flusher.aggregator);
    while !*stop.borrow() {
        flusher
            .telemetry
            .flush_heartbeat_ms
            .store(crate::notify::now_ms(), Relaxed);
        let every = *interval.borrow_and_update();
        let delay = until_next_boundary((flusher.clock)(), every);
        tokio::select! {
            _ = tokio::time::sleep(delay) => { flusher.flush(Reason::Tick).await; }
            _ = aggregator.depth_reached() => { flusher.flush(Reason::Depth).await; }
            Ok(()) = interval.changed() => {}
            _ = stop.changed() => {}
        }
    }
    flusher.flush(Reason::Shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{AggregateLimits, Scratch};
    use crate::protocol::statsd::Limits;
    use crate::telemetry::BlockStats;

    fn paused_clock(base: Duration) -> Clock {
        let start = tokio::time::Instant::now();
        Arc::new(move || base + start.elapsed())
    }

    struct Fixture {
        aggregator: Arc<Aggregator>,
        rx: mpsc::Receiver<Batch>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        _dir: TempDir,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir() -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tallyd-flush-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Starts a flush loop at 0.5 s past a whole second, with a queue of `queue`.
    fn start(max_depth: u64, queue: usize) -> Fixture {
        let aggregator = Arc::new(Aggregator::new(
            AggregateLimits {
                max_keys: 100,
                max_set_members: 10,
                max_depth,
            },
            Limits::default(),
            Duration::from_secs(1_700_000_000),
        ));
        let dir = temp_dir();
        let (tx, rx) = mpsc::channel(queue);
        let (stop, stop_rx) = watch::channel(false);
        let flusher = Flusher {
            aggregator: Arc::clone(&aggregator),
            wal: None,
            ids: FlushIds::open(&dir.0).expect("ids"),
            gauges: GaugeMemory::new(100),
            host: "h".into(),
            queue: tx,
            telemetry: Arc::new(Telemetry::default()),
            clock: paused_clock(Duration::from_millis(1_700_000_000_500)),
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
            _dir: dir,
        }
    }

    fn ingest(a: &Aggregator, block: &str) {
        a.ingest_block(
            block.as_bytes(),
            &mut Scratch::default(),
            &mut BlockStats::default(),
        )
        .expect("no WAL");
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
        let batch = f.rx.try_recv().expect("flushed at the boundary");
        assert_eq!(batch.ts, 1_700_000_000);
        assert_eq!(batch.counters[0].value, 1.0);
        ingest(&f.aggregator, "a:2|c");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let batch = f.rx.try_recv().expect("second flush");
        assert_eq!((batch.ts, batch.counters[0].value), (1_700_000_001, 2.0));
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
        let batch = f.rx.try_recv().expect("early flush");
        assert_eq!(batch.samples, 3);
        assert_eq!(batch.ts, 1_700_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_defers_and_keeps_aggregating() {
        let mut f = start(1_000_000, 1);
        ingest(&f.aggregator, "a:1|c");
        tokio::time::sleep(Duration::from_millis(600)).await; // first flush fills the queue
        ingest(&f.aggregator, "a:2|c");
        tokio::time::sleep(Duration::from_secs(1)).await; // deferred
        ingest(&f.aggregator, "a:3|c");
        let first = f.rx.recv().await.expect("first");
        assert_eq!(first.counters[0].value, 1.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = f.rx.recv().await.expect("second");
        assert_eq!(
            (second.counters[0].value, second.counters[0].samples),
            (5.0, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_flushes_what_is_pending() {
        let mut f = start(1_000_000, 4);
        ingest(&f.aggregator, "a:7|c");
        f.stop.send(true).expect("loop alive");
        f.task.await.expect("loop ends");
        assert_eq!(
            f.rx.recv().await.expect("final flush").counters[0].value,
            7.0
        );
        assert!(
            f.rx.recv().await.is_none(),
            "queue closed after the final flush"
        );
    }

    #[test]
    fn flush_ids_grow_across_restarts_even_if_the_clock_steps_back() {
        let dir = temp_dir();
        let mut ids = FlushIds::open(&dir.0).expect("open");
        let a = ids.next(Duration::from_secs(100)).expect("id");
        assert_eq!(a, 100_000_000);
        let mut reopened = FlushIds::open(&dir.0).expect("reopen");
        let b = reopened.next(Duration::from_secs(50)).expect("id");
        assert_eq!(b, a + 1);
    }

    #[test]
    fn corrupt_flush_id_file_is_an_error() {
        let dir = temp_dir();
        std::fs::write(dir.0.join("flush_id"), "garbage").expect("write");
        assert!(FlushIds::open(&dir.0).is_err());
    }
}
