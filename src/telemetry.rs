//! tallyd's own metrics: every counted event has its name here, and
//! [`Telemetry::render`] prints them in the Prometheus text format.
//!
//! Hot paths count into a local [`BlockStats`] and add it here once per
//! datagram or read, so the atomics are touched once per block, not per line.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::statsd::ParseError;

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Datagrams (UDP) or reads (TCP).
    pub blocks: AtomicU64,
    pub bytes: AtomicU64,
    pub lines: AtomicU64,
    pub parse_errors: [AtomicU64; ParseError::ALL.len()],
    pub events: AtomicU64,
    pub service_checks: AtomicU64,
    /// Unknown DogStatsD fields skipped (their lines counted).
    pub skipped_fields: AtomicU64,
}

/// What one block of input produced, counted locally.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockStats {
    /// Blocks received: datagrams, TCP reads, frames or protobuf batches.
    pub blocks: u64,
    pub bytes: u64,
    pub lines: u64,
    /// Raw increments applied to accumulators.
    pub samples: u64,
    pub parse_errors: [u64; ParseError::ALL.len()],
    pub events: u64,
    pub service_checks: u64,
    pub skipped_fields: u64,
    /// Samples of new keys refused because the key limit was reached.
    pub dropped_key_limit: u64,
    /// Set members refused because their set was at its member limit.
    pub dropped_set_members: u64,
    /// Samples refused because the generation's memory budget was spent.
    pub dropped_memory: u64,
    /// Samples of metrics a mapping rule drops.
    pub dropped_mapping: u64,
    /// Samples refused because their key's sum would not be finite.
    pub dropped_overflow: u64,
    /// Samples whose `|T` timestamp is outside `aggregate.timestamp_window`.
    pub dropped_timestamp: u64,
}

impl BlockStats {
    pub fn parse_error_total(&self) -> u64 {
        self.parse_errors.iter().sum()
    }
}

/// Tables tallyd writes, in a stable order.
pub const TABLES: [&str; 6] = [
    "counters",
    "gauges",
    "timers",
    "sets",
    "events",
    "service_checks",
];

#[derive(Debug, Default)]
pub struct Telemetry {
    pub udp: ListenerStats,
    pub tcp: ListenerStats,
    /// The DogStatsD Unix datagram socket.
    pub uds: ListenerStats,
    /// Protobuf batches (blocks), their bytes and events (lines).
    pub proto: ListenerStats,
    /// Protobuf batches by answer: OK, DUPLICATE, REJECTED, OVERLOADED.
    pub proto_acks: [AtomicU64; 5],
    pub proto_frames_too_large: AtomicU64,
    pub samples: AtomicU64,
    pub dropped_key_limit: AtomicU64,
    /// Samples refused past `aggregate.max_memory`.
    pub dropped_memory: AtomicU64,
    /// Samples of metrics a mapping rule drops (`drop = true`).
    pub dropped_mapping: AtomicU64,
    pub dropped_overflow: AtomicU64,
    pub dropped_timestamp: AtomicU64,
    /// DogStatsD stream frames over the length limit (connection closed).
    pub uds_frames_too_large: AtomicU64,
    /// Datagrams over 65,535 bytes (a Unix socket's), dropped whole.
    pub datagrams_too_large: AtomicU64,
    pub dropped_set_members: AtomicU64,
    pub dropped_gauge_memory: AtomicU64,
    pub tcp_lines_too_long: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_connections_refused: AtomicU64,
    pub udp_kernel_drops: AtomicU64,
    /// The same for the protobuf UDP socket.
    pub proto_udp_kernel_drops: AtomicU64,
    pub live_keys: AtomicU64,
    /// Keys in the series table (read at scrape time).
    pub series_keys: AtomicU64,
    pub pending_samples: AtomicU64,
    pub flushes: AtomicU64,
    pub flushes_by_depth: AtomicU64,
    /// Flushes left on disk for the sink (its queue was full).
    pub flushes_parked: AtomicU64,
    /// Bytes of the spool (read at scrape time).
    pub spool_bytes: AtomicU64,
    pub flush_nanos: AtomicU64,
    pub backlog_batches: AtomicU64,
    pub backlog_rows: AtomicU64,
    /// The start of the oldest interval in the backlog, Unix seconds (0:
    /// none).
    pub backlog_oldest: AtomicU64,
    pub rows_written: [AtomicU64; TABLES.len()],
    pub bytes_written: [AtomicU64; TABLES.len()],
    /// INSERTs ClickHouse confirmed (each makes a part).
    pub inserts: [AtomicU64; TABLES.len()],
    /// Rows of flushes sent again from the spool after a restart (their
    /// first send may have landed; ClickHouse collapses the copies).
    pub rows_resent: [AtomicU64; TABLES.len()],
    /// 1 while the table's inserts are refused as not matching its schema.
    pub tables_blocked: [AtomicU64; TABLES.len()],
    pub clickhouse_retries: AtomicU64,
    /// Inserts refused because the rows do not fit the table (retried).
    pub clickhouse_schema_errors: AtomicU64,
    /// Flushes that could not be recorded in the spool (held, not sent).
    pub spool_errors: AtomicU64,
    /// Protobuf batches refused as below the client's dedup window.
    pub proto_too_old: AtomicU64,
    /// SO_RCVBUF of the StatsD UDP sockets, as the kernel reports it.
    pub udp_receive_buffer: AtomicU64,
    /// TCP and protobuf connections closed after `idle_timeout` of silence.
    pub connections_idle_closed: AtomicU64,
    pub rows_lost_at_shutdown: AtomicU64,
    /// Rows of flushes whose spool file was damaged or unreadable when
    /// the sink came to send them: moved aside, not written.
    pub rows_lost_damaged: AtomicU64,
    /// The fleet tier: an edge's forwarding, an aggregator's edges.
    pub fleet: fleet::Fleet,
    /// Connections and requests refused by TLS or token.
    pub refused: refused::Refused,
    /// Replicated ingest: publishes, leases, lag.
    pub replication: replication::Replication,
    /// Rollups, retention and the flushes table.
    pub rollups: rollup::Rollups,
    /// Metrics folding keys past their budgets.
    pub cardinality: cardinality::Cardinality,
    /// Recent latencies of flushes, INSERTs and protobuf acks (the WAL
    /// keeps its syncs').
    pub latency: Latencies,
    /// OTLP requests (their blocks, bytes and points in `otlp_blocks`),
    /// points by outcome, and the series state.
    pub otlp: otlp::Otlp,
    pub otlp_blocks: ListenerStats,
    pub dropped_wal_full: AtomicU64,
    /// Unix ms of the flush loop's and the UDP threads' last sign of life.
    pub flush_heartbeat_ms: AtomicU64,
    pub udp_heartbeat_ms: AtomicU64,
    pub replayed_samples: AtomicU64,
    /// Intervals replayed under the keying in force because their own
    /// (named by their WAL start record) could not be read.
    pub keying_missing: AtomicU64,
    pub dropped_wal_too_large: AtomicU64,
    /// 1 while a closed interval is held: it could not be recorded in the
    /// spool or its WAL records not released, so it is not sent and no new
    /// interval closes (the WAL fills meanwhile).
    pub flush_held: AtomicU64,
    /// Why the flush is held (the last error), for `/health`.
    pub flush_held_error: std::sync::Mutex<String>,
    /// 1 while the spool is at `spool.hard_limit` and intervals stay open.
    pub spool_full: AtomicU64,
    /// Ticks that did not close the interval: the spool at its hard limit,
    /// or past its budget (the interval coarsens instead of a merge).
    pub flushes_deferred: AtomicU64,
    /// Times the wall clock was found behind the open interval's start.
    pub clock_steps_back: AtomicU64,
    /// Gauges forgotten after `aggregate.gauge_ttl` without an update.
    pub gauges_aged_out: AtomicU64,
    /// Unix ms of the last block the WAL refused as full (0: never).
    pub wal_refused_ms: AtomicU64,
    /// Admin requests refused for a missing or wrong token.
    pub admin_refused: AtomicU64,
    /// Unix ms since ClickHouse has failed every statement (0: it took
    /// the last one), and its last error.
    pub clickhouse_failing_since_ms: AtomicU64,
    pub clickhouse_last_error: std::sync::Mutex<String>,
}

impl Telemetry {
    /// Counts a block the WAL refused.
    pub fn wal_refused(&self, e: crate::wal::AppendError) {
        match e {
            crate::wal::AppendError::Full => {
                self.dropped_wal_full.fetch_add(1, Relaxed);
                self.wal_refused_ms.store(unix_ms(), Relaxed);
            }
            crate::wal::AppendError::TooLarge => {
                self.dropped_wal_too_large.fetch_add(1, Relaxed);
            }
        }
    }

    /// The words between a ClickHouse error and its TLS reason (see
    /// `sink::describe`): `/health` names a failing handshake, which is a
    /// configuration to fix, not an outage to wait out.
    pub const TLS_FAILED: &'static str = ": TLS: ";

    /// The TLS reason of ClickHouse's last failure, while it fails.
    pub fn clickhouse_tls_failure(&self) -> Option<String> {
        if self.clickhouse_failing_since_ms.load(Relaxed) == 0 {
            return None;
        }
        let last = crate::lock(&self.clickhouse_last_error);
        last.contains(Self::TLS_FAILED).then(|| last.clone())
    }

    /// ClickHouse failed a statement (`Some(error)`) or took one (`None`).
    pub fn clickhouse_answered(&self, error: Option<&str>) {
        match error {
            None => self.clickhouse_failing_since_ms.store(0, Relaxed),
            Some(e) => {
                let _ = self.clickhouse_failing_since_ms.compare_exchange(
                    0,
                    unix_ms().max(1),
                    Relaxed,
                    Relaxed,
                );
                e.clone_into(&mut crate::lock(&self.clickhouse_last_error));
            }
        }
    }

    /// Seconds ClickHouse has failed every statement (0: it has not).
    pub fn clickhouse_failing_secs(&self) -> u64 {
        match self.clickhouse_failing_since_ms.load(Relaxed) {
            0 => 0,
            since => unix_ms().saturating_sub(since) / 1000,
        }
    }

    /// A flush is held (`Some(error)`) or no longer (`None`).
    pub fn set_flush_held(&self, error: Option<&str>) {
        self.flush_held.store(u64::from(error.is_some()), Relaxed);
        if let Some(e) = error {
            e.clone_into(&mut crate::lock(&self.flush_held_error));
        }
    }

    /// Adds a block's local counts to a listener and to the totals.
    pub fn record_block(&self, listener: &ListenerStats, b: &BlockStats) {
        listener.blocks.fetch_add(b.blocks, Relaxed);
        listener.bytes.fetch_add(b.bytes, Relaxed);
        listener.lines.fetch_add(b.lines, Relaxed);
        for (c, n) in listener.parse_errors.iter().zip(b.parse_errors) {
            if n > 0 {
                c.fetch_add(n, Relaxed);
            }
        }
        add_nonzero(&listener.events, b.events);
        add_nonzero(&listener.service_checks, b.service_checks);
        add_nonzero(&listener.skipped_fields, b.skipped_fields);
        self.samples.fetch_add(b.samples, Relaxed);
        add_nonzero(&self.dropped_key_limit, b.dropped_key_limit);
        add_nonzero(&self.dropped_memory, b.dropped_memory);
        add_nonzero(&self.dropped_mapping, b.dropped_mapping);
        add_nonzero(&self.dropped_overflow, b.dropped_overflow);
        add_nonzero(&self.dropped_timestamp, b.dropped_timestamp);
        add_nonzero(&self.dropped_set_members, b.dropped_set_members);
    }
}

fn add_nonzero(c: &AtomicU64, n: u64) {
    if n > 0 {
        c.fetch_add(n, Relaxed);
    }
}

pub use latency::Latencies;

/// Now in Unix milliseconds, as the time stamps here are kept.
pub fn unix_ms() -> u64 {
    u64::try_from(crate::clock::wall_clock().as_millis()).unwrap_or(u64::MAX)
}

/// Appends the WAL's sync latency (`op="wal_sync"`) to `text`, a render
/// of these metrics.
pub fn render_wal_sync(text: &mut String, sync: &crate::latency::Latency) {
    latency::render(&mut Metrics(text), "wal_sync", sync);
}

/// A value already written out.
pub(crate) struct Text(pub String);

impl Sample for Text {
    fn text(&self) -> String {
        self.0.clone()
    }
}

/// A value the renderer can print.
pub(crate) trait Sample {
    fn text(&self) -> String;
}

impl Sample for AtomicU64 {
    fn text(&self) -> String {
        self.load(Relaxed).to_string()
    }
}

struct Seconds<'a>(&'a AtomicU64);

impl Sample for Seconds<'_> {
    fn text(&self) -> String {
        format!("{:.6}", self.0.load(Relaxed) as f64 / 1e9)
    }
}

/// Writes samples, with `# HELP` / `# TYPE` once per metric name.
pub(crate) struct Metrics<'a>(&'a mut String);

impl Metrics<'_> {
    pub(crate) fn counter(&mut self, name: &str, help: &str, labels: &str, v: &dyn Sample) {
        self.sample(name, "counter", help, labels, v);
    }

    pub(crate) fn gauge(&mut self, name: &str, help: &str, labels: &str, v: &dyn Sample) {
        self.sample(name, "gauge", help, labels, v);
    }

    fn sample(&mut self, name: &str, kind: &str, help: &str, labels: &str, v: &dyn Sample) {
        if !self.0.contains(&format!("# TYPE {name} ")) {
            let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {}", v.text());
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {}", v.text());
        }
    }
}

pub mod cardinality;
pub mod fleet;
mod latency;
pub mod otlp;
pub mod refused;
mod render;
pub mod replication;
pub mod rollup;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_block_adds_to_listener_and_totals() {
        let t = Telemetry::default();
        let mut b = BlockStats {
            blocks: 1,
            bytes: 100,
            lines: 5,
            samples: 4,
            ..Default::default()
        };
        b.parse_errors[ParseError::UnknownType.index()] = 1;
        t.record_block(&t.udp, &b);
        t.record_block(&t.udp, &b);
        assert_eq!(t.udp.lines.load(Relaxed), 10);
        assert_eq!(t.samples.load(Relaxed), 8);
        let text = t.render();
        assert!(
            text.contains(
                "tallyd_parse_errors_total{listener=\"udp\",reason=\"unknown_type\"} 2\n"
            )
        );
        assert!(text.contains("tallyd_received_bytes_total{listener=\"udp\"} 200\n"));
    }

    #[test]
    fn help_and_type_appear_once_per_name() {
        let text = Telemetry::default().render();
        assert_eq!(
            text.matches("# TYPE tallyd_parse_errors_total counter")
                .count(),
            1
        );
        assert_eq!(
            text.matches("# TYPE tallyd_clickhouse_errors_total ")
                .count(),
            1
        );
    }
}
