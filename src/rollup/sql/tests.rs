//! Unit tests of [`super`]: the statements' shapes. Their results are
//! tested against ClickHouse in `tests/rollup.rs`.

use super::*;

#[test]
fn every_rollup_table_and_the_runs_table_are_created() {
    let ddl = ddl("m", None, false);
    assert_eq!(ddl.len(), 9);
    for name in [
        "counters_1m",
        "gauges_1m",
        "timers_1m",
        "sets_1m",
        "counters_1h",
        "gauges_1h",
        "timers_1h",
        "sets_1h",
        "tallyd_rollups",
    ] {
        assert!(
            ddl.iter()
                .any(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS `m`.{name} ("))),
            "{name}"
        );
    }
    assert!(ddl[0].contains(
        "PARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfHour(ts), host, name, tags, ts, writer)"
    ));
    assert!(
        ddl[6].contains("PARTITION BY toYYYYMM(ts)\nORDER BY (name, tags, kind, host, ts, writer)")
    );
    let clustered = super::ddl("m", Some("c"), true);
    assert_eq!(clustered.len(), 18);
    assert!(clustered[0].contains(
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/m/counters_1m', '{replica}', version)"
    ));
    assert!(clustered[0].contains("    name LowCardinality(String),"));
}

#[test]
fn a_minute_reads_one_writers_raw_rows_of_that_minute() {
    let s = rollup("m", 0, Resolution::Minute, 1_700_000_040, 7, 99);
    assert!(s.starts_with(
        "INSERT INTO `m`.counters_1m (ts, name, tags, host, writer, version, value, samples)\nSELECT toStartOfMinute(ts) AS r_ts, name, tags, host, toUInt32(7), toUInt64(99), sum(value), sum(samples)"
    ), "{s}");
    assert!(s.contains("FROM (SELECT * FROM `m`.counters FINAL WHERE toStartOfMinute(ts) = toDateTime(1700000040) AND bitAnd(flush_id, 1048575) = 7)"), "{s}");
    let g = rollup("m", 1, Resolution::Minute, 60, 7, 99);
    assert!(g.contains("bitAnd(version, 1048575) = 7"), "{g}");
}

#[test]
fn an_hour_reads_one_writers_minutes_of_that_hour() {
    let s = rollup("m", 3, Resolution::Hour, 3600, 7, 99);
    assert!(s.contains("FROM (SELECT * FROM `m`.sets_1m FINAL WHERE toStartOfHour(ts) = toDateTime(3600) AND writer = 7)"), "{s}");
    assert!(
        s.contains("groupUniqArrayArray(member_hashes) AS r_members"),
        "{s}"
    );
    let t = rollup("m", 2, Resolution::Hour, 3600, 7, 99);
    assert!(t.contains("FROM (SELECT * FROM `m`.timers_1m FINAL"), "{t}");
    assert!(t.contains("GROUP BY r_ts, name, tags, kind, host"), "{t}");
}

#[test]
fn every_statement_fills_every_column() {
    for table in 0..ROLLED.len() {
        for res in Resolution::ALL {
            let s = rollup("m", table, res, 0, 1, 2);
            let select = &s[s.find("SELECT ").expect("select")..];
            // Top-level commas of the outer SELECT list, before its FROM.
            let list = &select[..select.find("\nFROM").expect("from")];
            let mut depth = 0;
            let mut items = 1;
            for c in list.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => items += 1,
                    _ => {}
                }
            }
            assert_eq!(items, columns(table).len(), "{s}");
        }
    }
}

#[test]
fn periods_start_on_their_boundary() {
    assert_eq!(Resolution::Minute.start(1_700_000_059), 1_700_000_040);
    assert_eq!(Resolution::Hour.start(1_700_003_599), 1_700_002_800);
}

#[test]
#[ignore = "prints the statements for trying them by hand"]
fn print_statements() {
    for res in Resolution::ALL {
        for table in 0..ROLLED.len() {
            println!("{};", rollup("rt", table, res, 1_700_000_040, 7, 99));
        }
    }
}
