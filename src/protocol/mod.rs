//! Wire formats, as pure code over bytes: no sockets, no tokio.
//!
//! - [`statsd`]: StatsD / DogStatsD lines.
//! - [`dialect`]: tags written in names (InfluxDB, Librato, SignalFx, Graphite).
//! - [`dogstatsd`]: DogStatsD events and service checks.
//! - [`proto`]: the protobuf protocol (framing, events).
//! - [`batch`]: a protobuf `Batch` read in place, without allocating.
//! - [`glob`]: shell-style patterns over metric names.
//! - [`otlp`]: OpenTelemetry metrics requests, decoded and flattened.

pub mod batch;
pub mod dialect;
pub mod dogstatsd;
pub mod glob;
pub mod otlp;
pub mod proto;
pub mod statsd;
