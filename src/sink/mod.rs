//! The ClickHouse sink: takes recorded flushes off a bounded queue and
//! writes them, one `INSERT … FORMAT RowBinary` per table per flush, with
//! the flush's fixed bytes (steps 6 and 7 of the durable order in
//! [`crate::ledger`]). A recorded flush is queued without its bodies: each
//! is read back from its spool file and sent a chunk (1 MiB) at a time
//! ([`Queued::spooled`]), so a flush on its way holds no memory for its
//! rows.
//!
//! Errors are classified: an outage (network, timeout, a server error that is
//! not about the data) is retried with capped exponential backoff and jitter,
//! for as long as it takes. An answer that says the rows do not fit the
//! table (`Code: 16`, `53`, `117`, ...: tallyd's rows come from fixed
//! structs, so this means the table drifted from tallyd's schema) *blocks*
//! the table: its bodies are kept (in the spool), retried with backoff,
//! `tallyd_table_blocked` is 1 and `/health` says so, until the table is
//! fixed. A blocked table holds only itself: the other tables of its flush
//! and of later flushes are written meanwhile. Nothing is confirmed
//! that ClickHouse did not store. Every send of a flush carries the same
//! bytes and deduplication token, which the ReplacingMergeTree tables (and,
//! on 22.2+, the token) collapse.
//!
//! Before each flush's inserts (one query for every table), the sink
//! compares the tables' columns with what it writes ([`schema::plan`]): a
//! missing column, or a timer count of the previous release, is migrated
//! with `ALTER TABLE` when `create_schema` is on; a column it cannot fix
//! blocks the table as above, with the statement to run. RowBinary carries
//! no types, so this check is what keeps a `Float64` from landing in a
//! `UInt64` or `String` column as garbage after an operator's `ALTER`.
//!
//! The queue in front of the sink is bounded (`flush_queue` flushes). Its
//! overflow policy is "park": a recorded flush that finds it full stays on
//! disk in the spool (`tallyd_flushes_parked_total`), and the sink takes
//! parked flushes back, oldest first, when the queue is empty.
//!
//! Files: [`schema`] (the DDL and the column plans), [`prepare`] (each
//! table made ready on the server), [`endpoint`] (the servers and their
//! clients, for failover), [`blocked`] (a drifted table held alone),
//! [`queued`] (a flush on its way and where its bodies are read from),
//! [`retry`] (what an error means), [`tls`] (HTTPS).

mod blocked;
mod endpoint;
pub mod flushes;
mod prepare;
mod queued;
mod retry;
pub mod schema;
pub mod tls;

use endpoint::Current;
use queued::{Body, Shared};
pub use queued::{Queued, next_parked};

use blocked::Blocked;
use retry::MISSING_SCHEMA_CODES;
pub use retry::{Failure, backoff, classify, describe, error_code, jitter};

use crate::lock;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clickhouse::Client;
use tokio::sync::{mpsc, watch};

use crate::ledger::Ledger;
use crate::outbox::flush::Flush;
use crate::telemetry::{TABLES, Telemetry};

/// How the sink reaches ClickHouse.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub create_schema: bool,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Trust and client certificate for an `https://` URL.
    pub tls: tls::TlsFiles,
    /// More endpoints of the same shard (replicas), tried in turn after
    /// `url` when one fails.
    pub replicas: Vec<String>,
    /// The cluster (in the servers' `remote_servers`) the schema is made
    /// on: replicated tables, `ON CLUSTER` DDL, `Distributed` `*_all`.
    pub cluster: Option<String>,
    /// `non_replicated_deduplication_window` of the tables tallyd makes on
    /// 22.2+: the inserts per table whose tokens are remembered.
    pub dedup_window: u64,
}

/// A client per endpoint of `config` (`url`, then each replica), in no
/// database, for statements that name their tables (the rollup job,
/// retention).
pub fn admin_clients(config: &SinkConfig) -> Vec<Client> {
    endpoint::Current::new(config.clone())
        .endpoints
        .into_iter()
        .map(|e| e.admin)
        .collect()
}

pub struct Sink {
    /// The clients and the settings they were built from; rebuilt when a
    /// config reload brings new ones.
    current: std::sync::Mutex<Current>,
    reload: std::sync::Mutex<Option<watch::Receiver<SinkConfig>>>,
    telemetry: Arc<Telemetry>,
    /// Told when a flush is in ClickHouse, so its spool file can go.
    ledger: Option<Arc<Ledger>>,
    /// The server takes `insert_deduplication_token` (22.2 and later).
    dedup_token: bool,
    /// The server knows `async_insert` (pinned to 0 on every insert).
    async_insert: bool,
    /// New tables get `LowCardinality` strings (20.1 and later).
    low_cardinality: bool,
    /// Per table: its deduplication window was checked (modern servers).
    window_checked: [AtomicBool; TABLES.len()],
    /// The endpoint in use: `url`, then `replicas` (see [`Sink::fail_over`]).
    active: std::sync::atomic::AtomicUsize,
    /// Per table: its columns were found to be what tallyd writes.
    checked: [AtomicBool; TABLES.len()],
}

/// Why an attempt to write a table failed.
#[derive(Debug)]
enum Failed {
    Insert(clickhouse::error::Error),
    /// The body could not be read back from the spool.
    Spool(std::io::Error),
    /// The table's columns are not what tallyd writes (and it will not
    /// change them): why, and what to run.
    Refused(String),
}

impl Failed {
    fn failure(&self) -> Failure {
        match self {
            Failed::Insert(e) => classify(e),
            Failed::Spool(_) => Failure::Retry,
            Failed::Refused(_) => Failure::Schema,
        }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Insert(e) => f.write_str(&describe(e)),
            Failed::Spool(e) => write!(f, "reading the body back from the spool: {e}"),
            Failed::Refused(why) => f.write_str(why),
        }
    }
}

impl Sink {
    pub fn new(config: SinkConfig, telemetry: Arc<Telemetry>) -> Sink {
        Sink {
            current: std::sync::Mutex::new(Current::new(config)),
            reload: std::sync::Mutex::new(None),
            telemetry,
            ledger: None,
            dedup_token: false,
            async_insert: false,
            low_cardinality: false,
            window_checked: Default::default(),
            active: Default::default(),
            checked: Default::default(),
        }
    }

    /// Takes new settings (URL, credentials, database, timeouts) from
    /// `reload` before each insert and each retry.
    pub fn with_reload(self, reload: watch::Receiver<SinkConfig>) -> Sink {
        *lock(&self.reload) = Some(reload);
        self
    }

    /// Counts a failed attempt to reach ClickHouse (connecting or
    /// inserting), with its error for the status page, and moves to the
    /// next replica, if there is one.
    pub fn count_retry(&self, error: &str) {
        self.telemetry.clickhouse_retries.fetch_add(1, Relaxed);
        self.telemetry.clickhouse_answered(Some(error));
        self.fail_over();
    }

    /// The endpoint in use.
    fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// After a failure that is not about the data (refused, timed out, a
    /// server error): the next attempt goes to the next of `url` and
    /// `replicas`, round robin. A flush is only ever sent to another
    /// replica as a retry of the same bytes (and token), which replicated
    /// tables drop as a duplicate block if the first attempt landed.
    fn fail_over(&self) {
        let current = self.current();
        let n = current.endpoints.len();
        if n > 1 {
            let next = (self.active.fetch_add(1, Relaxed) + 1) % n;
            tracing::warn!(url = %current.at(next).url, "failing over to the next ClickHouse replica");
        }
    }

    /// Reports each written flush to `ledger` (step 7).
    pub fn with_ledger(mut self, ledger: Arc<Ledger>) -> Sink {
        self.ledger = Some(ledger);
        self
    }

    /// The clients and settings in force, after taking a pending reload.
    fn current(&self) -> Current {
        if let Some(rx) = lock(&self.reload).as_mut()
            && rx.has_changed().unwrap_or(false)
        {
            let config = rx.borrow_and_update().clone();
            tracing::info!(url = %config.url, database = %config.database, "ClickHouse settings reloaded");
            *lock(&self.current) = Current::new(config);
        }
        lock(&self.current).clone()
    }

    /// Asks the server's version, creates the schema if configured, and
    /// turns on what the version allows. Returns the version.
    pub async fn connect(&mut self) -> Result<String, clickhouse::error::Error> {
        let version = self.server_version().await?;
        self.dedup_token = schema::has_dedup_token(&version);
        self.async_insert = schema::has_async_insert(&version);
        self.low_cardinality = schema::has_low_cardinality(&version);
        if self.current().config.create_schema {
            self.ensure_schema().await?;
        }
        self.telemetry.clickhouse_answered(None);
        Ok(version)
    }

    /// Writes flushes until the queue closes and no flush is parked: the
    /// queue's first (they are older), then those parked in the spool,
    /// read back one at a time. A table blocked by schema drift holds only
    /// itself: the other tables of its flush and of later flushes go on,
    /// and its bodies wait in order ([`Blocked`]) for the table to take
    /// rows again. A flush is complete when every table has its rows.
    pub async fn run(self, mut queue: mpsc::Receiver<Queued>) {
        let mut open = true;
        let mut blocked = Blocked::default();
        loop {
            self.retry_blocked(&mut blocked).await;
            let q = match queue.try_recv() {
                Ok(q) => q,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    match self.next_parked().await {
                        Some(q) => q,
                        None => return,
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => match self.next_parked().await {
                    Some(q) => q,
                    None if !open => return,
                    None => {
                        let parked = async {
                            match &self.ledger {
                                Some(l) => l.parked().await,
                                None => std::future::pending().await,
                            }
                        };
                        let retry = async {
                            match blocked.retry_at {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            q = queue.recv() => match q {
                                Some(q) => q,
                                None => { open = false; continue; }
                            },
                            _ = parked => continue,
                            _ = retry => continue,
                        }
                    }
                },
            };
            self.mark_sending(&q).await;
            for checked in &self.checked {
                checked.store(false, Relaxed);
            }
            let mut left = 0u8;
            for table in 0..TABLES.len() {
                if q.body_len(table) == 0 {
                    continue;
                }
                // Without a ledger nothing can be read back: a blocked
                // table is retried in place, holding every table.
                let hold = self.ledger.is_none();
                let behind_blocked = !blocked.waiting[table].is_empty();
                if behind_blocked || !self.write_table(table, &q, hold).await {
                    blocked.waiting[table].push_back(q.flush.flush_id);
                    left |= 1 << table;
                } else if table == 0 {
                    crate::failpoint::hit("after_table");
                }
            }
            crate::failpoint::hit("after_insert");
            if left == 0 {
                self.complete(Some(&q.flush), q.flush.flush_id).await;
            } else {
                self.keep_pending(&q, left).await;
                blocked.left.insert(q.flush.flush_id, (left, q.resent));
                blocked.retry_at.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.current().config.retry_initial
                });
            }
        }
    }

    /// Step 7 for `flush_id`: its row in the flushes table (when what
    /// names it could be read, `flush`), then its spool file goes.
    async fn complete(&self, flush: Option<&Flush>, flush_id: u64) {
        if let Some(flush) = flush {
            self.confirm(flush).await;
            crate::failpoint::hit("after_confirm");
        }
        if let Some(ledger) = &self.ledger {
            let l = Arc::clone(ledger);
            match tokio::task::spawn_blocking(move || l.complete(flush_id)).await {
                // The spool file stays: re-sent (identical) at the next start.
                Ok(Err(e)) => {
                    tracing::error!(error = %e, flush_id, "could not remove a written flush from the spool")
                }
                _ => crate::failpoint::hit("after_complete"),
            }
            crate::ledger::publish_backlog(ledger, &self.telemetry);
        }
    }

    /// The oldest parked flushes, read back ([`queued::next_parked`]).
    async fn next_parked(&self) -> Option<Queued> {
        queued::next_parked(self.ledger.as_ref()?).await
    }

    /// Writes the flush's sent marker (step 6), retrying until it is on
    /// disk: a flush is never sent without it, or a restart could merge a
    /// copy that landed.
    async fn mark_sending(&self, q: &Queued) {
        let Some(ledger) = &self.ledger else { return };
        let mut attempt = 0;
        loop {
            let (l, id) = (Arc::clone(ledger), q.flush.flush_id);
            let marked = tokio::task::spawn_blocking(move || l.sending(id))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            match marked {
                Ok(()) => return,
                Err(e) => {
                    let config = self.current().config;
                    let delay = backoff(attempt, config.retry_initial, config.retry_max, jitter());
                    self.telemetry.spool_errors.fetch_add(1, Relaxed);
                    tracing::error!(error = %e, flush_id = id, retry_in = ?delay, "cannot write a flush's sent marker; it is not sent until it can");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Writes one flush, every table, retrying until each table is written
    /// (a blocked table too: [`Sink::run`] holds it apart instead).
    /// The tables' columns are checked again first.
    pub async fn write(&self, q: &Queued) {
        for checked in &self.checked {
            checked.store(false, Relaxed);
        }
        for table in 0..TABLES.len() {
            self.write_table(table, q, true).await;
        }
    }

    /// Writes table `table` of `q`, retrying an outage for as long as it
    /// takes. A table whose rows ClickHouse refuses as not fitting it is
    /// blocked: retried here too if `hold`, else false is returned at once.
    async fn write_table(&self, table: usize, q: &Queued, hold: bool) -> bool {
        let flush = &q.flush;
        let len = q.body_len(table);
        if len == 0 {
            return true;
        }
        let rows = u64::from(flush.tables.rows[table]);
        let name = TABLES[table];
        let flush_id = flush.flush_id;
        let token = self.dedup_token.then(|| flush.token(name));
        let body = match &q.spooled {
            Some(ranges) => Body::Spooled(ranges[table]),
            // The body as the flush holds it: shared, not copied.
            None => Body::Memory(bytes::Bytes::from_owner(Shared(Arc::clone(flush), table))),
        };
        let mut attempt = 0;
        loop {
            let result = match self.prepare(table).await {
                Ok(()) => {
                    let started = std::time::Instant::now();
                    let sent = self.insert(table, flush, &body, token.as_deref()).await;
                    if sent.is_ok() {
                        self.telemetry.latency.insert.record(started.elapsed());
                    }
                    sent
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    let t = &self.telemetry;
                    t.clickhouse_answered(None);
                    let counter = if q.resent {
                        &t.rows_resent[table]
                    } else {
                        &t.rows_written[table]
                    };
                    counter.fetch_add(rows, Relaxed);
                    t.bytes_written[table].fetch_add(len, Relaxed);
                    t.inserts[table].fetch_add(1, Relaxed);
                    if t.tables_blocked[table].swap(0, Relaxed) == 1 {
                        tracing::info!(
                            table = name,
                            flush_id,
                            "ClickHouse takes the table's rows again; unblocked"
                        );
                    } else if attempt > 0 {
                        tracing::info!(
                            table = name,
                            flush_id,
                            attempts = attempt + 1,
                            "insert succeeded after retries"
                        );
                    }
                    return true;
                }
                Err(Failed::Spool(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::NotFound
                    ) =>
                {
                    // Quarantined by the ledger (see /health): nothing is
                    // left to send. A flush's every unsent table counts,
                    // each as it comes to be sent.
                    self.telemetry.rows_lost_damaged.fetch_add(rows, Relaxed);
                    tracing::error!(error = %e, flush_id, table = name, rows, "a flush's spool file is damaged or gone; its rows are lost");
                    return true;
                }
                Err(err) => {
                    let config = self.current().config;
                    let delay = backoff(attempt, config.retry_initial, config.retry_max, jitter());
                    match err.failure() {
                        Failure::Schema => {
                            // Looked at again before the next attempt (an
                            // operator may have fixed it).
                            self.checked[table].store(false, Relaxed);
                            self.telemetry
                                .clickhouse_schema_errors
                                .fetch_add(1, Relaxed);
                            if self.telemetry.tables_blocked[table].swap(1, Relaxed) == 0 {
                                tracing::error!(table = name, flush_id, rows, error = %err, database = %config.database, "ClickHouse refuses the rows as not matching the table: its schema differs from tallyd's (see `tallyd schema`). The table is blocked: its rows are kept and retried until the table is fixed; the other tables go on");
                            }
                            if !hold {
                                return false;
                            }
                        }
                        Failure::Retry => {
                            self.count_retry(&err.to_string());
                            if matches!(&err, Failed::Insert(e) if tls::tls_reason(e).is_some()) {
                                tracing::error!(table = name, flush_id, url = %config.url, retry_in = ?delay, error = %err, "ClickHouse's TLS handshake fails; the rows wait in the spool");
                            } else {
                                tracing::warn!(table = name, flush_id, attempt = attempt + 1, retry_in = ?delay, error = %err, "insert failed; will retry");
                            }
                        }
                    }
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    if let Failed::Insert(clickhouse::error::Error::BadResponse(msg)) = &err
                        && error_code(msg).is_some_and(|c| MISSING_SCHEMA_CODES.contains(&c))
                        && config.create_schema
                        && let Err(e) = self.ensure_schema().await
                    {
                        tracing::warn!(error = %e, "re-creating the schema failed");
                    }
                }
            }
        }
    }

    /// One INSERT of `body`, table `table`'s of `flush`. A spooled body is
    /// opened (and its file checked) before the request starts, then sent
    /// a chunk at a time, each read on a blocking thread.
    async fn insert(
        &self,
        table: usize,
        flush: &Arc<Flush>,
        body: &Body,
        token: Option<&str>,
    ) -> Result<(), Failed> {
        let current = self.current();
        let sql = format!(
            "INSERT INTO {}.{} {} FORMAT RowBinary",
            schema::quote_ident(&current.config.database),
            TABLES[table],
            schema::insert_columns(table)
        );
        let mut insert = current
            .at(self.active())
            .client
            .insert_formatted_with(sql)
            .with_timeouts(Some(current.config.timeout), Some(current.config.timeout));
        if let Some(token) = token {
            insert = insert.with_setting("insert_deduplication_token", token);
        }
        if self.async_insert {
            insert = insert.with_setting("async_insert", "0");
        }
        match body {
            Body::Memory(bytes) => insert.send(bytes.clone()).await.map_err(Failed::Insert)?,
            Body::Spooled(range) => {
                let ledger = self.ledger.clone().ok_or_else(|| {
                    Failed::Spool(std::io::Error::other("a spooled flush without a ledger"))
                })?;
                // Opened (the file checked) before the first send starts
                // the request.
                let (l, f, range) = (Arc::clone(&ledger), Arc::clone(flush), *range);
                let mut reader = blocking(move || l.open_body(&f, range)).await?;
                loop {
                    let (l, id) = (Arc::clone(&ledger), flush.flush_id);
                    let (r, chunk) = blocking(move || {
                        let chunk = l.next_chunk(id, &mut reader);
                        Ok((reader, chunk))
                    })
                    .await?;
                    reader = r;
                    match chunk.map_err(Failed::Spool)? {
                        Some(chunk) => insert.send(chunk.into()).await.map_err(Failed::Insert)?,
                        None => break,
                    }
                }
            }
        }
        insert.end().await.map_err(Failed::Insert)
    }
}

/// Runs blocking spool work off the tokio workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Failed> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(Failed::Spool)
}

#[cfg(test)]
mod tests;
