//! Named crash points for the crash tests: `TALLYD_FAILPOINTS=after_insert`
//! makes the process abort (as a crash would) when it reaches that point.
//! Read once; costs one branch per point when unset.
//!
//! - `after_insert`: a batch is in ClickHouse, its WAL checkpoint not yet written.
//! - `after_intent`: a flush intent is written, the batch not yet queued.

use std::sync::OnceLock;

/// Aborts the process if `name` is listed in `TALLYD_FAILPOINTS`.
pub fn hit(name: &str) {
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
