//! Reading a series back: which table answers a range (the rule), and the
//! SQL of one series per period, as text. `tallyd query` runs it; the
//! explorer uses the same rule.

use super::Retention;
use super::sql::{ROLLED, Resolution, quantile, table};
use crate::sink::schema::quote_ident;

/// Where a chart's rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The raw rows, one per flush interval.
    Raw,
    Rollup(Resolution),
}

/// The rule: the finest resolution whose retention still covers `from`
/// (Unix seconds, against `now`) and whose periods over `[from, to)` are
/// at most `points`; hours when none is. Raw rows count one point per
/// flush interval (`interval_secs`).
pub fn choose(
    from: u32,
    to: u32,
    now: u32,
    interval_secs: u32,
    retention: &Retention,
    points: u32,
) -> Source {
    let span = u64::from(to.saturating_sub(from));
    let age = u64::from(now.saturating_sub(from));
    let fits = |step: u64, kept: std::time::Duration| {
        age <= kept.as_secs() && span.div_ceil(step.max(1)) <= u64::from(points)
    };
    if fits(u64::from(interval_secs), retention.raw) {
        Source::Raw
    } else if fits(60, retention.minute) {
        Source::Rollup(Resolution::Minute)
    } else {
        Source::Rollup(Resolution::Hour)
    }
}

/// A metric type, as the tables hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Counter,
    Gauge,
    Timer,
    Set,
}

impl Kind {
    fn table(self) -> usize {
        match self {
            Kind::Counter => 0,
            Kind::Gauge => 1,
            Kind::Timer => 2,
            Kind::Set => 3,
        }
    }
}

/// The SQL of series `name` (with every tag of `tags`, `k:v` each) per
/// period of `source` over `[from, to)`, summed across hosts and writers:
/// - counters: `ts, value, samples`;
/// - gauges: `ts, last, min, max`;
/// - timers: `ts, count, p50, p90, p99, max` (percentiles from the merged
///   buckets, within the sketch's 1 %);
/// - sets: `ts, uniques`.
pub fn series(
    database: &str,
    kind: Kind,
    name: &str,
    tags: &[String],
    from: u32,
    to: u32,
    source: Source,
) -> String {
    let db = quote_ident(database);
    let t = kind.table();
    let mut filter = format!("name = {}", literal(name));
    for tag in tags {
        filter.push_str(&format!(" AND has(tags, {})", literal(tag)));
    }
    // 18.16 uses the primary index only for a condition on the sorting
    // key's own expression (see `sql::rollup`), and refuses a FINAL query
    // that selects one: the rows come from a subquery.
    let rows = match source {
        Source::Raw => format!(
            "(SELECT * FROM {db}.{} FINAL WHERE toStartOfMinute(ts) >= toStartOfMinute(toDateTime({from})) AND toStartOfMinute(ts) < toDateTime({to}) AND {filter})",
            ROLLED[t],
        ),
        Source::Rollup(Resolution::Minute) => format!(
            // The server's hours (in a time zone of a half-hour offset too).
            "(SELECT * FROM {db}.{} FINAL WHERE toStartOfHour(ts) >= toStartOfHour(toDateTime({from})) AND toStartOfHour(ts) < toDateTime({to}) AND {filter})",
            table(t, Resolution::Minute),
        ),
        Source::Rollup(Resolution::Hour) => format!(
            "(SELECT * FROM {db}.{} FINAL WHERE {filter} AND ts >= toDateTime({from}) AND ts < toDateTime({to}))",
            table(t, Resolution::Hour)
        ),
    };
    let raw = source == Source::Raw;
    let values = match kind {
        Kind::Counter => "sum(value) AS value, sum(samples) AS samples".to_string(),
        Kind::Gauge if raw => {
            "argMax(value, version) AS last, min(value) AS min, max(value) AS max".to_string()
        }
        Kind::Gauge => {
            "argMax(last, last_version) AS last, min(min) AS min, max(max) AS max".to_string()
        }
        Kind::Timer => format!(
            "sum(count) AS r_count, {} AS p50, {} AS p90, {} AS p99, max(max) AS r_max",
            quantile("0.5"),
            quantile("0.9"),
            quantile("0.99")
        ),
        Kind::Set => "length(groupUniqArrayArray(member_hashes)) AS uniques".to_string(),
    };
    let timer = if kind == Kind::Timer {
        ", min(min) AS r_min, sumMap(bucket_values, bucket_counts) AS r_buckets, tupleElement(r_buckets, 1) AS r_values, tupleElement(r_buckets, 2) AS r_weights"
    } else {
        ""
    };
    let select = format!(
        "SELECT ts, {values}{timer}\nFROM {rows}\nWHERE ts >= toDateTime({from}) AND ts < toDateTime({to})\nGROUP BY ts ORDER BY ts"
    );
    if kind == Kind::Timer {
        format!("SELECT ts, r_count AS count, p50, p90, p99, r_max AS max FROM (\n{select}\n)")
    } else {
        select
    }
}

/// A ClickHouse string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finest_resolution_that_is_kept_and_fits_is_chosen() {
        let r = Retention::default();
        let now = 1_800_000_000;
        let pick = |range: u32| choose(now - range, now, now, 1, &r, 1500);
        assert_eq!(pick(15 * 60), Source::Raw);
        assert_eq!(pick(3600), Source::Rollup(Resolution::Minute));
        assert_eq!(pick(24 * 3600), Source::Rollup(Resolution::Minute));
        assert_eq!(pick(7 * 86_400), Source::Rollup(Resolution::Hour));
        assert_eq!(pick(30 * 86_400), Source::Rollup(Resolution::Hour));
        // A short range three days back: raw rows are gone by then.
        let old = now - 3 * 86_400;
        assert_eq!(
            choose(old, old + 600, now, 1, &r, 1500),
            Source::Rollup(Resolution::Minute)
        );
        // A 10 s flush interval fits 4 hours of raw rows in 1500 points.
        assert_eq!(choose(now - 4 * 3600, now, now, 10, &r, 1500), Source::Raw);
    }

    #[test]
    fn a_series_reads_its_table_by_the_sorting_key() {
        let s = series(
            "m",
            Kind::Counter,
            "a'b",
            &["env:prod".into()],
            120,
            600,
            Source::Raw,
        );
        assert!(s.contains("FROM (SELECT * FROM `m`.counters FINAL WHERE toStartOfMinute(ts) >= toStartOfMinute(toDateTime(120)) AND toStartOfMinute(ts) < toDateTime(600) AND name = 'a\\'b' AND has(tags, 'env:prod'))"), "{s}");
        let s = series(
            "m",
            Kind::Timer,
            "t",
            &[],
            3600,
            7200,
            Source::Rollup(Resolution::Minute),
        );
        assert!(
            s.contains(
                "`m`.timers_1m FINAL WHERE toStartOfHour(ts) >= toStartOfHour(toDateTime(3600))"
            ),
            "{s}"
        );
        assert!(
            s.starts_with("SELECT ts, r_count AS count, p50, p90, p99, r_max AS max FROM ("),
            "{s}"
        );
        let s = series(
            "m",
            Kind::Set,
            "u",
            &[],
            0,
            86_400,
            Source::Rollup(Resolution::Hour),
        );
        assert!(
            s.contains("`m`.sets_1h FINAL WHERE name = 'u' AND ts >= toDateTime(0)"),
            "{s}"
        );
    }
}
