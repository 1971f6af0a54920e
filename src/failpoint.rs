//! Named crash points for the crash tests: `TALLYD_FAILPOINTS=after_insert`
//! makes the process abort (as a crash would) when it reaches that point.
//! Read once; costs one branch per point when unset.
//!
//! Each names a durable write of the order in [`crate::ledger`], and fires
//! right after it:
//!
//! - `after_identity`: the `instance` file holds the new flush id (step 4),
//!   the spool file is not written.
//! - `after_merge_write`: over the spool budget, the merged spool file is
//!   written (step 5), the file it absorbed not yet removed.
//! - `after_intent`: a flush is recorded in the spool and its gauge values
//!   in `gauges.log` (step 4), its WAL records not yet released.
//! - `after_dedup`: the dedup state is saved (step 5), the WAL checkpoint
//!   not yet written.
//! - `after_release`: its WAL records are released (step 5), the flush not
//!   yet queued for the sink.
//! - `after_join_write`: a drain's joined spool file is written (step 5),
//!   the files it absorbed not yet removed.
//! - `after_marker`: a flush's sent marker is written (step 6), nothing
//!   inserted.
//! - `after_table`: the flush's `counters` are in ClickHouse (step 6), its
//!   other tables not.
//! - `after_insert`: a flush is in ClickHouse (step 6), its row in the
//!   flushes table not yet written.
//! - `after_confirm`: its row in the flushes table is written (step 7),
//!   its spool file not yet removed.
//! - `after_complete`: its spool file is removed (step 7).
//!
//! Two of replicated ingest's (see [`crate::replication::consume`]):
//! - `after_cut`: a shard's cut is written, its flush not inserted;
//! - `after_cut_insert`: the cut's flush is in ClickHouse (and the flushes
//!   table), the stream not yet purged.
//!
//! And two of the rollup job's (see [`crate::rollup`]):
//! - `after_rollup_table`: a period's counters rollup is computed, its
//!   other tables' not, and no run recorded;
//! - `after_rollup`: a period's rollup is computed and recorded.

use std::sync::OnceLock;

/// Every failpoint, in the order a flush reaches them.
pub const ALL: [&str; 15] = [
    "after_identity",
    "after_merge_write",
    "after_intent",
    "after_dedup",
    "after_release",
    "after_join_write",
    "after_marker",
    "after_table",
    "after_insert",
    "after_confirm",
    "after_complete",
    "after_cut",
    "after_cut_insert",
    "after_rollup_table",
    "after_rollup",
];

/// Aborts the process if `name` is listed in `TALLYD_FAILPOINTS`.
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    let points = POINTS.get_or_init(|| {
        std::env::var("TALLYD_FAILPOINTS")
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    });
    if points.iter().any(|p| p == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}
