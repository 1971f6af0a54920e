//! The flush stage: decides when an interval closes, turns it into a
//! recorded flush ([`crate::ledger`], steps 3 to 5) and queues it for the
//! sink.
//!
//! An interval closes at every wall-clock boundary of `flush_interval` (a 1 s
//! interval closes at each whole second) or as soon as `max_depth` raw
//! increments are pending, whichever is first. Closing swaps in a fresh
//! generation, so ingest never waits. When the sink's queue is full, the tick
//! is skipped (counted in `tallyd_flushes_deferred_total`) and the interval
//! keeps aggregating: nothing is dropped, memory stays bounded by the key
//! limit, and the row's `ts` is the start of the longer interval. A flush
//! that could not be recorded (a full or failing disk) is held, not sent,
//! and recorded again at the next tick before any new interval closes.
//!
//! Flush ids come from the ledger's instance identity ([`crate::ledger::identity`]).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::aggregate::{Aggregator, Generation};
use crate::ledger::Ledger;
use crate::ledger::spool::Flush;
use crate::sink::Queued;
use crate::sink::rows::{self, GaugeMemory};
use crate::telemetry::Telemetry;
use crate::wal::Intent;

/// The wall clock, as a duration since the Unix epoch (injected for tests).
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// How long until the next multiple of `interval` after `now`.
pub fn until_next_boundary(now: Duration, interval: Duration) -> Duration {
    let step = interval.as_nanos().max(1);
    let into = now.as_nanos() % step;
    Duration::from_nanos((step - into) as u64)
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
    pub ledger: Arc<Ledger>,
    pub gauges: GaugeMemory,
    pub host: String,
    pub queue: mpsc::Sender<Queued>,
    pub telemetry: Arc<Telemetry>,
    pub clock: Clock,
    /// A flush that could not be recorded: recorded again before any other.
    pub held: Option<Arc<Flush>>,
}

impl Flusher {
    /// Closes the current interval and queues its flush. On a tick or depth
    /// flush with a full queue, does nothing and returns false; a shutdown
    /// flush waits for room. Also false when the flush could not be recorded.
    pub async fn flush(&mut self, reason: Reason) -> bool {
        let Some(permit) = self.reserve(reason).await else {
            return false;
        };
        let started = Instant::now();
        let flush = match self.held.take() {
            Some(held) => held,
            None => {
                let now = (self.clock)();
                let generation = take(self.aggregator.swap(now)).await;
                if generation.keys() == 0 {
                    self.release(generation.id).await;
                    return true;
                }
                let id = self.ledger.next_flush_id(now);
                self.seal(generation, id)
            }
        };
        self.record_and_send(flush, reason, started, permit).await
    }

    async fn reserve(&self, reason: Reason) -> Option<mpsc::OwnedPermit<Queued>> {
        if matches!(reason, Reason::Shutdown | Reason::Replay) {
            return self.queue.clone().reserve_owned().await.ok();
        }
        match self.queue.clone().try_reserve_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.telemetry.flushes_deferred.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Records and queues a generation rebuilt from the WAL at start. One
    /// that the previous release had sent (`intent`, from its checkpoint)
    /// keeps that flush id and interval start, so the copy that may already
    /// be in ClickHouse collapses with it.
    pub async fn flush_replayed(&mut self, mut generation: Generation, intent: Option<Intent>) {
        let Some(permit) = self.reserve(Reason::Replay).await else {
            return;
        };
        if generation.keys() == 0 {
            self.release(generation.id).await;
            return;
        }
        let id = match intent {
            Some(i) => {
                generation.started = Duration::from_secs(u64::from(i.ts));
                i.flush_id
            }
            None => self.ledger.next_flush_id((self.clock)()),
        };
        let flush = self.seal(generation, id);
        self.record_and_send(flush, Reason::Replay, Instant::now(), permit)
            .await;
    }

    /// Step 3: the rows of `generation`, fixed as RowBinary bytes.
    fn seal(&mut self, generation: Generation, flush_id: u64) -> Arc<Flush> {
        let (batch, forgotten) = rows::build(generation, flush_id, &self.host, &mut self.gauges);
        self.telemetry
            .dropped_gauge_memory
            .fetch_add(forgotten, Relaxed);
        Arc::new(Flush::seal(batch, self.ledger.instance()))
    }

    /// Steps 4 and 5: record, release the WAL records, queue. A flush that
    /// cannot be recorded is held and not sent.
    async fn record_and_send(
        &mut self,
        flush: Arc<Flush>,
        reason: Reason,
        started: Instant,
        permit: mpsc::OwnedPermit<Queued>,
    ) -> bool {
        let gauges = (!flush.gauges.is_empty()).then(|| self.gauges.encode());
        let (ledger, f) = (Arc::clone(&self.ledger), Arc::clone(&flush));
        let recorded =
            tokio::task::spawn_blocking(move || ledger.record(&f, gauges.as_deref())).await;
        let error = match recorded {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = error {
            self.telemetry.spool_errors.fetch_add(1, Relaxed);
            tracing::error!(%error, flush_id = flush.flush_id, "could not record the flush in the spool; holding it (not sent) and trying again at the next tick");
            self.held = Some(flush);
            return false;
        }
        crate::failpoint::hit("after_intent");
        self.release(flush.generation).await;
        crate::failpoint::hit("after_release");
        let t = &self.telemetry;
        t.flushes.fetch_add(1, Relaxed);
        if reason == Reason::Depth {
            t.flushes_by_depth.fetch_add(1, Relaxed);
        }
        t.backlog_batches.fetch_add(1, Relaxed);
        t.backlog_rows.fetch_add(flush.rows(), Relaxed);
        t.flush_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        tracing::debug!(
            flush_id = flush.flush_id,
            rows = flush.rows(),
            samples = flush.samples,
            ?reason,
            "interval closed"
        );
        permit.send(Queued {
            flush,
            resent: false,
        });
        true
    }

    /// Step 5 for `generation`. On failure its WAL records stay; at start the
    /// ledger finds its spool file (if any) and does not rebuild it.
    async fn release(&self, generation: u64) {
        let ledger = Arc::clone(&self.ledger);
        let released = tokio::task::spawn_blocking(move || ledger.release(generation)).await;
        if let Ok(Err(e)) = released {
            tracing::error!(error = %e, generation, "could not release the WAL records of a recorded flush; they stay until the next start");
        }
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
    use crate::ledger::fs::RealFs;
    use crate::protocol::statsd::Limits;
    use crate::telemetry::BlockStats;
    use std::path::PathBuf;

    /// `(ts, value, samples)` of the first counter row of a flush, read back
    /// from its RowBinary body.
    fn first_counter(q: &Queued) -> (u32, f64, u64) {
        let b = &q.flush.tables.bodies[0];
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
        let (ledger, _) =
            Ledger::open(&dir.0, Duration::from_secs(60), Arc::new(RealFs)).expect("ledger");
        let flusher = Flusher {
            aggregator: Arc::clone(&aggregator),
            ledger: Arc::new(ledger),
            gauges: GaugeMemory::new(100),
            host: "h".into(),
            queue: tx,
            telemetry: Arc::new(Telemetry::default()),
            clock: paused_clock(Duration::from_millis(1_700_000_000_500)),
            held: None,
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
        let q = f.rx.recv().await.expect("flushed at the boundary");
        assert_eq!(first_counter(&q), (1_700_000_000, 1.0, 1));
        assert!(!q.resent);
        ingest(&f.aggregator, "a:2|c");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let q = f.rx.recv().await.expect("second flush");
        assert_eq!(first_counter(&q), (1_700_000_001, 2.0, 1));
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
    async fn full_queue_defers_and_keeps_aggregating() {
        let mut f = start(1_000_000, 1);
        ingest(&f.aggregator, "a:1|c");
        tokio::time::sleep(Duration::from_millis(600)).await; // first flush fills the queue
        ingest(&f.aggregator, "a:2|c");
        tokio::time::sleep(Duration::from_secs(1)).await; // deferred
        ingest(&f.aggregator, "a:3|c");
        let first = f.rx.recv().await.expect("first");
        assert_eq!(first_counter(&first).1, 1.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = f.rx.recv().await.expect("second");
        assert_eq!(first_counter(&second), (1_700_000_001, 5.0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_flushes_what_is_pending() {
        let mut f = start(1_000_000, 4);
        ingest(&f.aggregator, "a:7|c");
        f.stop.send(true).expect("loop alive");
        f.task.await.expect("loop ends");
        let q = f.rx.recv().await.expect("final flush");
        assert_eq!(first_counter(&q).1, 7.0);
        assert!(
            f.rx.recv().await.is_none(),
            "queue closed after the final flush"
        );
    }
}
