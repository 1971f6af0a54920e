//! Retention that really applies, on every ClickHouse: tallyd drops each
//! partition of its tables once every row in it is past the table's
//! retention (`max(max_time)` of the partition's active parts in
//! `system.parts`), with `ALTER TABLE … DROP PARTITION ID`. This needs no
//! TTL (18.16 has none) and no merge to happen; it is logged and counted
//! (`tallyd_retention_partitions_dropped_total`).
//!
//! Partitions are sized to the retentions: raw tables, the flushes table
//! and the minute rollups by day, the hour rollups and `tallyd_rollups`
//! by month. So a row is kept at least its retention, and at most a day
//! (a month for hours) more.
//!
//! Raw tables of an earlier layout, moved aside to `<table>_legacy`
//! (see [`crate::sink::schema::current_layout`]), were never rolled up:
//! their rows are the only copy of their periods, so their monthly
//! partitions go when every row in them is past `retention.hour`, and the
//! table once it holds none.
//!
//! Every tallyd writing a database runs this; dropping a partition that
//! another already dropped is a no-op.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clickhouse::Client;

use super::Retention;
use super::sql::{RUNS, Resolution, table};
use crate::sink::schema::{LEGACY_SUFFIX, quote_ident};
use crate::telemetry::{TABLES, Telemetry};

/// How often retention runs.
pub const EVERY: Duration = Duration::from_secs(600);

/// How long the rows of `table` (a name in the database) are kept;
/// `None` for a table retention leaves alone.
pub fn kept(table_name: &str, r: &Retention) -> Option<Duration> {
    // A table of an earlier layout was never rolled up: its rows are the
    // only copy of their periods, kept as long as the hours would be.
    let legacy = TABLES.iter().any(|t| {
        table_name
            .strip_prefix(t)
            .is_some_and(|rest| rest.starts_with(LEGACY_SUFFIX))
    });
    if legacy {
        return Some(r.hour);
    }
    if TABLES.contains(&table_name) || table_name == crate::sink::flushes::TABLE {
        return Some(r.raw);
    }
    for t in 0..super::sql::ROLLED.len() {
        if table_name == table(t, Resolution::Minute) {
            return Some(r.minute);
        }
        if table_name == table(t, Resolution::Hour) {
            return Some(r.hour);
        }
    }
    (table_name == RUNS).then_some(r.hour)
}

/// A partition's newest row.
#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Partition {
    table: String,
    partition_id: String,
    newest: u32,
}

/// Drops every partition of `database` past its table's retention at
/// `now` (Unix seconds), then legacy tables left empty.
pub async fn pass(
    client: &Client,
    database: &str,
    retention: &Retention,
    telemetry: &Telemetry,
    now: u32,
) -> Result<(), clickhouse::error::Error> {
    let parts = client
        .query("SELECT table, partition_id, toUInt32(max(max_time)) AS newest FROM system.parts WHERE database = ? AND active GROUP BY table, partition_id")
        .bind(database)
        .fetch_all::<Partition>()
        .await?;
    let db = quote_ident(database);
    for p in expired(&parts, retention, now) {
        client
            .query(&format!(
                "ALTER TABLE {db}.{} DROP PARTITION ID '{}'",
                quote_ident(&p.table),
                p.partition_id.replace('\\', "\\\\").replace('\'', "\\'")
            ))
            .execute()
            .await?;
        telemetry.rollups.partitions_dropped.fetch_add(1, Relaxed);
        tracing::info!(table = %p.table, partition = %p.partition_id, newest = p.newest, "dropped a partition past its retention");
    }
    // Legacy tables with no partition left.
    let legacy = client
        .query("SELECT name FROM system.tables WHERE database = ? AND name LIKE ? AND name NOT IN (SELECT table FROM system.parts WHERE database = ? AND active)")
        .bind(database)
        .bind(format!("%{LEGACY_SUFFIX}%"))
        .bind(database)
        .fetch_all::<String>()
        .await?;
    for name in legacy {
        if kept(&name, retention).is_none() {
            continue;
        }
        client
            .query(&format!("DROP TABLE IF EXISTS {db}.{}", quote_ident(&name)))
            .execute()
            .await?;
        tracing::info!(table = %name, "dropped a table of an earlier layout: every row in it was past retention.hour");
    }
    Ok(())
}

/// The partitions among `parts` whose newest row is past its table's
/// retention at `now`.
fn expired<'a>(parts: &'a [Partition], r: &Retention, now: u32) -> Vec<&'a Partition> {
    parts
        .iter()
        .filter(|p| {
            kept(&p.table, r).is_some_and(|keep| {
                u64::from(p.newest).saturating_add(keep.as_secs()) < u64::from(now)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_table_is_kept_for_its_resolution() {
        let r = Retention {
            raw: Duration::from_secs(1),
            minute: Duration::from_secs(2),
            hour: Duration::from_secs(3),
        };
        for (t, secs) in [
            ("counters", Some(1)),
            ("service_checks", Some(1)),
            ("flushes", Some(1)),
            ("counters_legacy", Some(3)),
            ("gauges_legacy_2", Some(3)),
            ("timers_1m", Some(2)),
            ("sets_1h", Some(3)),
            ("tallyd_rollups", Some(3)),
            ("tallyd_schema", None),
            ("counters_all", None),
            ("someone_elses", None),
        ] {
            assert_eq!(kept(t, &r).map(|d| d.as_secs()), secs, "{t}");
        }
    }

    #[test]
    fn a_partition_goes_only_when_its_newest_row_is_past_retention() {
        let r = Retention {
            raw: Duration::from_secs(100),
            ..Retention::default()
        };
        let parts = [
            Partition {
                table: "counters".into(),
                partition_id: "20261201".into(),
                newest: 899,
            },
            Partition {
                table: "counters".into(),
                partition_id: "20261202".into(),
                newest: 900,
            },
            Partition {
                table: "tallyd_schema".into(),
                partition_id: "all".into(),
                newest: 0,
            },
        ];
        let gone: Vec<&str> = expired(&parts, &r, 1000)
            .iter()
            .map(|p| p.partition_id.as_str())
            .collect();
        assert_eq!(gone, ["20261201"]);
    }
}
