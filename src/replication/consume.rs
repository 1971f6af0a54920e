//! Aggregation from the stream (docs/replication.md): per shard, the
//! tallyd that holds its lease reads its subject in order, cuts it into
//! intervals, and writes each as one flush, fenced by the cut record.
//!
//! A shard's sequence, the durable order of replicated ingest:
//!
//! 1. Take the lease (`create` in the leases bucket); renew it every third
//!    of its age. Losing it stops the work at once.
//! 2. Read the last cut. If the subject still holds messages up to it, that
//!    cut was written but not confirmed: load the state before it
//!    (`base`), aggregate exactly its messages into its interval, flush it
//!    under the same identity (so ClickHouse drops or collapses the second
//!    copy), purge, and load the state after it. Otherwise load the state
//!    after it.
//! 3. Aggregate the messages that follow into the open interval: its start
//!    is the first message's stream time, floored to the flush interval,
//!    and never before the last cut's start plus one interval.
//! 4. Cut when a message's stream time passes the interval's end, or when
//!    no message came for one interval (this host's monotonic clock) and
//!    the stream holds no more for the shard:
//!    a. store the state after the interval (`state.<shard>.<seq>.<id>.*`,
//!    `<id>` this attempt's own, written with `create`);
//!    b. write the cut by compare-and-set on the revision read: a lost race
//!    means another tallyd cut this shard, and this one stands down;
//!    c. write the flush to ClickHouse (retried for as long as it takes)
//!    and its row in the flushes table;
//!    d. purge the subject up to the cut's last sequence.
//!
//! A flush's identity is the shard's, whoever writes it: the instance is
//! SipHash-2-4 of `<stream>/<shard>`, the flush id is made from the
//! interval's start, and the rows' host is `replication.host`. No local
//! spool or WAL is used: the stream is the log, and a crash replays from
//! the last confirmed cut.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::cut::{Cut, Cuts, Leases, Written};
use super::publish::{FORMAT, shard_instance};
use super::shard::Shard;
use crate::aggregate::{AggregateLimits, Aggregator, Scratch};
use crate::ledger::dedup::Admit;
use crate::outbox::flush::{Flush, flush_id, tick_of};
use crate::outbox::rowbinary::Bodies;
use crate::outbox::rows;
use crate::protocol::batch::BatchView;
use crate::protocol::statsd::Limits;
use crate::sink::{Queued, Sink, SinkConfig};
use crate::telemetry::replication::{APPLIED, READ_DUPLICATE, TOO_OLD, UNREADABLE};
use crate::telemetry::{BlockStats, Telemetry};

/// What one tallyd's consumer needs.
pub struct Consumer {
    /// The stream, once usable.
    pub link: Arc<super::link::Link>,
    pub stream: String,
    pub shards: u32,
    pub replicas: usize,
    pub lease: Duration,
    /// The rows' host, the same on every tallyd of the stream.
    pub host: String,
    /// Who holds a lease (host id and process), for people reading the KV.
    pub holder: String,
    pub interval: Duration,
    /// Where each shard's deduplication state is opened (`data_dir/replication`).
    pub dir: PathBuf,
    pub dedup_window: u64,
    pub max_gauges: usize,
    pub limits: (AggregateLimits, Limits),
    /// Not yet connected: [`Consumer::run`] connects it.
    pub sink: Sink,
    pub telemetry: Arc<Telemetry>,
}

/// How long an open interval waits for messages the stream says are
/// stored and not yet read, before it is cut anyway.
const BEHIND_WAIT: Duration = Duration::from_secs(5);

/// An interval being aggregated.
struct Open {
    start_ms: u64,
    last_seq: u64,
    aggregator: Aggregator,
    /// The apply's buffers, kept from batch to batch.
    scratch: Scratch,
}

impl Consumer {
    /// Connects to ClickHouse, then works every shard whose lease this
    /// tallyd can take, until `stop`.
    pub async fn run(self, config: SinkConfig, stop: watch::Receiver<bool>) {
        let js = tokio::select! {
            p = self.link.ready() => p.context().clone(),
            _ = sleep_or_stop(Duration::MAX, &stop) => return,
        };
        // The stream's backlog is watched from here on, held or not and
        // with ClickHouse up or not.
        let lag = tokio::spawn(watch_lag(
            js.clone(),
            self.stream.clone(),
            self.shards,
            self.lease / 3,
            Arc::clone(&self.telemetry),
        ));
        self.connect_and_work(js, config, stop).await;
        lag.abort();
    }

    async fn connect_and_work(
        mut self,
        js: jetstream::Context,
        config: SinkConfig,
        stop: watch::Receiver<bool>,
    ) {
        let mut attempt = 0;
        while let Err(e) = self.sink.connect().await {
            let delay = crate::sink::backoff(attempt, config.retry_initial, config.retry_max, 1.0);
            let error = crate::sink::describe(&e);
            self.sink.count_retry(&error);
            tracing::warn!(%error, url = %config.url, retry_in = ?delay, "ClickHouse is not usable yet; the replication shards wait in the stream");
            if sleep_or_stop(delay, &stop).await {
                return;
            }
            attempt += 1;
        }
        let this = Arc::new(self);
        this.work_shards(js, stop).await
    }

    async fn work_shards(self: Arc<Self>, js: jetstream::Context, stop: watch::Receiver<bool>) {
        let (cuts, leases) = loop {
            let opened = async {
                let cuts = Cuts::open(&js, &self.stream, self.replicas).await?;
                let leases = Leases::open(&js, &self.stream, self.replicas, self.lease).await?;
                Ok::<_, String>((cuts, leases))
            };
            match opened.await {
                Ok(b) => break b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the replication buckets; retrying");
                    if sleep_or_stop(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        let mut tasks = Vec::new();
        for n in 0..self.shards {
            let this = Arc::clone(&self);
            let (cuts, leases, stop) = (cuts.clone(), leases.clone(), stop.clone());
            tasks.push(tokio::spawn(this.shard(n, js.clone(), cuts, leases, stop)));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stands by for shard `n`'s lease, works it while held, and gives it
    /// back at a stop.
    async fn shard(
        self: Arc<Self>,
        n: u32,
        js: jetstream::Context,
        cuts: Cuts,
        leases: Leases,
        mut stop: watch::Receiver<bool>,
    ) {
        let every = self.lease / 3;
        loop {
            if *stop.borrow() {
                return;
            }
            match leases.take(n, &self.holder).await {
                Ok(Some(revision)) => {
                    tracing::info!(
                        shard = n,
                        "took the replication shard's lease; aggregating it"
                    );
                    self.telemetry.replication.set_lease(n, true);
                    let held = AtomicU64::new(revision);
                    let why = tokio::select! {
                        r = self.work(n, &js, &cuts) => {
                            // Given back, so that this tallyd (or
                            // another) takes it again at once.
                            leases.release(n, held.load(Relaxed)).await;
                            match r {
                                Err(e) => e,
                                Ok(never) => match never {},
                            }
                        }
                        r = renew(&leases, n, &self.holder, &held, every) => r,
                        _ = stop.changed() => {
                            leases.release(n, held.load(Relaxed)).await;
                            self.telemetry.replication.set_lease(n, false);
                            return;
                        }
                    };
                    self.telemetry.replication.set_lease(n, false);
                    let why = super::publish::explain(&why);
                    self.telemetry.replication.consume_failed(&why);
                    tracing::warn!(shard = n, why = %why, "stopped aggregating the replication shard; standing by");
                }
                Ok(None) => {}
                Err(e) => {
                    let e = format!(
                        "cannot reach the lease bucket: {}",
                        super::publish::explain(&e)
                    );
                    self.telemetry.replication.consume_failed(&e);
                    tracing::warn!(shard = n, error = %e, "standing by");
                }
            }
            if sleep_or_stop(every, &stop).await {
                return;
            }
        }
    }

    /// Steps 2 to 4 of the module's sequence, until an error or a fence.
    async fn work(
        &self,
        n: u32,
        js: &jetstream::Context,
        cuts: &Cuts,
    ) -> Result<Infallible, String> {
        let subject = super::publish::subject(&self.stream, n);
        let stream = js
            .get_stream(&self.stream)
            .await
            .map_err(|e| format!("cannot read stream {}: {e}", self.stream))?;
        let last = cuts.last(n).await?;
        let first = first_sequence(&stream, &subject).await?;
        let replay = last.filter(|(c, _)| first.is_some_and(|f| f <= c.seq));
        let mut shard = match (&last, replay) {
            (None, _) => self.load(n, Vec::new()).await?,
            (Some((c, _)), Some(_)) => {
                let state = cuts.state(n, c.base_seq, c.base_id, c.base_state).await?;
                self.load(n, state).await?
            }
            (Some((c, _)), None) => {
                let state = cuts.state(n, c.seq, c.state_id, c.state).await?;
                self.load(n, state).await?
            }
        };
        shard.last = last;
        if let Some((c, _)) = replay {
            tracing::info!(shard = n, cut = c.seq, "replaying a cut not yet confirmed");
        }
        let mut replay = replay.map(|(c, _)| c);
        let reader = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot read subject {subject}: {e}"))?;
        let mut messages = reader
            .messages()
            .await
            .map_err(|e| format!("cannot read subject {subject}: {e}"))?;
        let mut open: Option<Open> = None;
        let interval_ms = millis(self.interval).max(1);
        // An open interval is cut when nothing more is stored and nothing
        // came for one interval (waited on this host's monotonic clock,
        // whatever its wall clock or the stream leader's say), or after
        // BEHIND_WAIT of silence while the stream says more is stored (a
        // reader stalled). A backlog is read whole, not cut at each pause.
        let mut behind = 0u64;
        let mut last_read = tokio::time::Instant::now();
        loop {
            let idle_cut = match (&open, replay) {
                (Some(_), None) if behind == 0 => Some(last_read + self.interval),
                (Some(_), None) => Some(last_read + BEHIND_WAIT),
                _ => None,
            };
            let next = match idle_cut {
                Some(at) => tokio::time::timeout_at(at, messages.next()).await.ok(),
                None => Some(messages.next().await),
            };
            let message = match next {
                None => {
                    if let Some(o) = open.take() {
                        self.cut(&mut shard, o, cuts, &stream, &subject).await?;
                    }
                    continue;
                }
                Some(None) => return Err(format!("the reader of {subject} ended")),
                Some(Some(Err(e))) => return Err(format!("reading {subject}: {e}")),
                Some(Some(Ok(m))) => m,
            };
            last_read = tokio::time::Instant::now();
            let info = message
                .info()
                .map_err(|e| format!("a message without its info: {e}"))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let at_ms =
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            behind = pending;
            if let Some(c) = replay.filter(|c| seq > c.seq) {
                // The replayed cut's last message is gone: it was purged,
                // and a purge follows a confirmation (by the tallyd that
                // held the shard before). Nothing to write again.
                open = None;
                self.load_after(&mut shard, c, cuts).await?;
                replay = None;
            }
            if let Some(c) = replay {
                let o = open.get_or_insert_with(|| self.open(c.start));
                self.apply(&mut shard, o, seq, &message);
                if seq == c.seq {
                    let o = open.take().unwrap_or_else(|| self.open(c.start));
                    self.confirm_replayed(&mut shard, o, c, cuts, &stream, &subject)
                        .await?;
                    replay = None;
                }
                continue;
            }
            if let Some(o) = open.take_if(|o| at_ms >= o.start_ms.saturating_add(interval_ms)) {
                self.cut(&mut shard, o, cuts, &stream, &subject).await?;
            }
            let o = match open.as_mut() {
                Some(o) => o,
                None => {
                    let floor = at_ms - at_ms % interval_ms;
                    let after = shard
                        .last
                        .map_or(0, |(c, _)| c.start.saturating_add(c.interval_ms));
                    open.insert(self.open(floor.max(after)))
                }
            };
            self.apply(&mut shard, o, seq, &message);
        }
    }

    /// Shard `n`'s state from `state` ([`super::state`] bytes; empty: a
    /// fresh one), its deduplication file under `dir`.
    async fn load(&self, n: u32, state: Vec<u8>) -> Result<Shard, String> {
        let dir = self.dir.join(format!("{}-{n}", self.stream));
        Shard::load(n, dir, self.dedup_window, self.max_gauges, state).await
    }

    fn open(&self, start_ms: u64) -> Open {
        let (limits, parse) = self.limits;
        Open {
            start_ms,
            last_seq: 0,
            aggregator: Aggregator::new(limits, parse, Duration::from_millis(start_ms)),
            scratch: Scratch::default(),
        }
    }

    /// Applies one message's batch, once per (client, sequence).
    fn apply(&self, shard: &mut Shard, o: &mut Open, seq: u64, message: &jetstream::Message) {
        o.last_seq = seq;
        let r = &self.telemetry.replication;
        let format = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Tallyd-Format"))
            .map(|v| v.as_str());
        let batch = match (format, BatchView::decode(&message.payload)) {
            (Some(FORMAT), Ok(b)) => b,
            _ => {
                r.read[UNREADABLE].fetch_add(1, Relaxed);
                tracing::warn!(
                    seq,
                    "a stream message that is not a tallyd batch of format 1; skipped"
                );
                return;
            }
        };
        let admitted = shard
            .dedup
            .admit(batch.client_id, batch.sequence, || Ok::<_, Infallible>(()));
        match admitted {
            Ok(Admit::Accepted(())) => {
                let mut stats = BlockStats::default();
                o.aggregator
                    .ingest_batch(&batch, &mut o.scratch, &mut stats);
                r.read[APPLIED].fetch_add(1, Relaxed);
            }
            Ok(Admit::Duplicate) => {
                r.read[READ_DUPLICATE].fetch_add(1, Relaxed);
            }
            Ok(Admit::TooOld | Admit::BadClientId) => {
                r.read[TOO_OLD].fetch_add(1, Relaxed);
                tracing::warn!(
                    seq,
                    client = batch.client_id,
                    sequence = batch.sequence,
                    "a stored batch below its client's deduplication window; skipped"
                );
            }
            Err(never) => match never {},
        }
    }

    /// Step 4: the open interval's state stored, its cut written (fenced),
    /// its flush written and confirmed, its messages purged.
    async fn cut(
        &self,
        shard: &mut Shard,
        o: Open,
        cuts: &Cuts,
        stream: &stream::Stream,
        subject: &str,
    ) -> Result<(), String> {
        let (start_ms, seq) = (o.start_ms, o.last_seq);
        let flush = self.seal(shard, o).await?;
        let state = shard.snapshot();
        let state_id = super::state::attempt_id();
        let chunks = cuts.put_state(shard.n, seq, state_id, &state).await?;
        let (base_seq, base_state, base_id) = shard
            .last
            .map_or((0, 0, 0), |(c, _)| (c.seq, c.state, c.state_id));
        let cut = Cut {
            v: 1,
            seq,
            start: start_ms,
            interval_ms: millis(self.interval),
            state: chunks,
            state_id,
            base_seq,
            base_state,
            base_id,
        };
        match cuts.write(shard.n, cut, shard.last.map(|(_, r)| r)).await? {
            Written::Fenced => {
                self.telemetry.replication.fenced.fetch_add(1, Relaxed);
                cuts.drop_state(shard.n, seq, state_id).await;
                return Err(format!(
                    "another tallyd cut shard {} first (fenced)",
                    shard.n
                ));
            }
            Written::Stored(revision) => {
                self.telemetry.replication.cuts.fetch_add(1, Relaxed);
                let older = shard.last.replace((cut, revision));
                crate::failpoint::hit("after_cut");
                self.deliver(flush).await;
                crate::failpoint::hit("after_cut_insert");
                purge(stream, subject, seq).await?;
                // The state before this cut's base: no cut names it now.
                if let Some((c, _)) = older {
                    cuts.drop_state(shard.n, c.base_seq, c.base_id).await;
                }
            }
        }
        Ok(())
    }

    /// Step 2: a cut found written but not confirmed, aggregated again:
    /// written under its identity, purged, and the state after it loaded.
    async fn confirm_replayed(
        &self,
        shard: &mut Shard,
        o: Open,
        c: Cut,
        cuts: &Cuts,
        stream: &stream::Stream,
        subject: &str,
    ) -> Result<(), String> {
        let flush = self.seal(shard, o).await?;
        self.deliver(flush).await;
        purge(stream, subject, c.seq).await?;
        self.load_after(shard, c, cuts).await
    }

    /// The state after cut `c`, in place of the shard's.
    async fn load_after(&self, shard: &mut Shard, c: Cut, cuts: &Cuts) -> Result<(), String> {
        let state = cuts.state(shard.n, c.seq, c.state_id, c.state).await?;
        let last = shard.last;
        *shard = self.load(shard.n, state).await?;
        shard.last = last;
        Ok(())
    }

    /// The open interval's flush, under the shard's identity: the same
    /// rows and token whichever tallyd seals it (the rows' order may
    /// differ).
    async fn seal(&self, shard: &mut Shard, o: Open) -> Result<Flush, String> {
        let instance = shard_instance(&self.stream, shard.n);
        let tick = tick_of(Duration::from_millis(o.start_ms));
        let generation = o.aggregator.swap(Duration::from_millis(o.start_ms));
        let generation =
            Arc::try_unwrap(generation).map_err(|_| "an interval still in use".to_string())?;
        // Samples stamped for other intervals get the ids that follow.
        let mut late = 0u64;
        let mut next_id = || {
            late += 1;
            flush_id(tick.saturating_add(late), instance)
        };
        let (flush, forgotten) = rows::build(
            generation,
            flush_id(tick, instance),
            &self.host,
            instance,
            &mut shard.gauges,
            &mut next_id,
            Bodies::default(),
        );
        self.telemetry
            .dropped_gauge_memory
            .fetch_add(forgotten, Relaxed);
        Ok(flush)
    }

    /// Step 4c: every table, retried for as long as it takes, then the
    /// flush's row in the flushes table.
    async fn deliver(&self, flush: Flush) {
        let q = Queued::in_memory(flush, false);
        self.sink.write(&q).await;
        self.sink.confirm(&q.flush).await;
    }
}

/// Keeps `tallyd_replication_lag_messages{shard}` current: the messages
/// each shard's subject holds (stored, not yet confirmed in ClickHouse),
/// read every `every`, whoever holds the shard. Never returns.
async fn watch_lag(
    js: jetstream::Context,
    stream: String,
    shards: u32,
    every: Duration,
    telemetry: Arc<Telemetry>,
) {
    let all = format!("tallyd.{stream}.*");
    loop {
        let counted = async {
            let s = js.get_stream(&stream).await.ok()?;
            let mut subjects = s.info_with_subjects(&all).await.ok()?;
            let mut counts = vec![0u64; shards as usize];
            while let Some(next) = subjects.next().await {
                let (subject, count) = next.ok()?;
                let shard = subject
                    .rsplit('.')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(c) = shard.and_then(|n| counts.get_mut(n)) {
                    *c = count as u64;
                }
            }
            Some(counts)
        };
        if let Ok(Some(counts)) = tokio::time::timeout(every, counted).await {
            for (n, lag) in (0u32..).zip(counts) {
                telemetry.replication.set_lag(n, lag);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Renews the lease held at `held` every `every` (a third of the lease);
/// returns why it was lost. A renewal not answered within `every` counts
/// as lost, so the work stops at least a third of the lease before another
/// tallyd may take it.
async fn renew(leases: &Leases, n: u32, holder: &str, held: &AtomicU64, every: Duration) -> String {
    loop {
        tokio::time::sleep(every).await;
        let renewed = leases.renew(n, holder, held.load(Relaxed));
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(revision))) => held.store(revision, Relaxed),
            Ok(Ok(None)) => return "the lease aged out and another tallyd took it".into(),
            Ok(Err(e)) => return format!("could not renew the lease: {e}"),
            Err(_) => return format!("the lease's renewal was not answered within {every:?}"),
        }
    }
}

/// The subject's first stored sequence (`None`: it holds nothing).
async fn first_sequence(stream: &stream::Stream, subject: &str) -> Result<Option<u64>, String> {
    match stream.get_first_raw_message_by_subject(subject, 1).await {
        Ok(m) => Ok(Some(m.sequence)),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("cannot read {subject}'s first message: {e}")),
    }
}

/// Removes the subject's messages up to `seq` (a confirmed cut's).
async fn purge(stream: &stream::Stream, subject: &str, seq: u64) -> Result<(), String> {
    stream
        .purge()
        .filter(subject)
        .sequence(seq.saturating_add(1))
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot purge {subject} up to {seq}: {e}"))
}

/// Sleeps `d`; true when `stop` turned true meanwhile.
async fn sleep_or_stop(d: Duration, stop: &watch::Receiver<bool>) -> bool {
    let mut stop = stop.clone();
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
