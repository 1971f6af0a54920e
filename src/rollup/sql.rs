//! The rollup tables and the statements that fill them, as text: no I/O.
//!
//! Every rollup table is a `ReplacingMergeTree(version)` keyed by series,
//! `ts` (the minute or hour) and `writer` (the instance tag of the rows it
//! was computed from), so that a recomputed rollup *replaces* the row it
//! recomputes (under `FINAL`, or once merged), and the rows of two writers
//! (two aggregators that each took part of a host's keys) sit side by
//! side, to be summed like raw rows of two flushes.
//!
//! Each holds mergeable state, so that an hour computed from minutes is
//! what it would be from the raw rows:
//! - counters: `value` (the sum) and `samples`;
//! - gauges: `last` with `last_version` (the raw row of highest `version`
//!   wins, as in the raw table), `min`, `max`, `sum` and `count` of the raw
//!   rows' values (a mean is `sum / count`), and `samples`;
//! - timers: weighted `count`, `sum`, `min`, `max`, `samples`, the DDSketch
//!   buckets merged (`sumMap` of values and weights), and `p50` … `p99`
//!   read from the merged buckets by the rule tallyd uses for a flushed
//!   key ([`crate::aggregate::sketch::quantile`]: the value of the first
//!   bucket whose cumulative weight reaches q × the total, clamped to
//!   `min` and `max`), so within the sketch's 1 % of the exact quantile;
//! - sets: `member_hashes` (the union) and `cardinality`, its length.
//!
//! Events and service checks are not rolled up; retention keeps them with
//! the raw rows.

use crate::sink::schema::{column_type, distributed_copy, quote_ident, replicated};

/// A rollup's resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    /// Seconds it covers.
    pub fn secs(self) -> u32 {
        match self {
            Resolution::Minute => 60,
            Resolution::Hour => 3600,
        }
    }

    /// Its name in `tallyd_rollups.resolution` and in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::Minute => "minute",
            Resolution::Hour => "hour",
        }
    }

    /// The suffix of its tables' names.
    pub fn suffix(self) -> &'static str {
        match self {
            Resolution::Minute => "_1m",
            Resolution::Hour => "_1h",
        }
    }

    /// The start of the period `ts` falls in.
    pub fn start(self, ts: u32) -> u32 {
        ts - ts % self.secs()
    }

    fn floor(self) -> &'static str {
        match self {
            Resolution::Minute => "toStartOfMinute",
            Resolution::Hour => "toStartOfHour",
        }
    }
}

/// The raw tables that are rolled up, by their index in
/// [`crate::telemetry::TABLES`] (events and service checks are not).
pub const ROLLED: [&str; 4] = ["counters", "gauges", "timers", "sets"];

/// The table of finished rollups: one row per (writer, resolution, ts)
/// computed, with the number (from the confirming tallyd's flush id
/// sequence) drawn when its computation started.
pub const RUNS: &str = "tallyd_rollups";

/// Columns of each rollup table after `ts, name, tags`: (name, type).
const VALUE_COLUMNS: [&[(&str, &str)]; 4] = [
    &[("value", "Float64"), ("samples", "UInt64")],
    &[
        ("last", "Float64"),
        ("last_version", "UInt64"),
        ("min", "Float64"),
        ("max", "Float64"),
        ("sum", "Float64"),
        ("count", "UInt64"),
        ("samples", "UInt64"),
    ],
    &[
        ("count", "Float64"),
        ("sum", "Float64"),
        ("min", "Float64"),
        ("max", "Float64"),
        ("p50", "Float64"),
        ("p90", "Float64"),
        ("p95", "Float64"),
        ("p99", "Float64"),
        ("samples", "UInt64"),
        ("bucket_values", "Array(Float64)"),
        ("bucket_counts", "Array(Float64)"),
    ],
    &[
        ("cardinality", "UInt64"),
        ("samples", "UInt64"),
        ("member_hashes", "Array(UInt64)"),
    ],
];

/// The name of table `table`'s rollup at `res`: `counters_1m`, ….
pub fn table(table: usize, res: Resolution) -> String {
    format!("{}{}", ROLLED[table], res.suffix())
}

/// Every column of table `table`'s rollups, in insert order.
pub fn columns(table: usize) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("ts", "DateTime"),
        ("name", "String"),
        ("tags", "Array(String)"),
    ];
    if table == 2 {
        out.push(("kind", "String"));
    }
    out.extend([
        ("host", "String"),
        ("writer", "UInt32"),
        ("version", "UInt64"),
    ]);
    out.extend(VALUE_COLUMNS[table].iter().copied());
    out
}

/// The engine of table `table`'s rollup at `res`. Minutes are partitioned
/// by day and sorted by hour and host first (an hour's rollup reads one
/// writer's hour back); hours by month and sorted by series (what a
/// long-range chart reads).
fn engine(table: usize, res: Resolution) -> String {
    let kind = if table == 2 { "kind, " } else { "" };
    match res {
        Resolution::Minute => format!(
            "ReplacingMergeTree(version)\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfHour(ts), host, name, tags, {kind}ts, writer)"
        ),
        Resolution::Hour => format!(
            "ReplacingMergeTree(version)\nPARTITION BY toYYYYMM(ts)\nORDER BY (name, tags, {kind}host, ts, writer)"
        ),
    }
}

const RUNS_ENGINE: &str =
    "ReplacingMergeTree(started)\nPARTITION BY toYYYYMM(ts)\nORDER BY (writer, resolution, ts)";

/// (name, type) of each column.
type Columns = Vec<(&'static str, &'static str)>;

/// The statements that create the rollup tables and [`RUNS`] in
/// `database` (which exists). With a cluster, as [`crate::sink::schema::ddl`]:
/// replicated, `ON CLUSTER`, with `Distributed` `<table>_all` copies.
/// With `low_cardinality` (20.1+), `name`, `host`, `kind` and the tags
/// are `LowCardinality`.
pub fn ddl(database: &str, cluster: Option<&str>, low_cardinality: bool) -> Vec<String> {
    let db = quote_ident(database);
    let on = cluster.map_or(String::new(), |c| format!(" ON CLUSTER {}", quote_ident(c)));
    let mut tables: Vec<(String, Columns, String)> = Vec::new();
    for res in Resolution::ALL {
        for t in 0..ROLLED.len() {
            tables.push((table(t, res), columns(t), engine(t, res)));
        }
    }
    tables.push((
        RUNS.to_string(),
        vec![
            ("confirmer", "UInt32"),
            ("writer", "UInt32"),
            ("resolution", "String"),
            ("ts", "DateTime"),
            ("started", "UInt64"),
            ("computed_at", "DateTime"),
        ],
        RUNS_ENGINE.to_string(),
    ));
    let mut out = Vec::new();
    for (name, cols, engine) in tables {
        let cols: Vec<String> = cols
            .iter()
            .map(|(n, t)| format!("    {n} {}", column_type(n, t, low_cardinality)))
            .collect();
        let engine = match cluster {
            None => engine,
            Some(_) => replicated(&engine, database, &name),
        };
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{name}{on} (\n{}\n) ENGINE = {engine}",
            cols.join(",\n")
        ));
        if let Some(c) = cluster {
            out.push(distributed_copy(database, &name, c));
        }
    }
    out
}

/// The low 20 bits of a flush id: its writer (see [`crate::outbox::flush::tag`]).
const TAG_MASK: u32 = (1 << crate::outbox::flush::TAG_BITS) - 1;

/// The statement that computes table `table`'s rollup at `res` for the
/// period starting at `start` (Unix seconds) from writer `writer`'s rows
/// (minutes from the raw table, hours from the minutes), as rows of
/// version `version`. Re-running it replaces what it wrote.
pub fn rollup(
    database: &str,
    table: usize,
    res: Resolution,
    start: u32,
    writer: u32,
    version: u64,
) -> String {
    let db = quote_ident(database);
    let (source, mine) = match res {
        Resolution::Minute => {
            let id = if table == 1 { "version" } else { "flush_id" };
            (
                ROLLED[table].to_string(),
                format!("bitAnd({id}, {TAG_MASK}) = {writer}"),
            )
        }
        Resolution::Hour => (
            self::table(table, Resolution::Minute),
            format!("writer = {writer}"),
        ),
    };
    let floor = res.floor();
    let kind = if table == 2 { "kind, " } else { "" };
    let names: Vec<&str> = columns(table).iter().map(|(n, _)| *n).collect();
    let ts = if table == 2 {
        "r_ts".to_string()
    } else {
        format!("{floor}(ts) AS r_ts")
    };
    let head = format!(
        "INSERT INTO {db}.{} ({})\nSELECT {ts}, name, tags, {kind}host, toUInt32({writer}), toUInt64({version}), ",
        self::table(table, res),
        names.join(", ")
    );
    // The period is named by the source's sorting key expression (its
    // minute for raw rows, its hour for minutes): 18.16 uses the primary
    // index only for a condition on the key expression itself, not on
    // `ts`. The rows are read in a subquery: 18.16 refuses a `FINAL`
    // query that also selects an expression of its sorting key ("Column
    // 'toStartOfMinute(ts)' already exists").
    let rows = format!(
        "FROM (SELECT * FROM {db}.{source} FINAL WHERE {floor}(ts) = toDateTime({start}) AND {mine})\nGROUP BY r_ts, name, tags, {kind}host"
    );
    let minute = res == Resolution::Minute;
    match table {
        0 => format!("{head}sum(value), sum(samples)\n{rows}"),
        1 if minute => format!(
            "{head}argMax(value, version), max(version), min(value), max(value), sum(value), count(), sum(samples)\n{rows}"
        ),
        1 => format!(
            "{head}argMax(last, last_version), max(last_version), min(min), max(max), sum(sum), sum(count), sum(samples)\n{rows}"
        ),
        2 => {
            let q = quantile;
            format!(
                "{head}r_count, r_sum, r_min, r_max, {}, {}, {}, {}, r_samples, r_values, r_weights\nFROM (\n    SELECT {floor}(ts) AS r_ts, name, tags, kind, host, sum(count) AS r_count, sum(sum) AS r_sum, min(min) AS r_min, max(max) AS r_max, sum(samples) AS r_samples, sumMap(bucket_values, bucket_counts) AS r_buckets, tupleElement(r_buckets, 1) AS r_values, tupleElement(r_buckets, 2) AS r_weights\n    {rows}\n)",
                q("0.5"),
                q("0.9"),
                q("0.95"),
                q("0.99"),
            )
        }
        _ => format!(
            "{head}length(r_members), sum(samples), groupUniqArrayArray(member_hashes) AS r_members\n{rows}"
        ),
    }
}

/// The `q`-quantile (`"0.99"`) of merged buckets `r_values`, `r_weights`
/// (ascending, as `sumMap` gives them), clamped to `r_min` and `r_max`:
/// the value of the first bucket whose cumulative weight reaches q × the
/// total, as [`crate::aggregate::sketch::quantile`] reads a flushed key.
pub fn quantile(q: &str) -> String {
    let idx = format!(
        "arrayFirstIndex((c, w) -> c >= {q} * arraySum(r_weights) AND w > 0, arrayCumSum(r_weights), r_weights)"
    );
    format!(
        "greatest(least(if({idx} = 0, arrayElement(r_values, -1), arrayElement(r_values, {idx})), r_max), r_min)"
    )
}

/// The statement that records a finished rollup.
pub fn record_run(
    database: &str,
    confirmer: u32,
    writer: u32,
    res: Resolution,
    start: u32,
    started: u64,
) -> String {
    format!(
        "INSERT INTO {}.{RUNS} (confirmer, writer, resolution, ts, started, computed_at) VALUES ({confirmer}, {writer}, '{}', {start}, {started}, now())",
        quote_ident(database),
        res.name()
    )
}

/// Minutes whose raw rows changed: for each (writer, minute) of the
/// flushes `confirmer` confirmed with `confirmed > since`, the newest
/// `confirmed`. Rows: `writer UInt32, minute UInt32, confirmed UInt64`.
pub fn changed_minutes(database: &str, confirmer: u32, since: u64) -> String {
    format!(
        "SELECT writer, toUInt32(toStartOfMinute(t)) AS minute, max(confirmed) AS newest FROM {}.{} ARRAY JOIN intervals AS t WHERE confirmer = {confirmer} AND confirmed > {since} GROUP BY writer, minute",
        quote_ident(database),
        crate::sink::flushes::TABLE
    )
}

/// Hours whose minutes were recomputed: for each (writer, hour) of the
/// minute rollups `confirmer` finished with `started > since`, the newest
/// `started`. Rows as [`changed_minutes`].
pub fn changed_hours(database: &str, confirmer: u32, since: u64) -> String {
    format!(
        "SELECT writer, toUInt32(toStartOfHour(ts)) AS hour, max(started) AS newest FROM {}.{RUNS} WHERE confirmer = {confirmer} AND resolution = 'minute' AND started > {since} GROUP BY writer, hour",
        quote_ident(database)
    )
}

/// The newest rollup at `res` that `confirmer` finished, of each (writer,
/// period) for `writers` between `from` and `to` (inclusive): its own
/// runs only, whose numbers come from the same sequence as its
/// confirmations. Rows as [`changed_minutes`].
pub fn finished(
    database: &str,
    confirmer: u32,
    res: Resolution,
    writers: &[u32],
    from: u32,
    to: u32,
) -> String {
    let writers: Vec<String> = writers.iter().map(u32::to_string).collect();
    format!(
        "SELECT writer, toUInt32(ts) AS period, max(started) AS newest FROM {}.{RUNS} WHERE confirmer = {confirmer} AND resolution = '{}' AND writer IN ({}) AND ts >= toDateTime({from}) AND ts <= toDateTime({to}) GROUP BY writer, period",
        quote_ident(database),
        res.name(),
        writers.join(", ")
    )
}

#[cfg(test)]
mod tests;
