//! Recent latencies of tallyd's own operations in `/metrics` (see
//! [`crate::latency`]): `tallyd_latency_seconds{op, quantile}` for p50,
//! p99 and the max (quantile 1) over the last one to two minutes.

use crate::latency::Latency;

use super::{Metrics, Text};

#[derive(Debug, Default)]
pub struct Latencies {
    /// A flush: from the interval's close until it is recorded and
    /// released (or queued).
    pub flush: Latency,
    /// One table's INSERT of a flush, sent until ClickHouse answered.
    pub insert: Latency,
    /// A protobuf batch, taken until its ack is written.
    pub proto_ack: Latency,
    /// A batch's publish to the replication stream, until it answered.
    pub replication_publish: Latency,
}

impl Latencies {
    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        for (op, l) in [
            ("flush", &self.flush),
            ("insert", &self.insert),
            ("proto_ack", &self.proto_ack),
            ("replication_publish", &self.replication_publish),
        ] {
            render(m, op, l);
        }
    }
}

/// `tallyd_latency_seconds` of one operation (nothing while it has none).
pub(crate) fn render(m: &mut Metrics<'_>, op: &str, l: &Latency) {
    let Some(s) = l.summary() else { return };
    for (q, v) in [("0.5", s.p50), ("0.99", s.p99), ("1", s.max)] {
        m.gauge(
            "tallyd_latency_seconds",
            "Latency of tallyd's own operations over the last one to two minutes (flush, insert, wal_sync, proto_ack, replication_publish), by quantile (1: the max).",
            &format!("op=\"{op}\",quantile=\"{q}\""),
            &Text(format!("{v:.6}")),
        );
    }
}
