//! Unit tests of [`super`].

use super::*;

#[test]
fn error_code_is_read_from_the_message() {
    assert_eq!(
        error_code("Code: 53, e.displayText() = DB::Exception: Type mismatch"),
        Some(53)
    );
    assert_eq!(error_code("Code: 117. DB::Exception: bad"), Some(117));
    assert_eq!(error_code("connection refused"), None);
}

#[test]
fn a_bad_data_code_wrapped_in_another_is_a_schema_failure() {
    use clickhouse::error::Error as E;
    let wrapped = "Code: 1000. DB::Exception: Streaming insert finish failed: Code: 33. DB::Exception: Cannot read all data. Bytes read: 3. Bytes expected: 8: (at row 1)";
    assert_eq!(classify(&E::BadResponse(wrapped.into())), Failure::Schema);
    assert_eq!(
        classify(&E::BadResponse("Code: 1000. DB::Exception: Timeout".into())),
        Failure::Retry
    );
}

#[test]
fn bad_data_is_rejected_outage_is_retried() {
    use clickhouse::error::Error as E;
    assert_eq!(
        classify(&E::BadResponse(
            "Code: 53, e.displayText() = DB::Exception".into()
        )),
        Failure::Schema
    );
    assert_eq!(
        classify(&E::BadResponse("Code: 117. DB::Exception".into())),
        Failure::Schema
    );
    assert_eq!(
        classify(&E::BadResponse("Code: 241. Memory limit".into())),
        Failure::Retry
    );
    assert_eq!(
        classify(&E::BadResponse("Code: 60. Table doesn't exist".into())),
        Failure::Retry
    );
    assert_eq!(classify(&E::TimedOut), Failure::Retry);
    assert_eq!(classify(&E::Network("refused".into())), Failure::Retry);
}

#[test]
fn backoff_grows_and_is_capped() {
    let (i, m) = (Duration::from_millis(100), Duration::from_secs(10));
    assert_eq!(backoff(0, i, m, 1.0), Duration::from_millis(100));
    assert_eq!(backoff(3, i, m, 1.0), Duration::from_millis(800));
    assert_eq!(backoff(20, i, m, 1.0), m);
    assert_eq!(backoff(u32::MAX, i, m, 0.0), m / 2);
}

#[test]
fn jitter_is_a_fraction() {
    let j = jitter();
    assert!((0.0..1.0).contains(&j));
}
