//! Wire formats, as pure code over bytes: no sockets, no tokio.
//!
//! - [`statsd`]: StatsD / DogStatsD lines.

pub mod statsd;
