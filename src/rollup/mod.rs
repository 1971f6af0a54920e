//! Rollups and retention: the stage after the sink. It owns the minute
//! and hour rollup tables ([`sql`]), the job that keeps them equal to the
//! raw rows they cover ([`Rollups::run`]), and retention, which drops
//! whole partitions past their age on every ClickHouse ([`retention`]).
//!
//! # Design: ClickHouse computes, tallyd decides when
//!
//! A rollup is an `INSERT … SELECT … FINAL` that ClickHouse runs over one
//! writer's raw rows of one minute (and an hour's over its minutes), into
//! a `ReplacingMergeTree(version)` keyed by series, period and writer:
//! computing it again *replaces* it. tallyd holds no rollup state in
//! memory or on disk; it only decides which periods to (re)compute, from
//! what it knows and nobody else does: when rows of a period landed.
//! The other design, tallyd folding closed intervals into minute and hour
//! accumulators itself, would double or triple the memory per key, and
//! a crash would lose the accumulators of the open minute and hour, whose
//! raw rows have already left the spool and the WAL.
//!
//! # Which periods, exactly once in effect
//!
//! 1. **Confirm.** Once every table of a flush is in ClickHouse, the sink
//!    writes its row in `flushes` ([`crate::sink::flushes`]): the
//!    intervals its rows cover, the writer of its rows, and `confirmed`, a
//!    number drawn from this tallyd's flush id sequence *after* the rows
//!    were acknowledged. Then its spool file goes.
//! 2. **Find.** Every pass (every [`PASS`]), the job reads the minutes of
//!    the flushes this tallyd confirmed since its last pass, each with its
//!    newest `confirmed`, and the newest finished rollup of each
//!    (`tallyd_rollups.started`). A minute is *changed* when a flush
//!    confirmed after its rollup started, or it has none.
//! 3. **Compute.** For a changed minute that is over (and [`SETTLE`]
//!    more), the job draws `started` from the same sequence, runs the four
//!    statements ([`sql::rollup`]: counters, gauges, timers, sets) with
//!    `version = started`, then records the run in `tallyd_rollups`. Hours
//!    follow from the minute runs the same way.
//!
//! Every rule of exactness follows from that order:
//! - a statement sees every row acknowledged before it started, so a
//!   rollup that started after a flush's `confirmed` includes the flush;
//!   one that started before is followed by another;
//! - a re-sent flush, a replay, an outage's backlog and a late `|T`
//!   sample are flushes like any other: their minutes are recomputed,
//!   whole, and the raw table's `FINAL` counts a re-sent row once;
//! - a kill -9 anywhere leaves either no run record (the period is still
//!   changed and is computed again) or a complete one; rows of a run
//!   that did not finish are replaced by the next;
//! - each tallyd computes only the rows whose flush ids carry the writer
//!   tags of flushes it confirmed, so two tallyds never compute the same
//!   rollup row.
//!
//! A minute whose raw rows are past `retention.raw` (less an hour, so that
//! no statement races the partition's drop) is not recomputed: late data
//! that old is counted in `tallyd_rollup_expired_total`.

pub mod read;
pub mod retention;
pub mod sql;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clickhouse::Client;
use tokio::sync::watch;

use crate::clock::wall_clock;
use crate::ledger::Ledger;
use crate::outbox::flush::{flush_id, tag, tick_of};
use crate::sink::SinkConfig;
use crate::sink::schema::quote_ident;
use crate::telemetry::Telemetry;
use sql::Resolution;

/// How long rows are kept at each resolution (`[retention]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw: Duration,
    pub minute: Duration,
    pub hour: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw: Duration::from_secs(2 * 86_400),
            minute: Duration::from_secs(35 * 86_400),
            hour: Duration::from_secs(63_115_200), // "2y": two years of 365.25 days
        }
    }
}

/// How often the job looks for changed periods.
pub const PASS: Duration = Duration::from_secs(5);
/// How long after a minute ends its first rollup waits (for the flush of
/// its last interval); an hour waits this plus a minute's.
pub const SETTLE: u32 = 15;
/// Periods computed per pass at most (the rest in the next passes).
const MAX_PER_PASS: usize = 240;
/// Periods that fail one after another before a pass gives up (the server
/// is the trouble, not the periods).
const MAX_FAILURES_IN_A_ROW: usize = 3;
/// How far back of the newest `confirmed` seen the next pass looks again:
/// far more than an insert can take between drawing its number and being
/// visible, so that no confirmation is missed.
const LOOK_BACK: Duration = Duration::from_secs(600);
/// No rollup of a period whose source rows are this close to their
/// retention: a statement must not race the partition's drop.
const EXPIRY_MARGIN: u32 = 3600;

/// The rollup job of a tallyd that writes ClickHouse.
pub struct Rollups {
    pub config: watch::Receiver<SinkConfig>,
    pub retention: Retention,
    pub ledger: Arc<Ledger>,
    pub telemetry: Arc<Telemetry>,
}

/// A period some writer's rows changed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
struct Changed {
    writer: u32,
    start: u32,
    newest: u64,
}

/// Where each resolution's search resumes.
#[derive(Debug, Default)]
struct Since {
    minute: u64,
    hour: u64,
}

/// What one pass over one resolution did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pass {
    computed: usize,
    /// Changed and not yet computed (not over, or past the pass's limit).
    pending: usize,
    /// When the oldest pending one became due, Unix seconds.
    oldest_due: Option<u32>,
}

impl Pass {
    /// Notes `c`, due, as left for a later pass: pending, and `unsettled`
    /// (where the next search starts) kept at or before its confirmation.
    fn left_due(&mut self, c: &Changed, res: Resolution, unsettled: &mut u64) {
        self.pending += 1;
        *unsettled = (*unsettled).min(c.newest);
        let became_due = c
            .start
            .saturating_add(res.secs())
            .saturating_add(settle(res));
        self.oldest_due = Some(self.oldest_due.map_or(became_due, |o| o.min(became_due)));
    }
}

impl Rollups {
    /// Creates the rollup tables (with `create_schema`), then runs a pass
    /// every [`PASS`] and retention every [`retention::EVERY`], until
    /// `stop`. Failures are counted and logged, and the pass is tried
    /// again: nothing is lost while ClickHouse is away, since the changed
    /// periods are found again from the flushes table.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut since = Since::default();
        // The database and cluster the rollup tables were made in.
        let mut made: Option<(String, Option<String>)> = None;
        let mut next_retention = tokio::time::Instant::now();
        // Tables the sink moved aside so far: a move (at start, racing
        // this job's first retention pass) calls for a pass at once.
        let mut moved_aside = 0;
        // The endpoint in use: `url`, then each replica after a failure.
        let mut endpoint = 0usize;
        loop {
            let config = self.config.borrow_and_update().clone();
            let clients = crate::sink::admin_clients(&config);
            let Some(client) = clients.get(endpoint % clients.len().max(1)).cloned() else {
                return;
            };
            let place = (config.database.clone(), config.cluster.clone());
            if made.as_ref() != Some(&place) {
                match self.make_tables(&client, &config).await {
                    Ok(()) => made = Some(place),
                    Err(e) => {
                        endpoint = endpoint.wrapping_add(1);
                        self.telemetry.rollups.errors.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "could not make the rollup tables yet; trying again");
                    }
                }
            }
            if made.is_some() {
                let now = unix_now();
                let began = std::time::Instant::now();
                let result = self.pass(&client, &config.database, &mut since, now).await;
                self.telemetry
                    .rollups
                    .nanos
                    .fetch_add(began.elapsed().as_nanos() as u64, Relaxed);
                if let Err(e) = result {
                    endpoint = endpoint.wrapping_add(1);
                    self.telemetry.rollups.errors.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "a rollup pass failed; the changed periods are tried again at the next");
                }
                let moved = self.telemetry.rollups.tables_moved_aside.load(Relaxed);
                if moved != moved_aside {
                    moved_aside = moved;
                    next_retention = tokio::time::Instant::now();
                }
                if tokio::time::Instant::now() >= next_retention {
                    next_retention = tokio::time::Instant::now() + retention::EVERY;
                    if let Err(e) = retention::pass(
                        &client,
                        &config.database,
                        &self.retention,
                        &self.telemetry,
                        now,
                    )
                    .await
                    {
                        self.telemetry
                            .rollups
                            .retention_errors
                            .fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "a retention pass failed; tried again later");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PASS) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn make_tables(
        &self,
        client: &Client,
        config: &SinkConfig,
    ) -> Result<(), clickhouse::error::Error> {
        if !config.create_schema {
            return Ok(());
        }
        let version = client
            .query("SELECT version()")
            .fetch_one::<String>()
            .await?;
        let low_cardinality = crate::sink::schema::has_low_cardinality(&version);
        let db = quote_ident(&config.database);
        let on = config
            .cluster
            .as_deref()
            .map_or(String::new(), |c| format!(" ON CLUSTER {}", quote_ident(c)));
        client
            .query(&format!("CREATE DATABASE IF NOT EXISTS {db}{on}"))
            .execute()
            .await?;
        // The flushes table too: the first pass reads it, maybe before the
        // sink has made it.
        let cluster = config.cluster.as_deref();
        for statement in crate::sink::flushes::ddl(&config.database, cluster)
            .into_iter()
            .chain(sql::ddl(&config.database, cluster, low_cardinality))
        {
            client.query(&statement).execute().await?;
        }
        Ok(())
    }

    /// One pass: changed minutes, then changed hours.
    async fn pass(
        &self,
        client: &Client,
        database: &str,
        since: &mut Since,
        now: u32,
    ) -> Result<(), clickhouse::error::Error> {
        let me = tag(self.ledger.instance());
        let minutes = client
            .query(&sql::changed_minutes(database, me, since.minute))
            .fetch_all::<Changed>()
            .await?;
        let m = self
            .compute(
                client,
                database,
                Resolution::Minute,
                &minutes,
                now,
                &mut since.minute,
            )
            .await?;
        let hours = client
            .query(&sql::changed_hours(database, me, since.hour))
            .fetch_all::<Changed>()
            .await?;
        let h = self
            .compute(
                client,
                database,
                Resolution::Hour,
                &hours,
                now,
                &mut since.hour,
            )
            .await?;
        let r = &self.telemetry.rollups;
        r.pending.store((m.pending + h.pending) as u64, Relaxed);
        let oldest = m.oldest_due.into_iter().chain(h.oldest_due).min();
        r.lag_seconds.store(
            oldest.map_or(0, |due| u64::from(now.saturating_sub(due))),
            Relaxed,
        );
        Ok(())
    }

    /// Computes the changed periods of `changed` (at `res`) that are due,
    /// oldest first, and moves `since` on past what is settled.
    async fn compute(
        &self,
        client: &Client,
        database: &str,
        res: Resolution,
        changed: &[Changed],
        now: u32,
        since: &mut u64,
    ) -> Result<Pass, clickhouse::error::Error> {
        let mut pass = Pass::default();
        if changed.is_empty() {
            return Ok(pass);
        }
        let finished = self.finished(client, database, res, changed).await?;
        let kept = match res {
            Resolution::Minute => self.retention.raw,
            Resolution::Hour => self.retention.minute,
        };
        let kept = u32::try_from(kept.as_secs()).unwrap_or(u32::MAX);
        let mut due: Vec<Changed> = Vec::new();
        // The newest confirmation not yet settled: the next pass looks
        // from before it.
        let mut unsettled = u64::MAX;
        for c in changed {
            if finished
                .get(&(c.writer, c.start))
                .is_some_and(|&s| s >= c.newest)
            {
                continue;
            }
            let end = c.start.saturating_add(res.secs());
            let ready = end.saturating_add(settle(res));
            if now < ready {
                pass.pending += 1;
                unsettled = unsettled.min(c.newest);
                continue;
            }
            if end.saturating_add(kept) <= now.saturating_add(EXPIRY_MARGIN) {
                self.telemetry.rollups.expired.fetch_add(1, Relaxed);
                tracing::warn!(
                    resolution = res.name(),
                    start = c.start,
                    writer = c.writer,
                    "rows changed in a period past retention; its rollup is not recomputed"
                );
                continue;
            }
            due.push(*c);
        }
        due.sort_by_key(|c| (c.start, c.writer));
        for c in due.iter().skip(MAX_PER_PASS) {
            pass.left_due(c, res, &mut unsettled);
        }
        let me = tag(self.ledger.instance());
        // A period that fails (its statement refused, a memory limit) is
        // counted and left changed for the next pass; the others go on.
        // Failures in a row mean the server, not the period: the pass ends.
        let mut failures = 0;
        for c in due.iter().take(MAX_PER_PASS) {
            let started = self.ledger.next_flush_id(wall_clock());
            let result = self
                .compute_one(client, database, res, *c, started, me)
                .await;
            if let Err(e) = result {
                self.telemetry.rollups.errors.fetch_add(1, Relaxed);
                tracing::warn!(resolution = res.name(), start = c.start, writer = c.writer, error = %e, "a rollup failed; it is tried again at the next pass");
                pass.left_due(c, res, &mut unsettled);
                failures += 1;
                if failures >= MAX_FAILURES_IN_A_ROW {
                    return Err(e);
                }
                continue;
            }
            failures = 0;
            crate::failpoint::hit("after_rollup");
            pass.computed += 1;
            self.telemetry.rollups.runs[res as usize].fetch_add(1, Relaxed);
        }
        let newest = changed.iter().map(|c| c.newest).max().unwrap_or(0);
        let look_back = flush_id(tick_of(LOOK_BACK), 0);
        let next = newest
            .saturating_sub(look_back)
            .min(unsettled.saturating_sub(1));
        *since = (*since).max(next);
        Ok(pass)
    }

    /// The four statements of one period, then its run record.
    async fn compute_one(
        &self,
        client: &Client,
        database: &str,
        res: Resolution,
        c: Changed,
        started: u64,
        me: u32,
    ) -> Result<(), clickhouse::error::Error> {
        for table in 0..sql::ROLLED.len() {
            let statement = sql::rollup(database, table, res, c.start, c.writer, started);
            client.query(&statement).execute().await?;
            if table == 0 {
                crate::failpoint::hit("after_rollup_table");
            }
        }
        let record = sql::record_run(database, me, c.writer, res, c.start, started);
        client.query(&record).execute().await
    }

    /// The newest finished run of each (writer, period) among `changed`.
    async fn finished(
        &self,
        client: &Client,
        database: &str,
        res: Resolution,
        changed: &[Changed],
    ) -> Result<HashMap<(u32, u32), u64>, clickhouse::error::Error> {
        let mut writers: Vec<u32> = changed.iter().map(|c| c.writer).collect();
        writers.sort_unstable();
        writers.dedup();
        let from = changed.iter().map(|c| c.start).min().unwrap_or(0);
        let to = changed.iter().map(|c| c.start).max().unwrap_or(0);
        let me = tag(self.ledger.instance());
        let runs = client
            .query(&sql::finished(database, me, res, &writers, from, to))
            .fetch_all::<Changed>()
            .await?;
        Ok(runs
            .into_iter()
            .map(|r| ((r.writer, r.start), r.newest))
            .collect())
    }
}

/// How long after a period ends its rollup waits.
fn settle(res: Resolution) -> u32 {
    match res {
        Resolution::Minute => SETTLE,
        // After the last minute's rollup.
        Resolution::Hour => SETTLE + 60 + SETTLE,
    }
}

fn unix_now() -> u32 {
    u32::try_from(wall_clock().as_secs()).unwrap_or(u32::MAX)
}
