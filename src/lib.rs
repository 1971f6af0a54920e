//! tallyd: a StatsD-compatible write-back aggregator that writes one
//! compacted row per key and interval to ClickHouse.

pub mod aggregate;
pub mod flush;
pub mod protocol;
pub mod sink;
pub mod telemetry;
