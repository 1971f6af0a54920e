//! The flush stage: decides when an interval closes, turns it into a
//! recorded flush ([`crate::ledger`], steps 3 to 5) and queues it for the
//! sink.
//!
//! An interval closes at every wall-clock boundary of `flush_interval` (a 1 s
//! interval closes at each whole second) or as soon as `max_depth` raw
//! increments are pending, whichever is first. Closing swaps in a fresh
//! generation, so ingest never waits. Every closed interval is recorded in
//! the spool, which releases its raw WAL records; it then goes to the sink's
//! bounded queue or, when that is full (ClickHouse down or slow), stays
//! parked on disk (counted in `tallyd_flushes_parked_total`) until the sink
//! reads it back. So an outage fills the spool with compacted rows (merged
//! into coarser intervals past `spool.max_size`), not the WAL with raw
//! lines. A flush that could not be recorded (a full or failing disk) is
//! held, not sent, and recorded again at the next tick before any new
//! interval closes; the open interval keeps aggregating meanwhile.
//!
//! Flush ids come from the ledger's instance identity ([`crate::ledger::identity`]).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::aggregate::{Aggregator, Generation};
use crate::ledger::Ledger;
use crate::outbox::flush::Flush;
use crate::outbox::gauges::GaugeMemory;
use crate::outbox::rowbinary::Bodies;
use crate::outbox::rows;
use crate::sink::Queued;
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
    /// A flush stopped at a durable step: taken up again before any new
    /// interval closes.
    pub held: Option<Held>,
    /// `spool.coarsen`: past the spool budget, how long an interval may
    /// stay open (see [`Flusher::coarsening`]); zero closes every one.
    pub coarsen: Duration,
    /// The last recorded flush's body buffers, for the next one's
    /// ([`Bodies::recycle`]).
    pub spare: Bodies,
}

/// A flush that could not finish its durable steps (see [`crate::ledger`]).
/// Neither kind is sent: sending, then removing its spool file, before its
/// WAL records are released would let a restart rebuild and count it again.
#[derive(Debug)]
pub enum Held {
    /// Not recorded in the spool.
    Unrecorded(Arc<Flush>),
    /// Recorded (its bodies let go: they are in its spool file), but its
    /// WAL records not released.
    Unreleased { queued: Queued, merged: bool },
}

impl Flusher {
    /// Closes the current interval and queues its flush. On a tick or depth
    /// flush with a full queue, does nothing and returns false; a shutdown
    /// flush waits for room. Also false when the flush could not be recorded.
    pub async fn flush(&mut self, reason: Reason) -> bool {
        let started = Instant::now();
        let flush = match self.held.take() {
            Some(Held::Unreleased { queued, merged }) => {
                return self.release_and_send(queued, merged, reason, started).await;
            }
            Some(Held::Unrecorded(flush)) => flush,
            None => {
                // At the spool's hard limit the interval stays open (the
                // overflow policy "defer"), but a stop still closes it.
                let full = reason != Reason::Shutdown && self.ledger.spool_full();
                self.telemetry.spool_full.store(u64::from(full), Relaxed);
                let now = (self.clock)();
                if full || (reason != Reason::Shutdown && self.coarsening(now)) {
                    self.telemetry.flushes_deferred.fetch_add(1, Relaxed);
                    return false;
                }
                self.notice_a_step_back(now);
                let generation = take(self.aggregator.swap(now)).await;
                if generation.is_empty() {
                    // Idle: the body buffers go, and their memory.
                    self.spare = Bodies::default();
                    self.ledger.release_empty(generation.id);
                    // Dropped, it ages the series table's idle keys out: a
                    // scan of the table, on a blocking thread.
                    let _ = tokio::task::spawn_blocking(move || drop(generation)).await;
                    return true;
                }
                let id = self.ledger.next_flush_id(now);
                self.seal(generation, id).await
            }
        };
        self.record_and_send(flush, reason, started).await
    }

    /// Past the spool budget every closed interval is merged into the
    /// newest parked flush, which rewrites that file: so there the open
    /// interval stays open instead (its rows are as coarse as the merge
    /// would make them), until it is `coarsen` old or the WAL is half
    /// full, and each merge folds a minute (by default) instead of a second.
    fn coarsening(&self, now: Duration) -> bool {
        if self.coarsen.is_zero() || !self.ledger.over_budget() {
            return false;
        }
        let started = self.aggregator.current().started;
        let wal_room = self.ledger.wal().is_none_or(|w| {
            let (used, free) = w.usage();
            used <= free
        });
        now.saturating_sub(started) < self.coarsen && wal_room
    }

    /// Logs and counts a wall clock that stepped back behind the open
    /// interval's start (NTP correcting a fast clock, a VM resumed from an
    /// old snapshot). What follows: new intervals start at the clock's time,
    /// so their rows get `ts` earlier than rows already written; flush ids,
    /// and the gauge versions made from them, keep growing (forced above the
    /// last one, see [`crate::ledger::identity`]), so `argMax(value,
    /// version)` still returns the gauge value sent last, and counters stay
    /// exact (each interval has its own flush id).
    fn notice_a_step_back(&self, now: Duration) {
        let started = self.aggregator.current().started;
        if now.saturating_add(Duration::from_secs(1)) < started {
            self.telemetry.clock_steps_back.fetch_add(1, Relaxed);
            tracing::warn!(by = ?started.saturating_sub(now), "the wall clock stepped back; new rows get the clock's ts, earlier than rows already written; gauge versions keep growing");
        }
    }

    /// Records and queues a generation rebuilt from the WAL at start. One
    /// that the previous release had sent (`intent`, from its checkpoint)
    /// keeps that flush id and interval start, so the copy that may already
    /// be in ClickHouse collapses with it.
    /// Errors (the start must fail) when the flush cannot be recorded and
    /// released; its records stay in the WAL.
    pub async fn flush_replayed(
        &mut self,
        mut generation: Generation,
        intent: Option<Intent>,
    ) -> std::io::Result<()> {
        if generation.is_empty() {
            return self.release_checked(generation.id).await;
        }
        let id = match intent {
            Some(i) => {
                generation.started = Duration::from_secs(u64::from(i.ts));
                i.flush_id
            }
            None => self.ledger.next_flush_id((self.clock)()),
        };
        let flush = self.seal(generation, id).await;
        if self
            .record_and_send(flush, Reason::Replay, Instant::now())
            .await
        {
            return Ok(());
        }
        self.held = None;
        Err(std::io::Error::other(
            "could not record or release a replayed interval (see the log above)",
        ))
    }

    /// Step 3: the rows of `generation`, fixed as RowBinary bytes. The
    /// build (a pass over every key) runs on a blocking thread, with the
    /// gauge memory lent to it, so that a large interval never stalls a
    /// tokio worker.
    async fn seal(&mut self, generation: Generation, flush_id: u64) -> Arc<Flush> {
        let (ledger, now) = (Arc::clone(&self.ledger), (self.clock)());
        let (host, instance) = (self.host.clone(), self.ledger.instance());
        let mut gauges = std::mem::replace(&mut self.gauges, GaugeMemory::new(0));
        let spare = std::mem::take(&mut self.spare);
        let built = tokio::task::spawn_blocking(move || {
            let mut next_id = || ledger.next_flush_id(now);
            // What folded past its metric's key budget, as rows of its own
            // (see `aggregate::budget`).
            let folded = generation.put_folded_rows().into_iter();
            let folded = folded.map(|f| (f.name().to_owned(), f.kind(), f.limit, f.values));
            let folded: Vec<_> = folded.collect();
            let built = rows::build(
                generation,
                flush_id,
                &host,
                instance,
                &mut gauges,
                &mut next_id,
                spare,
            );
            (built, gauges, folded)
        })
        .await;
        // A panic in the build is a bug: it goes on as one.
        let ((flush, forgotten), gauges, folded) =
            built.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        self.gauges = gauges;
        self.telemetry.cardinality.observe(folded);
        self.telemetry
            .dropped_gauge_memory
            .fetch_add(forgotten, Relaxed);
        let aged_out = std::mem::take(&mut self.gauges.aged_out);
        self.telemetry.gauges_aged_out.fetch_add(aged_out, Relaxed);
        let overflowed = std::mem::take(&mut self.gauges.overflowed);
        self.telemetry
            .dropped_overflow
            .fetch_add(overflowed, Relaxed);
        Arc::new(flush)
    }

    /// Steps 4 and 5: record, release the WAL records, queue or park. A
    /// flush that cannot be recorded is held and not sent.
    async fn record_and_send(
        &mut self,
        flush: Arc<Flush>,
        reason: Reason,
        started: Instant,
    ) -> bool {
        if self.ledger.take_gauges_failed() {
            self.gauges.persist_failed();
        }
        let gauges =
            (!flush.gauges.is_empty()).then(|| self.gauges.persist(flush.flush_id, &flush.gauges));
        let (ledger, f) = (Arc::clone(&self.ledger), Arc::clone(&flush));
        let recorded = tokio::task::spawn_blocking(move || ledger.record(f, gauges.as_ref())).await;
        let (recorded, error) = match recorded {
            Ok(Ok(r)) => (Some(r), None),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(e) => (None, Some(e.to_string())),
        };
        let Some((recorded, merged)) = recorded else {
            // The gauge write did not happen (or its outcome is unknown):
            // the next one rewrites the log rather than append after it.
            self.gauges.persist_failed();
            let error = error.unwrap_or_default();
            self.telemetry.spool_errors.fetch_add(1, Relaxed);
            tracing::error!(%error, flush_id = flush.flush_id, "could not record the flush in the spool; holding it (not sent) and trying again at the next tick");
            self.telemetry
                .set_flush_held(Some(&format!("could not record it in the spool: {error}")));
            self.held = Some(Held::Unrecorded(flush));
            return false;
        };
        crate::failpoint::hit("after_intent");
        // From here on the bodies are read back from the spool file: the
        // memory they take goes now, not when ClickHouse has them.
        let queued = Queued::recorded(&recorded);
        drop(recorded);
        if let Ok(flush) = Arc::try_unwrap(flush) {
            self.spare = flush.tables;
        }
        self.release_and_send(queued, merged, reason, started).await
    }

    /// Step 5, then the queue or the spool's parked flushes. A flush whose
    /// release fails is held and not sent.
    async fn release_and_send(
        &mut self,
        queued: Queued,
        merged: bool,
        reason: Reason,
        started: Instant,
    ) -> bool {
        if let Err(error) = self.release_checked(queued.flush.generation).await {
            self.telemetry.spool_errors.fetch_add(1, Relaxed);
            tracing::error!(%error, flush_id = queued.flush.flush_id, "could not release the WAL records of a recorded flush; holding it (not sent) and trying again at the next tick");
            self.telemetry
                .set_flush_held(Some(&format!("could not release its WAL records: {error}")));
            self.held = Some(Held::Unreleased { queued, merged });
            return false;
        }
        crate::failpoint::hit("after_release");
        let flush = &queued.flush;
        let t = &self.telemetry;
        t.set_flush_held(None);
        t.flushes.fetch_add(1, Relaxed);
        if reason == Reason::Depth {
            t.flushes_by_depth.fetch_add(1, Relaxed);
        }
        t.flush_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        t.latency.flush.record(started.elapsed());
        tracing::debug!(
            flush_id = flush.flush_id,
            rows = flush.rows(),
            samples = flush.samples,
            ?reason,
            "interval closed"
        );
        // Behind parked flushes, or with the queue full: park on disk.
        let permit = if merged || self.ledger.has_parked() {
            None
        } else {
            self.queue.clone().try_reserve_owned().ok()
        };
        crate::ledger::publish_backlog(&self.ledger, t);
        match permit {
            Some(permit) => {
                permit.send(queued);
            }
            None => {
                t.flushes_parked.fetch_add(1, Relaxed);
                self.ledger.park(queued.flush.flush_id);
            }
        }
        true
    }

    /// Step 5 for `generation`, on a blocking thread.
    pub async fn release_checked(&self, generation: u64) -> std::io::Result<()> {
        let ledger = Arc::clone(&self.ledger);
        tokio::task::spawn_blocking(move || ledger.release(generation))
            .await
            .map_err(std::io::Error::other)?
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
) -> u64 {
    let aggregator = Arc::clone(&flusher.aggregator);
    while !*stop.borrow() {
        flusher
            .telemetry
            .flush_heartbeat_ms
            .store(crate::notify::now_ms(), Relaxed);
        let every = *interval.borrow_and_update();
        let delay = until_next_boundary((flusher.clock)(), every);
        // While the spool is full only ticks look again (a depth trigger
        // would spin).
        let deferring = flusher.telemetry.spool_full.load(Relaxed) == 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => { flusher.flush(Reason::Tick).await; }
            _ = aggregator.depth_reached(), if !deferring => { flusher.flush(Reason::Depth).await; }
            Ok(()) = interval.changed() => {}
            _ = stop.changed() => {}
        }
    }
    // The last interval: a held flush first, then the open one.
    for _ in 0..2 {
        let had_held = flusher.held.is_some();
        if !flusher.flush(Reason::Shutdown).await || !had_held {
            break;
        }
    }
    let held = match &flusher.held {
        Some(Held::Unrecorded(f)) => f.samples,
        _ => 0,
    };
    held + aggregator.current().pending.load(Relaxed)
}

#[cfg(test)]
mod tests;
