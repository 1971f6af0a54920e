//! The ClickHouse schema tallyd writes to (the DDL `tallyd schema` prints).
//!
//! Every table is a `ReplacingMergeTree` whose sorting key holds the flush
//! identity (`host`, `flush_id`, or `version` for gauges) next to the series
//! key. A flush that is sent twice therefore collapses into one row per key
//! under `FINAL` (or after a merge), on every ClickHouse version from 18.16.
//! The DDL uses nothing newer than 18.16 has (no Map, CODEC, TTL,
//! DateTime64), except `LowCardinality` strings on servers from 20.1.

/// The version of the schema below, recorded in `<database>.tallyd_schema`
/// when tallyd makes or migrates the tables: 1 had `UInt64` timer counts
/// and no events tables; 2 has `Float64` timer counts and the `events` and
/// `service_checks` tables; 3 has raw tables partitioned by day and sorted
/// by minute and host first (see [`ENGINES`]), the `flushes` table
/// ([`crate::sink::flushes`]) and the rollup tables ([`crate::rollup`]).
pub const SCHEMA_VERSION: u32 = 3;

/// The table that records [`SCHEMA_VERSION`]: one row per version a
/// tallyd made or migrated the tables to.
pub fn version_table_ddl(database: &str, cluster: Option<&str>) -> [String; 2] {
    let db = quote_ident(database);
    let on = cluster.map_or(String::new(), |c| format!(" ON CLUSTER {}", quote_ident(c)));
    let engine = match cluster {
        None => "ReplacingMergeTree()".to_string(),
        Some(_) => format!(
            "ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{}/tallyd_schema', '{{replica}}')",
            database.replace('\\', "\\\\").replace('\'', "\\'")
        ),
    };
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.tallyd_schema{on} (version UInt32, tallyd String, applied DateTime) ENGINE = {engine} ORDER BY version"
        ),
        format!(
            "INSERT INTO {db}.tallyd_schema VALUES ({SCHEMA_VERSION}, '{}', now())",
            env!("CARGO_PKG_VERSION")
        ),
    ]
}

/// The columns tallyd writes, per table in [`crate::telemetry::TABLES`]
/// order: (name, type). Inserts name them, so a table may have more
/// columns (with defaults) and any column order.
pub const COLUMNS: [&[(&str, &str)]; 6] = [
    &[
        ("ts", "DateTime"),
        ("name", "String"),
        ("tags", "Array(String)"),
        ("host", "String"),
        ("flush_id", "UInt64"),
        ("value", "Float64"),
        ("samples", "UInt64"),
    ],
    &[
        ("ts", "DateTime"),
        ("name", "String"),
        ("tags", "Array(String)"),
        ("host", "String"),
        ("value", "Float64"),
        ("version", "UInt64"),
        ("samples", "UInt64"),
    ],
    &[
        ("ts", "DateTime"),
        ("name", "String"),
        ("tags", "Array(String)"),
        ("host", "String"),
        ("flush_id", "UInt64"),
        ("kind", "String"),
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
        ("ts", "DateTime"),
        ("name", "String"),
        ("tags", "Array(String)"),
        ("host", "String"),
        ("flush_id", "UInt64"),
        ("cardinality", "UInt64"),
        ("samples", "UInt64"),
        ("member_hashes", "Array(UInt64)"),
    ],
    &[
        ("ts", "DateTime"),
        ("host", "String"),
        ("flush_id", "UInt64"),
        ("seq", "UInt32"),
        ("event_ts", "DateTime"),
        ("title", "String"),
        ("text", "String"),
        ("hostname", "String"),
        ("aggregation_key", "String"),
        ("priority", "String"),
        ("source_type", "String"),
        ("alert_type", "String"),
        ("tags", "Array(String)"),
    ],
    &[
        ("ts", "DateTime"),
        ("host", "String"),
        ("flush_id", "UInt64"),
        ("seq", "UInt32"),
        ("check_ts", "DateTime"),
        ("name", "String"),
        ("status", "UInt8"),
        ("hostname", "String"),
        ("tags", "Array(String)"),
        ("message", "String"),
    ],
];

/// Engine and keys of each table. Raw rows are partitioned by day, so
/// that retention drops whole days ([`crate::rollup::retention`]), and
/// sorted by minute, then host, then series: a minute of one host's rows
/// (what a rollup reads back) is one range of the primary index, and a
/// series over a short range is a few index lookups per minute. Tables of
/// schema version 2 and earlier (monthly partitions, sorted by series)
/// are moved aside at start ([`legacy_statement`]).
const ENGINES: [&str; 6] = [
    "ReplacingMergeTree()\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfMinute(ts), host, name, tags, ts, flush_id)",
    "ReplacingMergeTree(version)\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfMinute(ts), host, name, tags, ts, version)",
    "ReplacingMergeTree()\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfMinute(ts), host, name, tags, kind, ts, flush_id)",
    "ReplacingMergeTree()\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfMinute(ts), host, name, tags, ts, flush_id)",
    "ReplacingMergeTree()\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (ts, host, flush_id, seq)",
    "ReplacingMergeTree()\nPARTITION BY toYYYYMMDD(ts)\nORDER BY (ts, host, flush_id, seq)",
];

/// The first element of every raw table's sorting key in this layout;
/// a table whose `sorting_key` (`system.tables`) starts otherwise was
/// made by an earlier release.
const LAYOUT_MARK: [&str; 6] = [
    "toStartOfMinute(ts)",
    "toStartOfMinute(ts)",
    "toStartOfMinute(ts)",
    "toStartOfMinute(ts)",
    "ts, host",
    "ts, host",
];

/// The suffix a raw table of an earlier layout is renamed with.
pub const LEGACY_SUFFIX: &str = "_legacy";

/// Whether table `table`'s `partition_key` and `sorting_key` (from
/// `system.tables`) are this release's layout.
pub fn current_layout(table: usize, partition_key: &str, sorting_key: &str) -> bool {
    partition_key == "toYYYYMMDD(ts)" && sorting_key.starts_with(LAYOUT_MARK[table])
}

/// The statement that moves raw table `table` of an earlier layout aside
/// to `to` (an atomic rename; with a cluster, on every server).
pub fn legacy_statement(database: &str, table: &str, to: &str, cluster: Option<&str>) -> String {
    let db = quote_ident(database);
    let on = cluster.map_or(String::new(), |c| format!(" ON CLUSTER {}", quote_ident(c)));
    format!(
        "RENAME TABLE {db}.{} TO {db}.{}{on}",
        quote_ident(table),
        quote_ident(to)
    )
}

/// The replicated engine for `engine` (`ReplacingMergeTree()` or
/// `ReplacingMergeTree(<version>)`) of table `table` at
/// `/clickhouse/tables/{shard}/<database>/<path_name>` with replica
/// `{replica}` (the servers' macros).
pub fn replicated(engine: &str, database: &str, path_name: &str) -> String {
    let path = format!(
        "'/clickhouse/tables/{{shard}}/{}/{path_name}', '{{replica}}'",
        database.replace('\\', "\\\\").replace('\'', "\\'")
    );
    match engine.find("ReplacingMergeTree(") {
        Some(at) => {
            let args_at = at + "ReplacingMergeTree(".len();
            let sep = if engine[args_at..].starts_with(')') {
                ""
            } else {
                ", "
            };
            format!(
                "{}ReplicatedReplacingMergeTree({path}{sep}{}",
                &engine[..at],
                &engine[args_at..]
            )
        }
        None => engine.to_string(),
    }
}

/// The statements that create the database and tables, in order. With
/// `dedup_window` (servers that have it, 22.2 and later: the
/// `clickhouse.dedup_window` inserts each table remembers), each table
/// also drops a re-sent insert with a known `insert_deduplication_token`.
///
/// With a `cluster` (a name in the servers' `remote_servers`), every
/// statement runs `ON CLUSTER`, the tables are
/// `ReplicatedReplacingMergeTree` at `/clickhouse/tables/{shard}/<database>/<table>`
/// with replica `{replica}` (the servers' macros), and each table gets a
/// `Distributed` table `<table>_all` over the cluster, for reads. Replicated
/// tables drop a re-sent identical block by its hash on every version (the
/// token too from 22.2), whichever replica gets it.
pub fn ddl(
    database: &str,
    dedup_window: Option<u64>,
    cluster: Option<&str>,
    low_cardinality: bool,
) -> Vec<String> {
    let db = quote_ident(database);
    let on = cluster.map_or(String::new(), |c| format!(" ON CLUSTER {}", quote_ident(c)));
    let mut statements = vec![format!("CREATE DATABASE IF NOT EXISTS {db}{on}")];
    for (i, table) in crate::telemetry::TABLES.iter().enumerate() {
        let columns: Vec<String> = COLUMNS[i]
            .iter()
            .map(|(name, ty)| format!("    {name} {}", column_type(name, ty, low_cardinality)))
            .collect();
        // Tables of this layout replicate under a path of their own: the
        // earlier layout's, renamed aside, keeps its path.
        let engine = match cluster {
            None => ENGINES[i].to_string(),
            Some(_) => replicated(ENGINES[i], database, &format!("{table}_v3")),
        };
        let mut create = format!(
            "CREATE TABLE IF NOT EXISTS {db}.{table}{on} (\n{}\n) ENGINE = {engine}",
            columns.join(",\n"),
        );
        if let (Some(window), None) = (dedup_window, cluster) {
            create.push_str(&format!(
                "\nSETTINGS non_replicated_deduplication_window = {window}"
            ));
        }
        statements.push(create);
        if let Some(c) = cluster {
            statements.push(distributed_copy(database, table, c));
        }
    }
    statements
}

/// The `Distributed` copy `<table>_all` of table `table` over `cluster`,
/// for reads.
pub fn distributed_copy(database: &str, table: &str, cluster: &str) -> String {
    let db = quote_ident(database);
    let c = quote_ident(cluster);
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{table}_all ON CLUSTER {c} AS {db}.{table}\nENGINE = Distributed({c}, {db}, {table})"
    )
}

/// The type a new table's column gets: with `low_cardinality` (servers
/// from 20.1), the repetitive strings (`name`, `host`, `kind`, the tags)
/// are `LowCardinality`, which took a third off the bytes on disk per row
/// in `scripts/schema_size.py` (RowBinary writes them alike).
pub fn column_type(name: &str, ty: &str, low_cardinality: bool) -> String {
    match (low_cardinality, name, ty) {
        (true, "name" | "host" | "kind", "String") => "LowCardinality(String)".into(),
        (true, "tags", "Array(String)") => "Array(LowCardinality(String))".into(),
        _ => ty.into(),
    }
}

/// Whether a server of `version` has `LowCardinality` (20.1 and later
/// for tallyd; it came in 19.x).
pub fn has_low_cardinality(version: &str) -> bool {
    at_least(version, 20, 1)
}

/// The column list of an insert into table `table`: `(ts, name, ...)`.
pub fn insert_columns(table: usize) -> String {
    let names: Vec<&str> = COLUMNS[table].iter().map(|(n, _)| *n).collect();
    format!("({})", names.join(", "))
}

/// What an existing table needs before tallyd writes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// It has every column, of the type tallyd writes.
    Ready,
    /// `ALTER TABLE` statements that make it so without losing data:
    /// missing columns added, counts of the previous release widened to
    /// `Float64`.
    Migrate(Vec<String>),
    /// A column tallyd cannot fix: the reason, naming the column, the type
    /// found and the type needed, and the statement an operator may run.
    Refuse(String),
}

/// Compares table `table`'s columns as ClickHouse lists them (`name`,
/// `type`, from `system.columns`) with [`COLUMNS`]. `LowCardinality(T)` is
/// taken as `T` (RowBinary encodes both alike). A table without columns is
/// missing: [`Plan::Ready`] (it is created, or the insert fails as missing).
pub fn plan(database: &str, table: usize, existing: &[(String, String)]) -> Plan {
    plan_for(database, table, "", existing)
}

/// [`plan`] for table `table`'s `Distributed` table `<table>_all` over the
/// cluster ([`ddl`]), from its columns on one server, to run on that
/// server: ClickHouse does not replicate a `Distributed` table's columns,
/// and 18.16 refuses an `ON CLUSTER` ALTER of one on a cluster whose shards
/// replicate internally (`Code: 371`).
pub fn plan_distributed(database: &str, table: usize, existing: &[(String, String)]) -> Plan {
    plan_for(database, table, "_all", existing)
}

/// [`plan`] for table `<table><suffix>`.
fn plan_for(database: &str, table: usize, suffix: &str, existing: &[(String, String)]) -> Plan {
    if existing.is_empty() {
        return Plan::Ready;
    }
    let target = format!(
        "{}.{}{suffix}",
        quote_ident(database),
        crate::telemetry::TABLES[table]
    );
    let mut alters = Vec::new();
    for (name, ty) in COLUMNS[table] {
        let found = existing
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| normalize(t));
        match found.as_deref() {
            Some(t) if t == *ty => {}
            None => alters.push(format!("ALTER TABLE {target} ADD COLUMN {name} {ty}")),
            Some(t) if widened(t, ty) => {
                alters.push(format!("ALTER TABLE {target} MODIFY COLUMN {name} {ty}"))
            }
            Some(t) => {
                return Plan::Refuse(format!(
                    "column {name} of {target} is {t}; tallyd writes {ty} (to convert it: ALTER TABLE {target} MODIFY COLUMN {name} {ty})"
                ));
            }
        }
    }
    if alters.is_empty() {
        Plan::Ready
    } else {
        Plan::Migrate(alters)
    }
}

/// A column type as RowBinary sees it: `LowCardinality(T)` is `T` at any
/// depth (`Array(LowCardinality(String))`), and `DateTime('tz')` is
/// `DateTime` (the time zone only changes how it is shown).
fn normalize(ty: &str) -> String {
    let mut t = ty.trim().to_string();
    while let Some(at) = t.find("LowCardinality(") {
        let inner = at + "LowCardinality(".len();
        let mut depth = 1;
        let Some(close) = t[inner..].char_indices().find_map(|(i, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            (depth == 0).then_some(inner + i)
        }) else {
            break;
        };
        t = format!("{}{}{}", &t[..at], &t[inner..close], &t[close + 1..]);
    }
    if t.starts_with("DateTime('") && t.ends_with("')") {
        t = "DateTime".into();
    }
    t
}

/// Whether a column of type `from` (written by an earlier release) converts
/// to `to` without loss: the timer counts, once whole numbers.
fn widened(from: &str, to: &str) -> bool {
    matches!(
        (from, to),
        ("UInt64", "Float64") | ("Array(UInt64)", "Array(Float64)")
    )
}

/// Whether a `SELECT version()` answer is 22.2 or later: the first version
/// with `insert_deduplication_token` (unknown settings fail every request
/// on older servers, so it is sent only to these).
pub fn has_dedup_token(version: &str) -> bool {
    at_least(version, 22, 2)
}

/// Whether a `SELECT version()` answer (`22.8.4.7`) is `major.minor` or
/// later; an answer that does not parse is older than any.
fn at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// Whether a server of `version` knows `async_insert` (21.11 and later):
/// tallyd pins it to 0 there, so that a profile turning asynchronous
/// inserts on (with `wait_for_async_insert = 0`) cannot make ClickHouse
/// answer OK before the rows are stored.
pub fn has_async_insert(version: &str) -> bool {
    at_least(version, 21, 11)
}

/// The statement that gives a table of an older server (or made before
/// the upgrade) the deduplication window the token needs, when its
/// `engine_full` lacks it.
pub fn dedup_window_statement(
    database: &str,
    table: &str,
    engine_full: &str,
    window: u64,
) -> Option<String> {
    (!engine_full.contains("non_replicated_deduplication_window")).then(|| {
        format!(
            "ALTER TABLE {}.{table} MODIFY SETTING non_replicated_deduplication_window = {window}",
            quote_ident(database)
        )
    })
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
        let ddl = ddl("metrics", None, None, false);
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
        assert!(
            ddl("m", Some(1000), None, true)[1]
                .ends_with("SETTINGS non_replicated_deduplication_window = 1000")
        );
        assert!(!ddl("m", None, None, false)[1].contains("SETTINGS"));
        assert!(!ddl("m", None, None, false)[1].contains("LowCardinality"));
        assert!(ddl("m", None, None, true)[1].contains("    name LowCardinality(String),\n"));
        assert!(
            ddl("m", None, None, true)[1].contains("    tags Array(LowCardinality(String)),\n")
        );
        assert!(ddl("m", None, None, true)[1].contains(
            "PARTITION BY toYYYYMMDD(ts)\nORDER BY (toStartOfMinute(ts), host, name, tags, ts, flush_id)"
        ));
        assert!(!has_low_cardinality("18.16.1") && has_low_cardinality("20.3.1"));
        assert!(!has_dedup_token("18.16.1"));
        assert!(!has_dedup_token("22.1.3.7"));
        assert!(has_dedup_token("22.2.2.1"));
        assert!(has_dedup_token("24.8.4.13"));
        assert!(!has_dedup_token("garbage"));
        assert!(!has_async_insert("18.16.1"));
        assert!(has_async_insert("21.11.2"));
        assert!(has_async_insert("26.9.2.1"));
        assert_eq!(
            dedup_window_statement("m", "counters", "ReplacingMergeTree ORDER BY x", 1000),
            Some("ALTER TABLE `m`.counters MODIFY SETTING non_replicated_deduplication_window = 1000".into())
        );
        assert_eq!(
            dedup_window_statement(
                "m",
                "counters",
                "... SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
                1000
            ),
            None
        );
    }

    fn columns(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect()
    }

    #[test]
    fn a_table_of_today_is_ready_whatever_its_order_and_extra_columns() {
        let mut cols = columns(COLUMNS[2]);
        cols.reverse();
        cols.push(("note".into(), "String".into()));
        assert_eq!(plan("m", 2, &cols), Plan::Ready);
        let mut low = columns(COLUMNS[0]);
        low[1].1 = "LowCardinality(String)".into();
        assert_eq!(plan("m", 0, &low), Plan::Ready);
        assert_eq!(plan("m", 2, &[]), Plan::Ready, "missing: created");
    }

    #[test]
    fn nested_low_cardinality_and_time_zones_are_the_same_for_rowbinary() {
        assert_eq!(normalize("Array(LowCardinality(String))"), "Array(String)");
        assert_eq!(normalize("LowCardinality(String)"), "String");
        assert_eq!(normalize("DateTime('UTC')"), "DateTime");
        assert_eq!(
            normalize("LowCardinality(Nullable(String))"),
            "Nullable(String)"
        );
        assert_eq!(normalize("LowCardinality(String"), "LowCardinality(String");
        let mut cols = columns(COLUMNS[0]);
        cols[0].1 = "DateTime('Europe/Paris')".into();
        cols[2].1 = "Array(LowCardinality(String))".into();
        assert_eq!(plan("m", 0, &cols), Plan::Ready);
    }

    #[test]
    fn timer_counts_of_the_previous_release_are_widened_and_missing_columns_added() {
        let mut cols = columns(COLUMNS[2]);
        for (n, t) in &mut cols {
            if n == "count" {
                *t = "UInt64".into();
            }
            if n == "bucket_counts" {
                *t = "Array(UInt64)".into();
            }
        }
        cols.retain(|(n, _)| n != "p95");
        assert_eq!(
            plan("m", 2, &cols),
            Plan::Migrate(vec![
                "ALTER TABLE `m`.timers MODIFY COLUMN count Float64".into(),
                "ALTER TABLE `m`.timers ADD COLUMN p95 Float64".into(),
                "ALTER TABLE `m`.timers MODIFY COLUMN bucket_counts Array(Float64)".into(),
            ])
        );
    }

    #[test]
    fn an_incompatible_column_is_refused_naming_it_and_the_fix() {
        let mut cols = columns(COLUMNS[0]);
        cols[5].1 = "String".into();
        match plan("m", 0, &cols) {
            Plan::Refuse(why) => assert_eq!(
                why,
                "column value of `m`.counters is String; tallyd writes Float64 (to convert it: ALTER TABLE `m`.counters MODIFY COLUMN value Float64)"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inserts_name_their_columns() {
        assert_eq!(
            insert_columns(1),
            "(ts, name, tags, host, value, version, samples)"
        );
    }

    #[test]
    fn a_cluster_gets_replicated_tables_on_cluster_and_distributed_ones_for_reads() {
        let ddl = ddl("m", Some(1000), Some("c1"), false);
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `m` ON CLUSTER `c1`");
        assert!(ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `m`.counters ON CLUSTER `c1` ("));
        assert!(ddl[1].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/m/counters_v3', '{replica}')"
        ));
        assert!(
            !ddl[1].contains("non_replicated"),
            "not for replicated tables"
        );
        assert_eq!(
            ddl[2],
            "CREATE TABLE IF NOT EXISTS `m`.counters_all ON CLUSTER `c1` AS `m`.counters\nENGINE = Distributed(`c1`, `m`, counters)"
        );
        assert!(ddl[3].contains(
            "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/m/gauges_v3', '{replica}', version)"
        ));
        assert_eq!(ddl.len(), 1 + 2 * crate::telemetry::TABLES.len());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a`b"), "`a\\`b`");
    }
}
