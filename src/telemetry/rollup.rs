//! The rollups' and retention's figures (see [`crate::rollup`]), and the
//! completeness table's state (see [`crate::sink::flushes`]).

use std::sync::atomic::AtomicU64;

use super::Metrics;

#[derive(Debug, Default)]
pub struct Rollups {
    /// 1 while ClickHouse refuses rows of the flushes table (schema
    /// drift): their rows are given up, and rollups may miss minutes.
    pub flushes_table_blocked: AtomicU64,
    /// Rollups computed (one writer's minute or hour of one table set),
    /// by resolution: minute, hour.
    pub runs: [AtomicU64; 2],
    /// Rollup statements that failed (retried at the next pass).
    pub errors: AtomicU64,
    /// Changed minutes not recomputed because their raw rows are past
    /// `retention.raw` (late data older than the raw retention).
    pub expired: AtomicU64,
    /// Minutes and hours known changed and not yet recomputed.
    pub pending: AtomicU64,
    /// Seconds since the oldest pending rollup became due (0: none).
    pub lag_seconds: AtomicU64,
    /// Time spent in rollup statements, nanoseconds.
    pub nanos: AtomicU64,
    /// Partitions dropped by retention, and retention passes that failed.
    pub partitions_dropped: AtomicU64,
    pub retention_errors: AtomicU64,
    /// Tables of an earlier layout moved aside (`<table>_legacy`).
    pub tables_moved_aside: AtomicU64,
}

/// `/health` is degraded while a due rollup has waited longer than this.
pub const MAX_LAG_SECS: u64 = 15 * 60;

impl Rollups {
    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        m.gauge(
            "tallyd_flushes_table_blocked",
            "1 while ClickHouse refuses rows of the flushes table (schema drift): rows given up, rollups may miss their minutes.",
            "",
            &self.flushes_table_blocked,
        );
        for (i, res) in ["minute", "hour"].iter().enumerate() {
            m.counter(
                "tallyd_rollups_total",
                "Rollups computed: one writer's minute or hour, every table.",
                &format!("resolution=\"{res}\""),
                &self.runs[i],
            );
        }
        let items: [(&str, &str, &dyn super::Sample); 6] = [
            (
                "tallyd_rollup_errors_total",
                "Rollup statements that failed; the rollup is tried again at the next pass.",
                &self.errors,
            ),
            (
                "tallyd_rollup_expired_total",
                "Changed minutes not rolled up again because their raw rows are past retention.raw.",
                &self.expired,
            ),
            (
                "tallyd_rollup_seconds_total",
                "Time spent in rollup statements (ClickHouse's work, waited for).",
                &super::Seconds(&self.nanos),
            ),
            (
                "tallyd_retention_partitions_dropped_total",
                "Partitions dropped because every row in them is past its retention.",
                &self.partitions_dropped,
            ),
            (
                "tallyd_retention_errors_total",
                "Retention passes that failed (tried again at the next pass).",
                &self.retention_errors,
            ),
            (
                "tallyd_tables_moved_aside_total",
                "Raw tables of an earlier layout renamed to <table>_legacy.",
                &self.tables_moved_aside,
            ),
        ];
        for (name, help, c) in items {
            m.counter(name, help, "", c);
        }
        m.gauge(
            "tallyd_rollups_pending",
            "Minutes and hours whose raw rows changed and whose rollup is not yet recomputed.",
            "",
            &self.pending,
        );
        m.gauge(
            "tallyd_rollup_lag_seconds",
            "Seconds since the oldest pending rollup became due (0: none).",
            "",
            &self.lag_seconds,
        );
    }
}
