//! The Prometheus text exposition of [`Telemetry`]: each metric once with
//! its `# HELP` and `# TYPE`, then its samples (the text format of
//! Prometheus' "Exposition formats").

use std::sync::atomic::Ordering::Relaxed;

use super::{Metrics, Seconds, TABLES, Telemetry, Text};
use crate::protocol::statsd::ParseError;

impl Telemetry {
    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut m = Metrics(&mut out);
        for (name, l) in [
            ("udp", &self.udp),
            ("tcp", &self.tcp),
            ("uds", &self.uds),
            ("proto", &self.proto),
            ("otlp", &self.otlp_blocks),
        ] {
            let lab = format!("listener=\"{name}\"");
            m.counter(
                "tallyd_received_blocks_total",
                "Datagrams (UDP) or reads (TCP) received.",
                &lab,
                &l.blocks,
            );
            m.counter(
                "tallyd_received_bytes_total",
                "Bytes received.",
                &lab,
                &l.bytes,
            );
            m.counter(
                "tallyd_received_lines_total",
                "StatsD lines received, good or bad.",
                &lab,
                &l.lines,
            );
            m.counter(
                "tallyd_events_total",
                "DogStatsD events kept (stored one row each).",
                &lab,
                &l.events,
            );
            m.counter(
                "tallyd_service_checks_total",
                "DogStatsD service checks kept (stored one row each).",
                &lab,
                &l.service_checks,
            );
            m.counter(
                "tallyd_skipped_fields_total",
                "Unknown DogStatsD |fields skipped; their lines still count.",
                &lab,
                &l.skipped_fields,
            );
            for (e, c) in ParseError::ALL.iter().zip(&l.parse_errors) {
                let lab = format!("{lab},reason=\"{}\"", e.reason());
                m.counter(
                    "tallyd_parse_errors_total",
                    "Lines rejected, by reason.",
                    &lab,
                    c,
                );
            }
        }
        for (status, c) in [
            "ok",
            "duplicate",
            "rejected",
            "overloaded",
            "unauthenticated",
        ]
        .iter()
        .zip(&self.proto_acks)
        {
            m.counter(
                "tallyd_proto_batches_total",
                "Protobuf batches by answer (UDP batches are counted as if answered).",
                &format!("status=\"{status}\""),
                c,
            );
        }
        m.counter(
            "tallyd_proto_frames_too_large_total",
            "Protobuf TCP frames over max_frame (the connection is closed).",
            "",
            &self.proto_frames_too_large,
        );
        m.counter(
            "tallyd_samples_total",
            "Raw increments applied to accumulators.",
            "",
            &self.samples,
        );
        for (reason, c) in [
            ("key_limit", &self.dropped_key_limit),
            ("memory", &self.dropped_memory),
            ("mapping", &self.dropped_mapping),
            ("overflow", &self.dropped_overflow),
            ("timestamp_out_of_window", &self.dropped_timestamp),
            ("uds_frame_too_large", &self.uds_frames_too_large),
            ("datagram_too_large", &self.datagrams_too_large),
            ("set_member_limit", &self.dropped_set_members),
            ("gauge_memory_limit", &self.dropped_gauge_memory),
            ("tcp_line_too_long", &self.tcp_lines_too_long),
            ("wal_full", &self.dropped_wal_full),
            ("wal_record_too_large", &self.dropped_wal_too_large),
        ] {
            m.counter(
                "tallyd_dropped_total",
                "Samples, lines or blocks dropped, by reason (wal_*: UDP datagrams the WAL refused; for TCP these count retries while the connection waits).",
                &format!("reason=\"{reason}\""),
                c,
            );
        }
        // The kernel's drops at a full receive buffer, by UDP listener.
        for (listener, c) in [
            ("statsd", &self.udp_kernel_drops),
            ("proto", &self.proto_udp_kernel_drops),
        ] {
            m.counter(
                "tallyd_dropped_total",
                "",
                &format!("reason=\"udp_kernel\",listener=\"{listener}\""),
                c,
            );
        }
        let failing = self.clickhouse_failing_since_ms.load(Relaxed) != 0;
        m.gauge(
            "tallyd_clickhouse_up",
            "1 while ClickHouse takes tallyd's statements; 0 once one failed, until one succeeds (rows wait in the spool meanwhile).",
            "",
            &Text(u8::from(!failing).to_string()),
        );
        m.gauge(
            "tallyd_clickhouse_failing_seconds",
            "How long ClickHouse has failed every statement (0: it has not).",
            "",
            &Text(self.clickhouse_failing_secs().to_string()),
        );
        m.counter(
            "tallyd_admin_refused_total",
            "Admin requests (API, /metrics) refused: a missing or wrong token, or, on loopback without a token, a Host header that names another host.",
            "",
            &self.admin_refused,
        );
        m.counter(
            "tallyd_tcp_connections_total",
            "Stream connections accepted: StatsD and protobuf over TCP, DogStatsD over a Unix stream socket.",
            "",
            &self.tcp_connections,
        );
        m.counter(
            "tallyd_tcp_connections_refused_total",
            "Stream connections (TCP or Unix) closed at once: the listener's connection limit was reached.",
            "",
            &self.tcp_connections_refused,
        );
        m.gauge(
            "tallyd_live_keys",
            "Keys in the current interval.",
            "",
            &self.live_keys,
        );
        m.gauge(
            "tallyd_series_keys",
            "Keys in the series table: those written in this interval or the one before (a key idle for a whole interval leaves it).",
            "",
            &self.series_keys,
        );
        m.gauge(
            "tallyd_pending_samples",
            "Raw increments in the current interval, not yet flushed.",
            "",
            &self.pending_samples,
        );
        m.counter(
            "tallyd_flushes_total",
            "Intervals closed and queued for ClickHouse.",
            "",
            &self.flushes,
        );
        m.counter(
            "tallyd_flushes_max_depth_total",
            "Flushes started early because max_depth samples were pending.",
            "",
            &self.flushes_by_depth,
        );
        m.counter(
            "tallyd_flushes_parked_total",
            "Flushes left in the spool on disk because the sink's queue was full (ClickHouse down or slow); the sink reads them back.",
            "",
            &self.flushes_parked,
        );
        m.gauge(
            "tallyd_spool_bytes",
            "Bytes of flushes recorded in the spool and not yet in ClickHouse.",
            "",
            &self.spool_bytes,
        );
        m.counter(
            "tallyd_flush_seconds_total",
            "Time spent closing intervals into rows.",
            "",
            &Seconds(&self.flush_nanos),
        );
        m.gauge(
            "tallyd_backlog_batches",
            "Closed intervals waiting for ClickHouse.",
            "",
            &self.backlog_batches,
        );
        m.gauge(
            "tallyd_backlog_rows",
            "Rows waiting for ClickHouse.",
            "",
            &self.backlog_rows,
        );
        m.gauge(
            "tallyd_backlog_oldest_timestamp_seconds",
            "The start of the oldest interval recorded and not yet in ClickHouse (or, on an edge, not yet taken by its upstreams), Unix seconds; 0: none.",
            "",
            &self.backlog_oldest,
        );
        for (i, table) in TABLES.iter().enumerate() {
            let lab = format!("table=\"{table}\"");
            m.counter(
                "tallyd_rows_written_total",
                "Rows ClickHouse confirmed.",
                &lab,
                &self.rows_written[i],
            );
            m.counter(
                "tallyd_bytes_written_total",
                "RowBinary bytes ClickHouse confirmed.",
                &lab,
                &self.bytes_written[i],
            );
            m.counter(
                "tallyd_inserts_total",
                "INSERTs ClickHouse confirmed; each makes at least one part (a drain joins intervals).",
                &lab,
                &self.inserts[i],
            );
            m.counter(
                "tallyd_rows_resent_total",
                "Rows of flushes re-sent from the spool after a restart (ClickHouse drops or collapses the copy).",
                &lab,
                &self.rows_resent[i],
            );
            m.gauge(
                "tallyd_table_blocked",
                "1 while ClickHouse refuses this table's rows as not matching its schema (data kept, retried).",
                &lab,
                &self.tables_blocked[i],
            );
        }
        m.counter(
            "tallyd_clickhouse_errors_total",
            "Failed inserts that will be retried.",
            "kind=\"retried\"",
            &self.clickhouse_retries,
        );
        m.counter(
            "tallyd_clickhouse_errors_total",
            "Failed inserts that will be retried.",
            "kind=\"schema\"",
            &self.clickhouse_schema_errors,
        );
        m.gauge(
            "tallyd_spool_full",
            "1 while the spool is at spool.hard_limit: intervals are not closed (they keep compacting in memory) and the WAL fills.",
            "",
            &self.spool_full,
        );
        m.counter(
            "tallyd_flushes_deferred_total",
            "Ticks that left the interval open: the spool at spool.hard_limit, or past spool.max_size (the interval then coarsens, up to a minute or half the WAL, instead of being merged into the spool each tick).",
            "",
            &self.flushes_deferred,
        );
        m.counter(
            "tallyd_clock_steps_back_total",
            "Times the wall clock was found behind the open interval's start (NTP stepping a fast clock back, a VM resumed from a snapshot); later rows get earlier ts, gauge versions keep growing.",
            "",
            &self.clock_steps_back,
        );
        m.counter(
            "tallyd_gauges_aged_out_total",
            "Gauges forgotten after aggregate.gauge_ttl without an update (a later delta resolves against 0).",
            "",
            &self.gauges_aged_out,
        );
        m.gauge(
            "tallyd_flush_held",
            "1 while a closed interval cannot be recorded in the spool or released from the WAL: it is not sent, no new interval closes, and the WAL fills (see /health for the error).",
            "",
            &self.flush_held,
        );
        m.counter(
            "tallyd_spool_errors_total",
            "Flushes that could not be recorded in the spool (held and retried, not sent).",
            "",
            &self.spool_errors,
        );
        m.gauge(
            "tallyd_udp_receive_buffer_bytes",
            "Receive buffer of the StatsD UDP sockets as the kernel reports it (SO_RCVBUF: twice the bytes granted; capped by net.core.rmem_max unless tallyd has CAP_NET_ADMIN).",
            "",
            &self.udp_receive_buffer,
        );
        m.counter(
            "tallyd_connections_idle_closed_total",
            "TCP and protobuf connections closed after their idle timeout.",
            "",
            &self.connections_idle_closed,
        );
        m.counter(
            "tallyd_proto_too_old_total",
            "Protobuf batches refused as below their client's deduplication window.",
            "",
            &self.proto_too_old,
        );
        m.gauge(
            "tallyd_wal_replayed_samples",
            "Raw increments rebuilt from the WAL at start.",
            "",
            &self.replayed_samples,
        );
        m.counter(
            "tallyd_keying_missing_total",
            "Intervals replayed under the dialects and mapping rules in force because the ones they were received under could not be read from data_dir/keying.",
            "",
            &self.keying_missing,
        );
        m.counter(
            "tallyd_rows_lost_at_shutdown_total",
            "Rows still unsent when the shutdown timeout ran out, with the WAL off (with it, they stay in the WAL).",
            "",
            &self.rows_lost_at_shutdown,
        );
        m.counter(
            "tallyd_rows_lost_damaged_total",
            "Rows of flushes whose spool file did not check (CRC) or could not be read when they were sent: moved aside (see /health), not written.",
            "",
            &self.rows_lost_damaged,
        );
        self.fleet.render(&mut m);
        self.refused.render(&mut m);
        self.replication.render(&mut m);
        self.rollups.render(&mut m);
        self.cardinality.render(&mut m);
        self.otlp.render(&mut m);
        self.latency.render(&mut m);
        out
    }
}
