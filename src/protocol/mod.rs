//! Wire formats, as pure code over bytes: no sockets, no tokio.
//!
//! - [`statsd`]: StatsD / DogStatsD lines.
//! - [`dogstatsd`]: DogStatsD events and service checks.
//! - [`proto`]: the protobuf protocol (framing, events).

pub mod dogstatsd;
pub mod proto;
pub mod statsd;
