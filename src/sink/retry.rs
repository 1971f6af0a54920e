//! Retry classification: which ClickHouse errors are an outage (retried
//! with capped exponential backoff and jitter) and which say the rows do not
//! fit the table (the table is blocked).

use std::time::Duration;

/// What to do about a failed insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server or the network failed: try again later.
    Retry,
    /// The server says the rows do not fit the table: the table's schema
    /// drifted. Retried (slowly) until an operator fixes the table.
    Schema,
}

/// ClickHouse error codes that mean the rows do not fit the table.
pub(super) const BAD_DATA_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    130, // CANNOT_READ_ARRAY_FROM_TEXT
    190, // SIZES_OF_ARRAYS_DOESNT_MATCH
];

/// ClickHouse error codes meaning the database or a table is missing.
pub(super) const MISSING_SCHEMA_CODES: &[u32] = &[60, 81];

/// The `Code: N` of a ClickHouse error message, if it has one.
pub fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Every `Code: N` of a ClickHouse error message, outermost first.
fn error_codes(message: &str) -> impl Iterator<Item = u32> + '_ {
    message
        .match_indices("Code: ")
        .filter_map(|(at, _)| error_code(&message[at..]))
}

/// An error as the log and `/health` say it: with rustls's reason in
/// words when it failed at TLS (see [`super::tls::tls_reason`]), which
/// the client's own text (`network error: client error (Connect)`) loses.
pub fn describe(err: &clickhouse::error::Error) -> String {
    match super::tls::tls_reason(err) {
        Some(reason) => format!("{err}{}{reason}", crate::telemetry::Telemetry::TLS_FAILED),
        None => err.to_string(),
    }
}

/// Classifies a failed insert.
pub fn classify(err: &clickhouse::error::Error) -> Failure {
    use clickhouse::error::Error as E;
    match err {
        // A code nested in another (a wrapped exception, as the embedded
        // engine's `Code: 1000. … Code: 33. …`) counts as well.
        E::BadResponse(msg) if error_codes(msg).any(|c| BAD_DATA_CODES.contains(&c)) => {
            Failure::Schema
        }
        E::Custom(_) | E::SequenceMustHaveLength | E::InvalidUtf8Encoding(_) => Failure::Schema,
        _ => Failure::Retry,
    }
}

/// The delay before retry number `attempt` (0-based): exponential from
/// `initial`, capped at `max`, with jitter in [50 %, 100 %] of the step.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let step = initial
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(max);
    step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

pub fn jitter() -> f64 {
    let nanos = crate::clock::wall_clock().subsec_nanos() as u64;
    let mixed = nanos.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    mixed as f64 / (1u64 << 53) as f64
}
