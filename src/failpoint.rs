//! Named crash points for the crash tests: `TALLYD_FAILPOINTS=after_insert`
//! makes the process abort (as a crash would) when it reaches that point.
//! Read once; costs one branch per point when unset.
//!
//! Each names a step of the durable order in [`crate::ledger`]:
//!
//! - `after_intent`: a flush is recorded in the spool (step 4), its WAL
//!   records not yet released.
//! - `after_release`: its WAL records are released (step 5), the flush not
//!   yet queued for the sink.
//! - `after_insert`: a flush is in ClickHouse (step 6), its spool file not
//!   yet removed.

use std::sync::OnceLock;

/// Every failpoint, in the order a flush reaches them.
pub const ALL: [&str; 3] = ["after_intent", "after_release", "after_insert"];

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
