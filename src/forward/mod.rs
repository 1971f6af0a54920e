//! The edge's forwarder: the outbox's second destination. With
//! `[forward] upstreams`, a recorded flush goes to aggregator tallyds
//! instead of ClickHouse, as protobuf batches of forwarded state (protocol
//! version 2; [`encode`] makes them), and is complete (its spool file
//! goes) only once every part is acknowledged.
//!
//! The durable order is the sink's ([`crate::ledger`], steps 6 and 7):
//!
//! 1. the flush's *plan* ([`plan`]: the upstreams its keys are spread
//!    over, those live now, and the batch size and host settings in
//!    force) is written in its sent marker before the first byte goes
//!    out: from then on the flush is never merged or joined, and every
//!    send of it, after a restart or a config change too, carries the same
//!    rows to the same upstreams under the same sequences, as the client
//!    of its own recorded host and instance;
//! 2. each upstream gets its parts (pipelined on one TCP connection), and
//!    a part is done when the upstream answers `OK` (its WAL record is
//!    durable under the aggregator's `wal.sync`) or `DUPLICATE` (it took
//!    it before: an ack was lost, or this edge restarted after sending),
//!    either with protocol version 2;
//! 3. when every part of every upstream of its plan is done, the flush is
//!    complete and its spool file goes.
//!
//! **Failover.** An upstream that fails (refused, timed out, cut) is down
//! and tried again after a capped exponential backoff with jitter. Flushes
//! planned meanwhile leave it out, so their keys of its share go to the
//! live ones (rendezvous hashing moves only those keys). A flush whose
//! plan names it waits, in the spool and apart, until it answers; later
//! flushes go on. An upstream gets no newer flush of an edge while an
//! older one waits for it (within a run, and after a restart, where the
//! spool's flushes go oldest first), so it sees each edge's flushes in
//! order, inside its deduplication window. With every upstream down,
//! flushes wait in the spool (the outage buffer, merged past
//! `spool.max_size`). One upstream that does not answer holds the others
//! up to `forward.timeout` per attempt: shares are sent one after another.
//!
//! **The hazard of a second aggregator.** A flush re-sent to another
//! aggregator after the first may have taken it would count twice: so a
//! flush is only ever sent to the upstreams of its plan. Its keys reach a
//! row once per interval and aggregator; with failover a key may have two
//! partial rows for one interval (one per aggregator), whose sums are
//! exact. An upstream lost for good holds the flushes planned with it
//! (`tallyd_forward_waiting`). Removing it from `upstreams` (and a
//! restart) declares it lost: the keys it held of those flushes go to the
//! others of their plans, in parts numbered apart from the parts those
//! took ([`encode::Shape::lost`]), or, when every upstream of a plan is
//! gone, the flush is planned again over the live ones; rows a lost one
//! had taken then count twice, which is what declaring it lost accepts.
//!
//! `REJECTED` and an answer without protocol version 2 (an older tallyd,
//! which cannot read state) are logged as errors and retried with the same
//! backoff: nothing is completed that an aggregator did not take. Some do
//! not pass by waiting: a frame over the aggregator's `proto.max_frame`
//! (raise it), or a sequence below its deduplication window (the
//! aggregator lost its state, or this edge's spool file of a flush it had
//! completed could not be removed and was sent again after a restart; the
//! log names the flush: remove its spool file by hand).
//!
//! Files: [`encode`] (a flush's bodies as protobuf batches, rendezvous
//! hashing), [`plan`] (a flush's plan in its sent marker), `link.rs` (one
//! upstream's round of parts and acks).

pub mod encode;
mod link;
mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::ForwardConfig;
use crate::ledger::Ledger;
use crate::sink::{Queued, backoff, jitter};
use crate::telemetry::Telemetry;
use crate::telemetry::fleet::UpstreamStats;
use link::Failed;
use plan::Plan;
use std::io::ErrorKind;

pub struct Forwarder {
    pub config: ForwardConfig,
    /// This edge's host (the rows' `host` under `forward.host = "keep"`).
    pub host: String,
    pub ledger: Arc<Ledger>,
    pub telemetry: Arc<Telemetry>,
}

/// One upstream as the forwarder sees it.
#[derive(Default)]
struct Upstream {
    link: Option<link::Link>,
    /// Down until then (after a failure), when it is tried again.
    down_until: Option<Instant>,
    failures: u32,
    /// Rows it took.
    rows: u64,
}

/// A flush's parts for one upstream of its plan.
struct Share {
    /// The upstream's index in `forward.upstreams`.
    upstream: usize,
    frames: Vec<Vec<u8>>,
    done: Vec<bool>,
    rows: u64,
}

impl Share {
    fn is_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }
}

/// A flush on its way: its shares, some perhaps done.
struct InFlight {
    q: Queued,
    shares: Vec<Share>,
}

impl Forwarder {
    /// Forwards flushes until the queue closes and no flush is parked or
    /// waiting: the queue's first, then those parked in the spool, oldest
    /// first; flushes waiting for a down upstream are tried again as it
    /// comes due.
    pub async fn run(self, mut queue: mpsc::Receiver<Queued>) {
        let mut ups: Vec<Upstream> = self
            .config
            .upstreams
            .iter()
            .map(|_| Upstream::default())
            .collect();
        let mut waiting: BTreeMap<u64, InFlight> = BTreeMap::new();
        let mut open = true;
        let fleet = &self.telemetry.fleet;
        fleet
            .max_lag_secs
            .store(self.config.max_lag.as_secs().max(1), Relaxed);
        *crate::lock(&fleet.upstreams) = self
            .config
            .upstreams
            .iter()
            .map(|name| UpstreamStats {
                name: name.clone(),
                up: true,
                ..UpstreamStats::default()
            })
            .collect();
        loop {
            self.retry_waiting(&mut ups, &mut waiting).await;
            self.publish(&ups, &waiting);
            if queue.is_closed() && queue.is_empty() {
                open = false;
            }
            let now = Instant::now();
            // When a waiting flush's upstream comes due (only those: an
            // upstream nothing waits for is tried with the next flush).
            let due = waiting
                .values()
                .flat_map(|f| f.shares.iter().filter(|s| !s.is_done()))
                .filter_map(|s| ups[s.upstream].down_until)
                .filter(|&t| t > now)
                .min();
            if live(&ups, &waiting).is_empty() {
                if !open {
                    return self.stop(&waiting);
                }
                // Every upstream down or holding a waiting flush: new
                // flushes stay queued or parked until one is due.
                let soonest = ups.iter().filter_map(|u| u.down_until).min();
                let at = soonest.unwrap_or(now).max(now + self.config.retry_initial);
                tokio::time::sleep_until(at).await;
                continue;
            }
            let q = match queue.try_recv() {
                Ok(q) => Some(q),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    self.next_parked().await
                }
                Err(mpsc::error::TryRecvError::Empty) => self.next_parked().await,
            };
            let q = match q {
                Some(q) => q,
                None if !open => return self.stop(&waiting),
                None => {
                    let retry = async {
                        match due {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        q = queue.recv() => match q {
                            Some(q) => q,
                            None => { open = false; continue; }
                        },
                        _ = self.ledger.parked() => continue,
                        _ = retry => continue,
                    }
                }
            };
            if let Some(f) = self.start(q, &mut ups, &waiting).await
                && let Some(f) = self.attempt(f, &mut ups, &waiting).await
            {
                waiting.insert(f.q.flush.flush_id, f);
            }
            self.publish(&ups, &waiting);
        }
    }

    /// The queue is closed and nothing is parked: what waits for a down
    /// upstream stays in the spool (its plan in its marker) for the next
    /// start.
    fn stop(&self, waiting: &BTreeMap<u64, InFlight>) {
        if !waiting.is_empty() {
            tracing::info!(
                flushes = waiting.len(),
                "stopping with flushes that wait for a down upstream; they stay in the spool and go at the next start"
            );
        }
    }

    /// The upstreams' state in `/metrics`.
    fn publish(&self, ups: &[Upstream], waiting: &BTreeMap<u64, InFlight>) {
        let fleet = &self.telemetry.fleet;
        fleet.waiting.store(waiting.len() as u64, Relaxed);
        let mut stats = crate::lock(&fleet.upstreams);
        for (u, (up, s)) in ups.iter().zip(stats.iter_mut()).enumerate() {
            s.up = up.failures == 0;
            s.rows = up.rows;
            s.waiting = waiting
                .values()
                .filter(|f| f.shares.iter().any(|sh| sh.upstream == u && !sh.is_done()))
                .count() as u64;
        }
    }

    /// Steps 1 and 2's first attempt for one flush: its rows read back, its
    /// plan fixed and written, its shares encoded. `None` when nothing is
    /// left to send (a damaged flush, counted).
    async fn start(
        &self,
        q: Queued,
        ups: &mut [Upstream],
        waiting: &BTreeMap<u64, InFlight>,
    ) -> Option<InFlight> {
        let flush_id = q.flush.flush_id;
        let bodies = match &q.spooled {
            None => Ok(q.flush.tables.clone()),
            Some(ranges) => {
                let (l, f, r) = (Arc::clone(&self.ledger), Arc::clone(&q.flush), *ranges);
                blocking(move || l.read_bodies(&f, &r)).await
            }
        };
        let bodies = match bodies {
            Ok(bodies) => bodies,
            // Damaged (quarantined by the ledger, see /health) or gone.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidData | ErrorKind::NotFound) => {
                return self.lose(&q, &e.to_string()).await;
            }
            Err(e) => return self.later(&q, &e.to_string()).await,
        };
        let plan = match self.plan(&q, ups, waiting).await {
            Ok(plan) => plan,
            Err(e) => return self.later(&q, &e).await,
        };
        // The flush's own host and instance, whatever the config says now:
        // every send of it is the same client and the same rows.
        let client_id = encode::client_id(&q.flush.host, q.flush.instance);
        let index: Vec<Option<usize>> = plan
            .upstreams
            .iter()
            .map(|n| self.config.upstreams.iter().position(|u| u == n))
            .collect();
        let lost: Vec<bool> = index.iter().map(Option::is_none).collect();
        if lost.iter().any(|&l| l) {
            tracing::warn!(flush_id, plan = ?plan.upstreams, upstreams = ?self.config.upstreams, "a waiting flush was planned with upstreams no longer configured: their keys go to the others of its plan (declared lost: rows they took may count twice)");
        }
        let shape = encode::Shape {
            upstreams: &plan.upstreams,
            lost: &lost,
            client_id: &client_id,
            flush_id,
            host: &q.flush.host,
            keep_host: plan.keep_host,
            host_except: &plan.host_except,
            batch_size: plan.batch_size,
        };
        let framed = match encode::frames(&bodies, &shape) {
            Ok(framed) => framed,
            Err(e) => return self.lose(&q, &e).await,
        };
        drop(bodies);
        let shares = framed
            .into_iter()
            .zip(&index)
            .filter_map(|(f, u)| Some((f, (*u)?)))
            .filter(|(f, _)| !f.frames.is_empty())
            .map(|(f, upstream)| Share {
                upstream,
                rows: f.rows,
                done: vec![false; f.frames.len()],
                frames: f.frames,
            })
            .collect();
        Some(InFlight { q, shares })
    }

    /// A flush that cannot go now (its bodies or its marker could not be
    /// read: not damaged, an I/O error): parked again, to be read back and
    /// tried after a pause.
    async fn later(&self, q: &Queued, error: &str) -> Option<InFlight> {
        let flush_id = q.flush.flush_id;
        self.telemetry.spool_errors.fetch_add(1, Relaxed);
        let delay = self.config.retry_initial.max(Duration::from_millis(100));
        tracing::error!(%error, flush_id, retry_in = ?delay, "cannot read a flush back from the spool; it stays there and is tried again");
        tokio::time::sleep(delay).await;
        self.ledger.park(flush_id);
        None
    }

    /// A flush whose bodies cannot be read back or do not read as rows:
    /// its rows are counted as lost (a damaged file is quarantined by the
    /// ledger, see /health) and it goes.
    async fn lose(&self, q: &Queued, error: &str) -> Option<InFlight> {
        let flush_id = q.flush.flush_id;
        let lost: u64 = q.flush.tables.rows.iter().map(|&r| u64::from(r)).sum();
        self.telemetry.rows_lost_damaged.fetch_add(lost, Relaxed);
        tracing::error!(%error, flush_id, rows = lost, "a flush's spool file is damaged or gone; its rows are lost");
        self.complete(flush_id).await;
        None
    }

    /// Flush `q`'s plan ([`plan`]): the one in its sent marker when it has
    /// one, else a new one over the live upstreams (at least one:
    /// [`Forwarder::run`] takes no flush without) and the settings in
    /// force, written in the marker before it is returned. A plan whose
    /// every upstream was removed from the config is made again (declared
    /// lost). An error when the marker cannot be read.
    async fn plan(
        &self,
        q: &Queued,
        ups: &mut [Upstream],
        waiting: &BTreeMap<u64, InFlight>,
    ) -> Result<Plan, String> {
        let flush_id = q.flush.flush_id;
        if q.resent {
            let l = Arc::clone(&self.ledger);
            let text = blocking(move || l.sent_plan(flush_id))
                .await
                .map_err(|e| format!("reading its sent marker: {e}"))?;
            match Plan::decode(&text) {
                Ok(Some(plan))
                    if plan
                        .upstreams
                        .iter()
                        .any(|u| self.config.upstreams.contains(u)) =>
                {
                    return Ok(plan);
                }
                Ok(Some(plan)) => {
                    tracing::warn!(flush_id, plan = ?plan.upstreams, "every upstream of a waiting flush's plan was removed from the config: planned again over the live ones (declared lost: rows they took may count twice)");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(flush_id, error = %e, "a flush's sent marker does not read; planned again (rows an upstream took may count twice)");
                }
            }
        }
        let plan = Plan {
            upstreams: live(ups, waiting)
                .into_iter()
                .map(|u| self.config.upstreams[u].clone())
                .collect(),
            batch_size: self.config.batch_size,
            keep_host: self.config.keep_host,
            host_except: self.config.host_except.clone(),
        };
        let text = plan.encode();
        let mut attempt = 0u32;
        loop {
            let (l, text) = (Arc::clone(&self.ledger), text.clone());
            match blocking(move || l.sending_to(flush_id, text.as_bytes())).await {
                Ok(()) => return Ok(plan),
                Err(e) => {
                    let c = &self.config;
                    let delay = backoff(attempt, c.retry_initial, c.retry_max, jitter());
                    self.telemetry.spool_errors.fetch_add(1, Relaxed);
                    tracing::error!(error = %e, flush_id, retry_in = ?delay, "cannot write a flush's sent marker; it is not forwarded until it can");
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// One attempt at every share of `f` not yet done; the flush is
    /// complete when all are, else it comes back to wait.
    async fn attempt(
        &self,
        mut f: InFlight,
        ups: &mut [Upstream],
        waiting: &BTreeMap<u64, InFlight>,
    ) -> Option<InFlight> {
        let id = f.q.flush.flush_id;
        for share in &mut f.shares {
            if share.is_done() {
                continue;
            }
            let up = &mut ups[share.upstream];
            if up.down_until.is_some_and(|t| t > Instant::now()) {
                continue;
            }
            // An upstream sees each edge's flushes in order: an older one
            // that waits for it goes first (else its sequences would fall
            // below the upstream's deduplication window).
            let older_waits = waiting.range(..id).any(|(_, w)| {
                w.shares
                    .iter()
                    .any(|s| s.upstream == share.upstream && !s.is_done())
            });
            if older_waits {
                continue;
            }
            let name = &self.config.upstreams[share.upstream];
            let sent = tokio::time::timeout(
                self.config.timeout.saturating_mul(4),
                self.round(name, &share.frames, &mut share.done, &mut up.link),
            )
            .await
            .unwrap_or(Err(Failed::Timeout(self.config.timeout)));
            match sent {
                Ok(()) => {
                    if up.failures > 0 {
                        tracing::info!(upstream = %name, "the upstream takes forwarded flushes again");
                    }
                    (up.failures, up.down_until) = (0, None);
                    up.rows = up.rows.saturating_add(share.rows);
                    let t = &self.telemetry;
                    t.fleet
                        .batches
                        .fetch_add(share.frames.len() as u64, Relaxed);
                    let rows = if f.q.resent {
                        &t.fleet.rows_resent
                    } else {
                        &t.fleet.rows
                    };
                    rows.fetch_add(share.rows, Relaxed);
                }
                Err(e) => {
                    up.link = None;
                    let c = &self.config;
                    let delay = backoff(up.failures, c.retry_initial, c.retry_max, jitter());
                    up.failures = up.failures.saturating_add(1);
                    up.down_until = Some(Instant::now() + delay);
                    self.telemetry.fleet.retries.fetch_add(1, Relaxed);
                    match &e {
                        Failed::Refused { .. } | Failed::TooOld(_) => {
                            tracing::error!(upstream = %name, error = %e, retry_in = ?delay, "an upstream refuses a forwarded flush; it waits in the spool")
                        }
                        _ => {
                            tracing::warn!(upstream = %name, error = %e, retry_in = ?delay, "forwarding failed; the upstream's flushes wait, new ones go to the live upstreams")
                        }
                    }
                }
            }
        }
        if f.shares.iter().all(Share::is_done) {
            self.complete(id).await;
            return None;
        }
        Some(f)
    }

    /// Tries the waiting flushes again, oldest first, where their upstream
    /// has come due.
    async fn retry_waiting(&self, ups: &mut [Upstream], waiting: &mut BTreeMap<u64, InFlight>) {
        let now = Instant::now();
        let due: Vec<u64> = waiting
            .iter()
            .filter(|(_, f)| {
                f.shares
                    .iter()
                    .any(|s| !s.is_done() && ups[s.upstream].down_until.is_none_or(|t| t <= now))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(f) = waiting.remove(&id)
                && let Some(f) = self.attempt(f, ups, waiting).await
            {
                waiting.insert(id, f);
            }
        }
    }

    /// The oldest parked flushes, read back ([`crate::sink::next_parked`]).
    async fn next_parked(&self) -> Option<Queued> {
        crate::sink::next_parked(&self.ledger).await
    }

    /// Step 3: the flush's spool file goes.
    async fn complete(&self, flush_id: u64) {
        let l = Arc::clone(&self.ledger);
        if let Err(e) = blocking(move || l.complete(flush_id)).await {
            // Its upstreams took it: sent again at the next start, it is
            // refused as older than their window (see the module doc).
            tracing::error!(error = %e, flush_id, "could not remove a forwarded flush from the spool: remove its file by hand before the next start");
        }
        crate::ledger::publish_backlog(&self.ledger, &self.telemetry);
    }
}

/// The upstreams a new flush may be planned with: not down, and with no
/// older flush waiting for them (so each sees an edge's flushes in order).
fn live(ups: &[Upstream], waiting: &BTreeMap<u64, InFlight>) -> Vec<usize> {
    let now = Instant::now();
    (0..ups.len())
        .filter(|&u| ups[u].down_until.is_none_or(|t| t <= now))
        .filter(|&u| {
            !waiting
                .values()
                .any(|f| f.shares.iter().any(|s| s.upstream == u && !s.is_done()))
        })
        .collect()
}

/// Runs blocking spool work off the tokio workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
}

#[cfg(test)]
mod tests;
