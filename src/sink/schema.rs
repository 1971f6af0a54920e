//! The ClickHouse schema tallyd writes to (the DDL `tallyd schema` prints).
//!
//! Every table is a `ReplacingMergeTree` whose sorting key holds the flush
//! identity (`host`, `flush_id`, or `version` for gauges) next to the series
//! key. A flush that is sent twice therefore collapses into one row per key
//! under `FINAL` (or after a merge), on every ClickHouse version from 18.16.
//! The DDL uses nothing newer than 18.16 has (no Map, LowCardinality, CODEC,
//! TTL, DateTime64).

/// The statements that create the database and tables, in order. With
/// `dedup_window` (servers that have it, 22.2 and later), each table also
/// drops a re-sent insert with a known `insert_deduplication_token`.
pub fn ddl(database: &str, dedup_window: bool) -> Vec<String> {
    let db = quote_ident(database);
    let mut statements = vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.counters (
    ts DateTime,
    name String,
    tags Array(String),
    host String,
    flush_id UInt64,
    value Float64,
    samples UInt64
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (name, tags, host, flush_id)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.gauges (
    ts DateTime,
    name String,
    tags Array(String),
    host String,
    value Float64,
    version UInt64,
    samples UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(ts)
ORDER BY (name, tags, host, version)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.timers (
    ts DateTime,
    name String,
    tags Array(String),
    host String,
    flush_id UInt64,
    kind String,
    count UInt64,
    sum Float64,
    min Float64,
    max Float64,
    p50 Float64,
    p90 Float64,
    p95 Float64,
    p99 Float64,
    samples UInt64,
    bucket_values Array(Float64),
    bucket_counts Array(UInt64)
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (name, tags, kind, host, flush_id)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.sets (
    ts DateTime,
    name String,
    tags Array(String),
    host String,
    flush_id UInt64,
    cardinality UInt64,
    samples UInt64,
    member_hashes Array(UInt64)
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (name, tags, host, flush_id)"
        ),
    ];
    if dedup_window {
        for s in statements.iter_mut().skip(1) {
            s.push_str("\nSETTINGS non_replicated_deduplication_window = 1000");
        }
    }
    statements
}

/// Whether a `SELECT version()` answer is 22.2 or later: the first version
/// with `insert_deduplication_token` (unknown settings fail every request
/// on older servers, so it is sent only to these).
pub fn has_dedup_token(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (22, 2)
}

/// Quotes an identifier with backticks (the database name comes from config).
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_is_created_in_the_database() {
        let ddl = ddl("metrics", false);
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `metrics`");
        for table in crate::telemetry::TABLES {
            assert!(
                ddl.iter()
                    .any(|s| s
                        .starts_with(&format!("CREATE TABLE IF NOT EXISTS `metrics`.{table} ("))),
                "{table}"
            );
        }
    }

    #[test]
    fn dedup_window_only_for_modern_servers() {
        assert!(ddl("m", true)[1].ends_with("SETTINGS non_replicated_deduplication_window = 1000"));
        assert!(!ddl("m", false)[1].contains("SETTINGS"));
        assert!(!has_dedup_token("18.16.1"));
        assert!(!has_dedup_token("22.1.3.7"));
        assert!(has_dedup_token("22.2.2.1"));
        assert!(has_dedup_token("24.8.4.13"));
        assert!(!has_dedup_token("garbage"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a`b"), "`a\\`b`");
    }
}
