//! tallyd: a StatsD-compatible write-back aggregator that writes one
//! compacted row per key and interval to ClickHouse.
//!
//! # Layout
//!
//! Data flows top to bottom:
//!
//! - [`ingest`]: sockets only (UDP threads, TCP tasks, protobuf batches with
//!   acks); hands blocks of bytes on.
//! - [`protocol`]: pure wire formats (the StatsD line parser, protobuf).
//! - [`wal`]: every block is appended to the mmap'd ring write-ahead log
//!   before it is aggregated; recovery replays it.
//! - [`ledger`]: exactly-once: instance identity, flush ids, the spool of
//!   recorded flushes, protobuf dedup, and the durable order (its module doc).
//! - [`aggregate`]: per-key accumulators in generation-swapped striped maps.
//! - [`outbox`]: a closed interval as a flush: rows, their RowBinary
//!   bodies, merge and concatenation, gauge memory; pure, no I/O.
//! - [`flush`]: when an interval closes (1 s boundary or `max_depth`), and flush ids.
//! - [`sink`]: the ClickHouse schema, inserts with retry classification,
//!   and the `flushes` table that confirms each flush.
//! - [`rollup`]: minute and hour rollups recomputed as rows land, and
//!   retention.
//! - [`admin`]: `/health` and `/metrics`; [`telemetry`]: every self-metric.
//! - [`config`], [`cli`]: settings and the command line; [`server`]: wiring and shutdown.
//! - [`notify`], [`activation`]: systemd readiness, watchdog and socket activation.
//! - [`auth`]: TLS and bearer tokens on the listeners (pure; its files are
//!   read with the configuration).
//! - Under every stage: [`fs`], the filesystem seam every durable write
//!   goes through, [`clock`], the wall clock, and [`latency`], recent
//!   latencies of tallyd's own operations.
//!
//! Lower layers never import higher ones (`scripts/cycles.py` checks it):
//! `protocol`, `fs` and `clock` at the bottom, then `wal`, `telemetry`,
//! `aggregate`, `outbox`, `ledger` (persists the outbox's flushes), `sink`
//! (transports them), `rollup` (reads them back, coarser), and `flush` and
//! `server` on top.
//! - [`client`]: `tallyd send`; [`failpoint`]: named crash points for tests.

pub mod activation;
pub mod admin;
pub mod aggregate;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod failpoint;
pub mod flush;
pub mod forward;
pub mod fs;
pub mod ingest;
pub mod latency;
pub mod ledger;
pub mod notify;
pub mod outbox;
pub mod protocol;
pub mod replication;
pub mod rollup;
pub mod server;
pub mod sink;
pub mod telemetry;
#[cfg(test)]
mod test_dir;
pub mod wal;

/// Locks `m`. A mutex poisoned by a thread that panicked is taken as it
/// is, so that one panic does not stop every other thread that uses it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
