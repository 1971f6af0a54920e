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

/// One chart's rows: a metric of a type, narrowed by tags and a host,
/// over `[from, to)` (Unix seconds) from `source`.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    pub database: &'a str,
    pub kind: Kind,
    pub name: &'a str,
    /// Every one must be on a row (`k:v` each).
    pub tags: &'a [String],
    pub host: Option<&'a str>,
    pub from: u32,
    pub to: u32,
    pub source: Source,
    /// Rollups of periods due before this are complete (see [`cuts`]).
    pub settled: u32,
}

/// How a chart splits into series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group<'a> {
    /// By the value of a tag key: `key:value`, or `""` for rows without it.
    Tag(&'a str),
    Host,
}

/// The SQL of a chart's one series per period of its source over
/// `[from, to)`, summed across hosts and writers:
/// - counters: `ts, value, samples`;
/// - gauges: `ts, last, min, max`;
/// - timers: `ts, count, p50, p90, p99, max` (percentiles from the merged
///   buckets, within the sketch's 1 %);
/// - sets: `ts, uniques`.
pub fn series(chart: &Chart<'_>) -> String {
    select(chart, "ts", None)
}

/// The SQL of the `n` groups of `group` with the most (counters: the
/// largest sum; timers: the most samples; gauges and sets: the most rows)
/// over the chart's range, as `grp, total` rows, largest first.
pub fn top_groups(chart: &Chart<'_>, group: Group<'_>, n: u32) -> String {
    let total = match chart.kind {
        Kind::Counter => "sum(value)",
        Kind::Timer => "sum(count)",
        Kind::Gauge | Kind::Set => "count()",
    };
    let (from, to) = (chart.from, chart.to);
    format!(
        "SELECT {} AS grp, {total} AS total\nFROM {}\nWHERE ts >= toDateTime({from}) AND ts < toDateTime({to})\nGROUP BY grp ORDER BY total DESC, grp LIMIT {n}",
        group_expr(group),
        rows(chart)
    )
}

/// The SQL of a chart per period as `t` (Unix seconds), `grp` (`'all'`
/// without a group; else the group's value if it is one of `top`, or
/// `'other'`) and the values of its type (as [`series`]).
pub fn grouped(chart: &Chart<'_>, group: Option<(Group<'_>, &[String])>) -> String {
    let label = match group {
        None => "'all'".to_string(),
        Some((_, [])) => "'other'".to_string(),
        Some((g, top)) => {
            let list: Vec<String> = top.iter().map(|v| literal(v)).collect();
            format!(
                "if({} IN ({}), {}, 'other')",
                group_expr(g),
                list.join(", "),
                group_expr(g)
            )
        }
    };
    select(chart, "toUInt32(ts) AS t", Some(&label))
}

/// A group's value on a row.
fn group_expr(group: Group<'_>) -> String {
    match group {
        Group::Host => "host".to_string(),
        Group::Tag(key) => {
            let prefix = format!("{key}:");
            format!(
                "arrayFirst(x -> substring(x, 1, {}) = {}, tags)",
                prefix.len(),
                literal(&prefix)
            )
        }
    }
}

/// Where a rollup read hands over to finer rows. A minute is rolled up
/// about 20 s after it ends (it waits 15 s; the job runs every 5 s) and an
/// hour after its last minute, so a chart read only from rollups would end
/// a minute (or an hour) early. Periods from the cuts on are read from the
/// finer table and grouped into the coarse period instead. `settled` is
/// the time before which the rollups are complete: now less the rollup
/// lag (`tallyd_rollup_lag_seconds`). Returns (hour cut, minute cut): the
/// hour cut as a SQL `DateTime` expression, for hours are the server's
/// (its time zone may be half an hour off UTC, as the hour rollups'
/// periods are); minutes are the same everywhere.
pub fn cuts(settled: u32) -> (String, u32) {
    let minute = settled.saturating_sub(120);
    let hour = settled.saturating_sub(300);
    (
        format!("toStartOfHour(toDateTime({hour}))"),
        minute - minute % 60,
    )
}

/// A `DateTime` bound of a part: a number known here, or an expression
/// the server evaluates.
#[derive(Debug, Clone)]
enum At {
    Secs(u32),
    Expr(String),
}

impl At {
    fn sql(&self) -> String {
        match self {
            At::Secs(s) => format!("toDateTime({s})"),
            At::Expr(e) => e.clone(),
        }
    }

    /// `self` within `[lo, hi]`.
    fn clamp(self, lo: &At, hi: &At) -> At {
        match (&self, lo, hi) {
            (At::Secs(s), At::Secs(l), At::Secs(h)) => At::Secs((*s).clamp(*l, (*h).max(*l))),
            _ => At::Expr(format!(
                "greatest({}, least({}, {}))",
                lo.sql(),
                self.sql(),
                hi.sql()
            )),
        }
    }
}

/// The chart's rows: for raw rows, the table's own; for a rollup, its
/// periods before the cut ([`cuts`]) and the finer rows after it, grouped
/// into the same periods, in the rollup's columns.
fn rows(chart: &Chart<'_>) -> String {
    let (from, to) = (At::Secs(chart.from), At::Secs(chart.to));
    let (hour_cut, minute_cut) = cuts(chart.settled);
    let parts = match chart.source {
        Source::Raw => return part(chart, Source::Raw, &from, &to, None),
        Source::Rollup(Resolution::Minute) => {
            let cut = At::Secs(minute_cut).clamp(&from, &to);
            vec![
                part(chart, chart.source, &from, &cut, None),
                part(chart, Source::Raw, &cut, &to, Some("toStartOfMinute")),
            ]
        }
        Source::Rollup(Resolution::Hour) => {
            let hour = At::Expr(hour_cut).clamp(&from, &to);
            let minute = At::Secs(minute_cut).clamp(&hour, &to);
            let floor = Some("toStartOfHour");
            vec![
                part(chart, chart.source, &from, &hour, None),
                part(
                    chart,
                    Source::Rollup(Resolution::Minute),
                    &hour,
                    &minute,
                    floor,
                ),
                part(chart, Source::Raw, &minute, &to, floor),
            ]
        }
    };
    let parts: Vec<String> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    format!("(\n{}\n)", parts.join("\nUNION ALL\n"))
}

/// One table's rows of the chart over `[from, to)` (empty when that is,
/// as far as known here), read by the sorting key (a subquery: 18.16
/// uses the primary index only for a condition on the key's own
/// expression, see `sql::rollup`, and refuses a FINAL query that selects
/// one). With `floor` (a rollup's finer part), `ts` becomes `floor(ts)`
/// and the columns the rollup's.
fn part(chart: &Chart<'_>, table_of: Source, from: &At, to: &At, floor: Option<&str>) -> String {
    if let (At::Secs(f), At::Secs(t)) = (from, to)
        && f >= t
    {
        return String::new();
    }
    let (from, to) = (from.sql(), to.sql());
    let db = quote_ident(chart.database);
    let t = chart.kind.table();
    let mut filter = format!("name = {}", literal(chart.name));
    for tag in chart.tags {
        filter.push_str(&format!(" AND has(tags, {})", literal(tag)));
    }
    if let Some(host) = chart.host {
        filter.push_str(&format!(" AND host = {}", literal(host)));
    }
    let range = format!("ts >= {from} AND ts < {to}");
    let read = match table_of {
        Source::Raw => format!(
            "SELECT * FROM {db}.{} FINAL WHERE toStartOfMinute(ts) >= toStartOfMinute({from}) AND toStartOfMinute(ts) < {to} AND {filter} AND {range}",
            ROLLED[t],
        ),
        Source::Rollup(Resolution::Minute) => format!(
            // The server's hours (in a time zone of a half-hour offset too).
            "SELECT * FROM {db}.{} FINAL WHERE toStartOfHour(ts) >= toStartOfHour({from}) AND toStartOfHour(ts) < {to} AND {filter} AND {range}",
            table(t, Resolution::Minute),
        ),
        Source::Rollup(Resolution::Hour) => format!(
            "SELECT * FROM {db}.{} FINAL WHERE {filter} AND {range}",
            table(t, Resolution::Hour)
        ),
    };
    if floor.is_none() && table_of == chart.source {
        return if chart.source == Source::Raw {
            format!("({read})")
        } else {
            format!(
                "SELECT ts, tags, host, {} FROM ({read})",
                rollup_columns(chart.kind, false)
            )
        };
    }
    let ts = floor.map_or("ts".to_string(), |f| format!("{f}(ts)"));
    format!(
        "SELECT {ts} AS ts, tags, host, {} FROM ({read})",
        rollup_columns(chart.kind, table_of == Source::Raw)
    )
}

/// The columns a chart reads from a rollup, from raw rows if `raw`.
fn rollup_columns(kind: Kind, raw: bool) -> &'static str {
    match (kind, raw) {
        (Kind::Counter, _) => "value, samples",
        (Kind::Gauge, false) => "last, last_version, min, max",
        (Kind::Gauge, true) => "value AS last, version AS last_version, value AS min, value AS max",
        (Kind::Timer, _) => "count, min, max, bucket_values, bucket_counts",
        (Kind::Set, _) => "member_hashes",
    }
}

/// The per-period statement: `ts_expr` first, then `label AS grp` if
/// given, then the type's values.
fn select(chart: &Chart<'_>, ts_expr: &str, label: Option<&str>) -> String {
    let (kind, from, to) = (chart.kind, chart.from, chart.to);
    let raw = chart.source == Source::Raw;
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
    let first = ts_expr.rsplit(' ').next().unwrap_or(ts_expr);
    let (grp, by) = match label {
        Some(l) => (format!(", {l} AS grp"), format!("{first}, grp")),
        None => (String::new(), first.to_string()),
    };
    let select = format!(
        "SELECT {ts_expr}{grp}, {values}{timer}\nFROM {}\nWHERE ts >= toDateTime({from}) AND ts < toDateTime({to})\nGROUP BY {by} ORDER BY {by}",
        rows(chart)
    );
    if kind == Kind::Timer {
        let g = if label.is_some() { "grp, " } else { "" };
        format!(
            "SELECT {first}, {g}r_count AS count, p50, p90, p99, r_max AS max FROM (\n{select}\n)"
        )
    } else {
        select
    }
}

/// The SQL of the newest `limit` DogStatsD events over `[from, to)` (by
/// their interval), newest first: `t` (Unix seconds), `title`, `text`,
/// `alert_type`, `host`, `tags`.
pub fn events(database: &str, from: u32, to: u32, limit: u32) -> String {
    format!(
        "SELECT toUInt32(ts) AS t, title, text, alert_type, host, tags\nFROM (SELECT * FROM {}.events FINAL WHERE ts >= toDateTime({from}) AND ts < toDateTime({to}))\nORDER BY t DESC, seq DESC LIMIT {limit}",
        quote_ident(database)
    )
}

/// A ClickHouse string literal (a backslash and a quote escaped: every
/// other byte stands for itself in a quoted string).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn series(
        database: &str,
        kind: Kind,
        name: &str,
        tags: &[String],
        from: u32,
        to: u32,
        source: Source,
        now: u32,
    ) -> String {
        super::series(&Chart {
            database,
            kind,
            name,
            tags,
            host: None,
            from,
            to,
            source,
            settled: now,
        })
    }

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
        let now = 100_000;
        let s = series(
            "m",
            Kind::Counter,
            "a'b",
            &["env:prod".into()],
            120,
            600,
            Source::Raw,
            now,
        );
        assert!(s.contains("FROM (SELECT * FROM `m`.counters FINAL WHERE toStartOfMinute(ts) >= toStartOfMinute(toDateTime(120)) AND toStartOfMinute(ts) < toDateTime(600) AND name = 'a\\'b' AND has(tags, 'env:prod') AND ts >= toDateTime(120) AND ts < toDateTime(600))"), "{s}");
        let s = series(
            "m",
            Kind::Timer,
            "t",
            &[],
            3600,
            7200,
            Source::Rollup(Resolution::Minute),
            now,
        );
        assert!(
            s.contains(
                "`m`.timers_1m FINAL WHERE toStartOfHour(ts) >= toStartOfHour(toDateTime(3600))"
            ),
            "{s}"
        );
        assert!(
            !s.contains("UNION ALL"),
            "a range long over: rollups only: {s}"
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
            now,
        );
        assert!(
            s.contains("`m`.sets_1h FINAL WHERE name = 'u' AND ts >= toDateTime(0)"),
            "{s}"
        );
    }

    #[test]
    fn a_rollup_read_up_to_now_takes_its_tail_from_finer_rows() {
        // 10:30:50 with no rollup lag: hours before the server's 10:00 from
        // the hour rollup, minutes before 10:28 from the minute rollup, the
        // rest raw.
        let day = 1_800_028_800; // a midnight (UTC)
        let now = day + 10 * 3600 + 30 * 60 + 50;
        let hour_cut = format!("toStartOfHour(toDateTime({}))", now - 300);
        assert_eq!(cuts(now), (hour_cut.clone(), day + 10 * 3600 + 28 * 60));
        let s = series(
            "m",
            Kind::Gauge,
            "g",
            &[],
            day,
            now,
            Source::Rollup(Resolution::Hour),
            now,
        );
        let parts: Vec<&str> = s.split("UNION ALL").collect();
        assert_eq!(parts.len(), 3, "{s}");
        assert!(parts[0].contains("SELECT ts, tags, host, last, last_version, min, max FROM (SELECT * FROM `m`.gauges_1h FINAL"), "{s}");
        // The hour cut is the server's hour (a half-hour time zone too).
        let hour = format!("greatest(toDateTime({day}), least({hour_cut}, toDateTime({now})))");
        assert!(parts[0].contains(&format!("ts < {hour}")), "{s}");
        assert!(parts[1].contains("SELECT toStartOfHour(ts) AS ts, tags, host, last, last_version, min, max FROM (SELECT * FROM `m`.gauges_1m FINAL"), "{s}");
        assert!(parts[1].contains(&format!("ts >= {hour}")), "{s}");
        assert!(parts[2].contains("SELECT toStartOfHour(ts) AS ts, tags, host, value AS last, version AS last_version, value AS min, value AS max FROM (SELECT * FROM `m`.gauges FINAL"), "{s}");
        let minute = format!(
            "greatest({hour}, least(toDateTime({}), toDateTime({now})))",
            day + 36_000 + 28 * 60
        );
        assert!(parts[2].contains(&format!("ts >= {minute}")), "{s}");
        // A rollup lag moves the cuts back by as much.
        assert_eq!(cuts(now - 3600).1, day + 9 * 3600 + 28 * 60);
    }
}
