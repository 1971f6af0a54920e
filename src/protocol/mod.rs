//! Wire formats, as pure code over bytes: no sockets, no tokio.
//!
//! - [`statsd`]: StatsD / DogStatsD lines.
//! - [`proto`]: the protobuf protocol (framing, events).

pub mod proto;
pub mod statsd;
