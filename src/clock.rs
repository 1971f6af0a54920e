//! The wall clock, in one place, so that every stage reads time the same way.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock as a duration since the Unix epoch (zero before it).
pub fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
