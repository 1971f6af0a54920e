//! The completeness table, `<database>.flushes`: one row per flush once
//! every table of it is in ClickHouse, written by the sink just before the
//! flush's spool file goes (step 7 of [`crate::ledger`]'s durable order).
//! A dashboard asks it "is this minute complete for every host?"; the
//! rollup job ([`crate::rollup`]) asks it which minutes changed since
//! their rollup was computed.
//!
//! # The row
//!
//! - `ts`: the flush's interval start (its oldest, for a joined flush);
//! - `host`, `instance`, `flush_id`: what names the flush (its
//!   deduplication token);
//! - `writer`: the instance tag of its rows' flush ids (the low 20 bits,
//!   [`crate::outbox::flush::tag`]): whose rows a rollup reads;
//! - `confirmer`: the tag of the tallyd that confirmed it (the one whose
//!   rollup job recomputes its minutes);
//! - `intervals`: its interval start and every distinct `ts` of its rows
//!   (late `|T` samples and an outage's backlog have their own);
//! - `counters` … `service_checks`: its rows per table; `samples`: the raw
//!   increments they compact;
//! - `settled`: every closed interval of this tallyd that starts before
//!   it is in ClickHouse (the oldest interval start still in its spool
//!   once this flush goes, or the time of confirmation);
//! - `confirmed`: a number from the confirming tallyd's flush id sequence,
//!   which grows with its clock and across restarts; `confirmed_at`: the
//!   wall-clock time, seconds.
//!
//! A flush confirmed twice (a crash before its spool file went) has two
//! rows until a merge keeps the later (`ReplacingMergeTree(confirmed)`).

use std::sync::atomic::Ordering::Relaxed;

use super::{Sink, backoff, classify, jitter, schema};
use crate::outbox::flush::{Flush, tag};
use crate::outbox::rowbinary::{string, varint};

/// The table's name in the database.
pub const TABLE: &str = "flushes";

/// Its columns, in insert order: (name, type).
pub const COLUMNS: &[(&str, &str)] = &[
    ("ts", "DateTime"),
    ("host", "String"),
    ("instance", "UInt64"),
    ("flush_id", "UInt64"),
    ("writer", "UInt32"),
    ("confirmer", "UInt32"),
    ("intervals", "Array(DateTime)"),
    ("counters", "UInt64"),
    ("gauges", "UInt64"),
    ("timers", "UInt64"),
    ("sets", "UInt64"),
    ("events", "UInt64"),
    ("service_checks", "UInt64"),
    ("samples", "UInt64"),
    ("settled", "DateTime"),
    ("confirmed", "UInt64"),
    ("confirmed_at", "DateTime"),
];

const ENGINE: &str = "ReplacingMergeTree(confirmed)\nPARTITION BY toYYYYMMDD(confirmed_at)\nORDER BY (confirmer, writer, flush_id)";

/// The statements that create the table (and with a cluster its
/// replicated form and `flushes_all`), after the database exists.
pub fn ddl(database: &str, cluster: Option<&str>) -> Vec<String> {
    let db = schema::quote_ident(database);
    let on = cluster.map_or(String::new(), |c| {
        format!(" ON CLUSTER {}", schema::quote_ident(c))
    });
    let engine = match cluster {
        None => ENGINE.to_string(),
        Some(_) => schema::replicated(ENGINE, database, TABLE),
    };
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|(n, t)| format!("    {n} {t}"))
        .collect();
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {db}.{TABLE}{on} (\n{}\n) ENGINE = {engine}",
        columns.join(",\n")
    )];
    if let Some(c) = cluster {
        out.push(schema::distributed_copy(database, TABLE, c));
    }
    out
}

/// What a confirmation adds to a flush's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// The confirming tallyd's instance tag.
    pub confirmer: u32,
    pub settled: u32,
    pub confirmed: u64,
    pub confirmed_at: u32,
}

/// The RowBinary row of `flush`, in [`COLUMNS`] order.
pub fn row(flush: &Flush, c: Confirmation) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + flush.host.len() + 4 * flush.intervals.len());
    out.extend_from_slice(&flush.ts.to_le_bytes());
    string(&mut out, &flush.host);
    out.extend_from_slice(&flush.instance.to_le_bytes());
    out.extend_from_slice(&flush.flush_id.to_le_bytes());
    out.extend_from_slice(&tag(flush.flush_id).to_le_bytes());
    out.extend_from_slice(&c.confirmer.to_le_bytes());
    varint(&mut out, flush.intervals.len() as u64);
    for t in &flush.intervals {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for rows in flush.tables.rows {
        out.extend_from_slice(&u64::from(rows).to_le_bytes());
    }
    out.extend_from_slice(&flush.samples.to_le_bytes());
    out.extend_from_slice(&c.settled.to_le_bytes());
    out.extend_from_slice(&c.confirmed.to_le_bytes());
    out.extend_from_slice(&c.confirmed_at.to_le_bytes());
    out
}

impl Sink {
    /// Writes `flush`'s row, retrying an outage as long as it takes: the
    /// flush is not complete, and its spool file stays, until then. A
    /// table that refuses the row (only an operator's change can cause it)
    /// must not hold every other table's rows: the row is given up, logged
    /// and counted, and `/health` stays degraded until a row lands again;
    /// the minutes of such flushes are rolled up again only when another
    /// flush of theirs lands.
    /// Also for a flush written by [`Sink::write`] outside the queue
    /// (replicated ingest's, whose log is the stream, not a spool).
    pub async fn confirm(&self, flush: &Flush) {
        let Some(ledger) = &self.ledger else { return };
        let mut attempt = 0;
        loop {
            let now = crate::clock::wall_clock();
            let now_secs = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
            let confirmation = Confirmation {
                confirmer: tag(ledger.instance()),
                settled: ledger.settled_after(flush.flush_id).unwrap_or(now_secs),
                // Drawn at each attempt: above the time every row of the
                // flush became visible, which is what the rollup job needs.
                confirmed: ledger.next_flush_id(now),
                confirmed_at: now_secs,
            };
            let body = row(flush, confirmation);
            match self.insert_confirmation(body).await {
                Ok(()) => {
                    if self
                        .telemetry
                        .rollups
                        .flushes_table_blocked
                        .swap(0, Relaxed)
                        == 1
                    {
                        tracing::info!("ClickHouse takes rows of the flushes table again");
                    }
                    return;
                }
                Err(e) => {
                    let config = self.current().config;
                    let delay = backoff(attempt, config.retry_initial, config.retry_max, jitter());
                    match classify(&e) {
                        super::Failure::Schema => {
                            self.telemetry
                                .clickhouse_schema_errors
                                .fetch_add(1, Relaxed);
                            self.telemetry
                                .rollups
                                .flushes_table_blocked
                                .store(1, Relaxed);
                            tracing::error!(error = %e, database = %config.database, flush_id = flush.flush_id, "ClickHouse refuses the row of the flushes table: its schema differs from tallyd's (see `tallyd schema`). The row is given up; the rollups of its minutes wait for another flush of them");
                            return;
                        }
                        super::Failure::Retry => {
                            self.telemetry.clickhouse_retries.fetch_add(1, Relaxed);
                            self.fail_over();
                            tracing::warn!(flush_id = flush.flush_id, attempt = attempt + 1, retry_in = ?delay, error = %e, "could not record a written flush in the flushes table; will retry");
                        }
                    }
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn insert_confirmation(&self, body: Vec<u8>) -> Result<(), clickhouse::error::Error> {
        let current = self.current();
        let names: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
        let sql = format!(
            "INSERT INTO {}.{TABLE} ({}) FORMAT RowBinary",
            schema::quote_ident(&current.config.database),
            names.join(", ")
        );
        let mut insert = current
            .at(self.active())
            .client
            .insert_formatted_with(sql)
            .with_timeouts(Some(current.config.timeout), Some(current.config.timeout));
        if self.async_insert {
            insert = insert.with_setting("async_insert", "0");
        }
        insert.send(body.into()).await?;
        insert.end().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_has_every_column_in_order() {
        let mut f = crate::outbox::flush::tests::sample();
        f.flush_id = (7 << 20) | 0xabc;
        let c = Confirmation {
            confirmer: 0xdef,
            settled: 1_700_000_001,
            confirmed: 99,
            confirmed_at: 1_700_000_002,
        };
        let row = row(&f, c);
        let mut at = 0;
        let mut take = |n: usize| {
            let s = &row[at..at + n];
            at += n;
            s.to_vec()
        };
        assert_eq!(take(4), 1_700_000_000u32.to_le_bytes());
        assert_eq!(take(6), b"\x05web-1");
        assert_eq!(take(8), 0xabcu64.to_le_bytes());
        assert_eq!(take(8), ((7u64 << 20) | 0xabc).to_le_bytes());
        assert_eq!(take(4), 0xabcu32.to_le_bytes(), "writer");
        assert_eq!(take(4), 0xdefu32.to_le_bytes(), "confirmer");
        assert_eq!(take(1), [2]);
        assert_eq!(take(4), 1_699_999_940u32.to_le_bytes());
        assert_eq!(take(4), 1_700_000_000u32.to_le_bytes());
        for rows in [1u64, 0, 1, 2, 1, 0] {
            assert_eq!(take(8), rows.to_le_bytes());
        }
        assert_eq!(take(8), 9u64.to_le_bytes());
        assert_eq!(take(4), 1_700_000_001u32.to_le_bytes());
        assert_eq!(take(8), 99u64.to_le_bytes());
        assert_eq!(take(4), 1_700_000_002u32.to_le_bytes());
        assert_eq!(at, row.len());
    }
}
