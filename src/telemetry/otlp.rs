//! The OTLP listeners' figures (see [`crate::ingest::otlp`] and
//! [`crate::ledger::temporality`]).

use std::sync::atomic::AtomicU64;

use super::Metrics;

/// Why a data point was not applied (`tallyd_otlp_points_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or its cumulative delta was).
    Applied = 0,
    /// A retry, or older than the last point of its series.
    Retry = 1,
    /// A cumulative point lower than the last with the same start.
    Decrease = 2,
    /// The first point of a cumulative series that started before tallyd.
    Reference = 3,
    /// Refused: invalid (unspecified temporality, no value, not finite…).
    Invalid = 4,
    /// Refused: its time is further than `aggregate.timestamp_window`.
    OutOfWindow = 5,
    /// Refused: a new series past the memory budget.
    Memory = 6,
    /// Refused when applied: a name or tags over tallyd's limits.
    Limits = 7,
    /// A staleness marker (`FLAG_NO_RECORDED_VALUE`): skipped.
    NoRecordedValue = 8,
}

pub const OUTCOMES: [&str; 9] = [
    "applied",
    "retry",
    "decrease",
    "reference",
    "invalid",
    "out_of_window",
    "memory",
    "limits",
    "no_recorded_value",
];

#[derive(Debug, Default)]
pub struct Otlp {
    /// Requests answered, by status: ok, partial, bad (400), too large
    /// (413), unavailable (503).
    pub requests: [AtomicU64; 5],
    pub points: [AtomicU64; 9],
    /// Series whose last point is remembered, and their estimated bytes.
    pub series: AtomicU64,
    pub series_bytes: AtomicU64,
}

pub const STATUSES: [&str; 5] = ["ok", "partial", "bad_request", "too_large", "unavailable"];

impl Otlp {
    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        for (i, s) in STATUSES.iter().enumerate() {
            m.counter(
                "tallyd_otlp_requests_total",
                "OTLP export requests answered, by status.",
                &format!("status=\"{s}\""),
                &self.requests[i],
            );
        }
        for (i, o) in OUTCOMES.iter().enumerate() {
            m.counter(
                "tallyd_otlp_points_total",
                "OTLP data points received, by what became of them.",
                &format!("outcome=\"{o}\""),
                &self.points[i],
            );
        }
        m.gauge(
            "tallyd_otlp_series",
            "OTLP series whose last point tallyd remembers (cumulative-to-delta and retry state).",
            "",
            &self.series,
        );
        m.gauge(
            "tallyd_otlp_series_bytes",
            "Estimated bytes of the OTLP series state (counted in aggregate.max_memory).",
            "",
            &self.series_bytes,
        );
    }
}
