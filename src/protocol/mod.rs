//! Wire formats, as pure code over bytes: no sockets, no tokio.
//!
//! - [`statsd`]: StatsD / DogStatsD lines.
//! - [`dogstatsd`]: DogStatsD events and service checks.
//! - [`proto`]: the protobuf protocol (framing, events).
//! - [`batch`]: a protobuf `Batch` read in place, without allocating.

pub mod batch;
pub mod dogstatsd;
pub mod proto;
pub mod statsd;
