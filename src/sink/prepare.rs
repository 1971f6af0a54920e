//! Making each table ready for inserts: the server's version and what it
//! supports, the schema created or migrated (when `create_schema`
//! allows), each table's columns checked against tallyd's, the
//! deduplication window, and the `Distributed` copies.

use super::*;

impl Sink {
    /// What tallyd would change in the existing tables before writing to
    /// them ([`schema::plan`]; with a cluster, [`schema::plan_distributed`]
    /// for the `Distributed` copies; the deduplication window on 22.2+),
    /// without changing anything: the statements, and a comment for a
    /// column it would refuse.
    pub async fn migration_plan(&self) -> Result<Vec<String>, clickhouse::error::Error> {
        let version = self.server_version().await?;
        let current = self.current();
        let database = &current.config.database;
        let admin = &current.at(self.active()).admin;
        let rows = admin
            .query("SELECT table, name, type FROM system.columns WHERE database = ?")
            .bind(database.as_str())
            .fetch_all::<ColumnRow>()
            .await?;
        let mut out = Vec::new();
        let legacy = earlier_layouts(&current, self.active()).await?;
        for (i, table) in TABLES.iter().enumerate() {
            // Moved aside and made anew: its columns do not matter.
            if let Some(l) = legacy.iter().find(|l| l.table == i) {
                out.push(l.statement.clone());
                continue;
            }
            let columns = columns_of(&rows, table);
            // This server's copy; each server's needs its own ALTERs.
            let distributed = current.config.cluster.as_ref().map(|_| {
                schema::plan_distributed(database, i, &columns_of(&rows, &format!("{table}_all")))
            });
            for plan in std::iter::once(schema::plan(database, i, &columns)).chain(distributed) {
                match plan {
                    schema::Plan::Ready => {}
                    schema::Plan::Migrate(alters) => out.extend(alters),
                    schema::Plan::Refuse(why) => out.push(format!("-- refused: {why}")),
                }
            }
            if schema::has_dedup_token(&version)
                && current.config.cluster.is_none()
                && !columns.is_empty()
            {
                let engines = admin
                    .query("SELECT engine_full FROM system.tables WHERE database = ? AND name = ?")
                    .bind(database.as_str())
                    .bind(*table)
                    .fetch_all::<String>()
                    .await?;
                if let Some(alter) = engines.first().and_then(|e| {
                    schema::dedup_window_statement(database, table, e, current.config.dedup_window)
                }) {
                    out.push(alter);
                }
            }
        }
        Ok(out)
    }

    /// The server's version string (`SELECT version()`).
    pub async fn server_version(&self) -> Result<String, clickhouse::error::Error> {
        let current = self.current();
        current
            .at(self.active())
            .admin
            .query("SELECT version()")
            .fetch_one::<String>()
            .await
    }

    /// Creates the database and tables if they are missing, after moving
    /// raw tables of an earlier layout aside ([`Sink::move_legacy_aside`]).
    pub async fn ensure_schema(&self) -> Result<(), clickhouse::error::Error> {
        let current = self.current();
        let cluster = current.config.cluster.as_deref();
        let database = &current.config.database;
        let window = self.dedup_token.then_some(current.config.dedup_window);
        let low_cardinality = self.low_cardinality;
        let mut statements = schema::ddl(database, window, cluster, low_cardinality).into_iter();
        let admin = &current.at(self.active()).admin;
        if let Some(create_database) = statements.next() {
            admin.query(&create_database).execute().await?;
        }
        self.move_legacy_aside(&current).await?;
        for statement in statements
            .chain(schema::version_table_ddl(database, cluster))
            .chain(super::flushes::ddl(database, cluster))
        {
            admin.query(&statement).execute().await?;
        }
        Ok(())
    }

    /// Renames each raw table of an earlier layout (monthly partitions,
    /// sorted by series: [`schema::current_layout`]) to the first free
    /// `<table>_legacy`, `<table>_legacy_2`, …, so that this release
    /// creates its own in its place. Retention drops the old table's
    /// partitions once every row in them is past `retention.hour`, then
    /// the table once it is empty ([`crate::rollup::retention`]).
    async fn move_legacy_aside(&self, current: &Current) -> Result<(), clickhouse::error::Error> {
        let admin = &current.at(self.active()).admin;
        for legacy in earlier_layouts(current, self.active()).await? {
            admin.query(&legacy.statement).execute().await?;
            self.telemetry
                .rollups
                .tables_moved_aside
                .fetch_add(1, Relaxed);
            tracing::warn!(table = TABLES[legacy.table], moved_to = %legacy.to, "a raw table of an earlier layout was moved aside; tallyd makes its own in its place (the old rows stay readable there until retention.hour drops them)");
        }
        Ok(())
    }

    /// Makes table `table` ready for an insert: its columns checked (and
    /// migrated when allowed), and on 22.2+ its deduplication window.
    pub(super) async fn prepare(&self, table: usize) -> Result<(), Failed> {
        if !self.checked[table].load(Relaxed) {
            self.check_columns(table).await?;
        }
        // Replicated tables (a cluster) deduplicate without that setting.
        // Best effort: without it re-sends collapse under FINAL only, which
        // must not hold the rows back.
        if self.dedup_token
            && self.current().config.cluster.is_none()
            && !self.window_checked[table].load(Relaxed)
            && let Err(e) = self.add_dedup_window(table).await
        {
            tracing::warn!(table = TABLES[table], error = %e, "could not check or add the table's deduplication window; re-sent flushes collapse under FINAL only");
            self.window_checked[table].store(true, Relaxed);
        }
        Ok(())
    }

    /// Checks table `table`'s columns (see the module doc), migrating them
    /// when allowed. One query reads every table's columns and marks those
    /// that are ready, so a flush costs one such query.
    async fn check_columns(&self, table: usize) -> Result<(), Failed> {
        let current = self.current();
        let database = &current.config.database;
        let name = TABLES[table];
        let rows = current
            .at(self.active())
            .admin
            .query("SELECT table, name, type FROM system.columns WHERE database = ?")
            .bind(database.as_str())
            .fetch_all::<ColumnRow>()
            .await
            .map_err(Failed::Insert)?;
        let columns = |t: &str| columns_of(&rows, t);
        let cluster = current.config.cluster.as_deref();
        // With a cluster, each table comes here once, to check every
        // server's `Distributed` copy too.
        for (other, other_name) in TABLES.iter().enumerate() {
            if cluster.is_none()
                && schema::plan(database, other, &columns(other_name)) == schema::Plan::Ready
            {
                self.checked[other].store(true, Relaxed);
            }
        }
        let existing = columns(name);
        match schema::plan(database, table, &existing) {
            schema::Plan::Ready => {}
            schema::Plan::Migrate(alters) if current.config.create_schema => {
                for alter in &alters {
                    current
                        .at(self.active())
                        .admin
                        .query(alter)
                        .execute()
                        .await
                        .map_err(Failed::Insert)?;
                    tracing::info!(table = name, statement = %alter, "migrated the table to tallyd's columns");
                }
                for statement in schema::version_table_ddl(database, cluster) {
                    current
                        .at(self.active())
                        .admin
                        .query(&statement)
                        .execute()
                        .await
                        .map_err(Failed::Insert)?;
                }
            }
            schema::Plan::Migrate(alters) => {
                return Err(Failed::Refused(format!(
                    "{database}.{name} lacks tallyd's columns and clickhouse.create_schema is off, so tallyd does not change it; run: {}",
                    alters.join("; ")
                )));
            }
            schema::Plan::Refuse(why) => return Err(Failed::Refused(why)),
        }
        if cluster.is_some() {
            // Off the flush's path: a replica that is down costs its
            // timeout there, and the copies serve reads only.
            tokio::spawn(migrate_distributed(current, table));
        }
        self.checked[table].store(true, Relaxed);
        Ok(())
    }

    /// A table made before the server was upgraded to 22.2+ (or by hand)
    /// may lack `non_replicated_deduplication_window`, without which the
    /// token drops nothing: it is added (`create_schema`) or logged.
    async fn add_dedup_window(&self, table: usize) -> Result<(), Failed> {
        let current = self.current();
        let database = &current.config.database;
        let name = TABLES[table];
        let engines = current
            .at(self.active())
            .admin
            .query("SELECT engine_full FROM system.tables WHERE database = ? AND name = ?")
            .bind(database.as_str())
            .bind(name)
            .fetch_all::<String>()
            .await
            .map_err(Failed::Insert)?;
        let statement = engines.first().and_then(|e| {
            schema::dedup_window_statement(database, name, e, current.config.dedup_window)
        });
        match statement {
            Some(alter) if current.config.create_schema => {
                current
                    .at(self.active())
                    .admin
                    .query(&alter)
                    .execute()
                    .await
                    .map_err(Failed::Insert)?;
                tracing::info!(table = name, statement = %alter, "gave the table the deduplication window its token needs");
            }
            Some(alter) => {
                tracing::warn!(table = name, statement = %alter, "the table has no deduplication window, so re-sent flushes are only collapsed under FINAL; run the statement to drop them at insert");
            }
            None => {}
        }
        self.window_checked[table].store(true, Relaxed);
        Ok(())
    }
}

/// A raw table of an earlier layout, and where it goes.
pub(super) struct Legacy {
    pub(super) table: usize,
    pub(super) to: String,
    pub(super) statement: String,
}

/// The raw tables of an earlier layout ([`schema::current_layout`]) in the
/// database, each with the first free `<table>_legacy`, `<table>_legacy_2`,
/// … it is renamed to.
pub(super) async fn earlier_layouts(
    current: &Current,
    active: usize,
) -> Result<Vec<Legacy>, clickhouse::error::Error> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct TableRow {
        name: String,
        partition_key: String,
        sorting_key: String,
    }
    let database = &current.config.database;
    let tables = current
        .at(active)
        .admin
        .query("SELECT name, partition_key, sorting_key FROM system.tables WHERE database = ?")
        .bind(database.as_str())
        .fetch_all::<TableRow>()
        .await?;
    let names: std::collections::HashSet<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let mut out = Vec::new();
    for (i, table) in TABLES.iter().enumerate() {
        let Some(t) = tables.iter().find(|t| t.name == *table) else {
            continue;
        };
        if schema::current_layout(i, &t.partition_key, &t.sorting_key) {
            continue;
        }
        let to = (1..)
            .map(|n| match n {
                1 => format!("{table}{}", schema::LEGACY_SUFFIX),
                n => format!("{table}{}_{n}", schema::LEGACY_SUFFIX),
            })
            .find(|n| !names.contains(n.as_str()))
            .unwrap_or_default();
        let statement =
            schema::legacy_statement(database, table, &to, current.config.cluster.as_deref());
        out.push(Legacy {
            table: i,
            to,
            statement,
        });
    }
    Ok(out)
}

/// A row of `system.columns`.
#[derive(Debug, clickhouse::Row, serde::Deserialize)]
pub(super) struct ColumnRow {
    pub(super) table: String,
    pub(super) name: String,
    pub(super) r#type: String,
}

/// Table `table`'s (name, type) pairs among `rows`.
pub(super) fn columns_of(rows: &[ColumnRow], table: &str) -> Vec<(String, String)> {
    rows.iter()
        .filter(|c| c.table == table)
        .map(|c| (c.name.clone(), c.r#type.clone()))
        .collect()
}

/// Brings table `table`'s `Distributed` copy (`<table>_all`) to
/// tallyd's columns on every server tallyd knows (its URL and
/// replicas), when `create_schema` allows ([`schema::plan_distributed`]).
/// The copies serve reads only, so a server that fails is logged, not a
/// reason to hold the rows.
pub(super) async fn migrate_distributed(current: Current, table: usize) {
    let database = &current.config.database;
    let name = format!("{}_all", TABLES[table]);
    for endpoint in &current.endpoints {
        let rows = endpoint
            .admin
            .query("SELECT table, name, type FROM system.columns WHERE database = ? AND table = ?")
            .bind(database.as_str())
            .bind(name.as_str())
            .fetch_all::<ColumnRow>()
            .await;
        let plan = rows.map(|r| schema::plan_distributed(database, table, &columns_of(&r, &name)));
        let alters = match plan {
            Ok(schema::Plan::Ready) => continue,
            Ok(schema::Plan::Migrate(alters)) if current.config.create_schema => alters,
            Ok(schema::Plan::Migrate(alters)) => {
                tracing::warn!(table = %name, url = %endpoint.url, statements = %alters.join("; "), "the Distributed table lacks tallyd's columns and clickhouse.create_schema is off; reads through it miss them until these run");
                continue;
            }
            Ok(schema::Plan::Refuse(why)) => {
                tracing::warn!(table = %name, url = %endpoint.url, "{why}");
                continue;
            }
            Err(e) => {
                tracing::warn!(table = %name, url = %endpoint.url, error = %e, "could not check the Distributed table's columns");
                continue;
            }
        };
        for alter in &alters {
            match endpoint.admin.query(alter).execute().await {
                Ok(()) => {
                    tracing::info!(url = %endpoint.url, statement = %alter, "migrated the Distributed table")
                }
                Err(e) => {
                    tracing::warn!(url = %endpoint.url, statement = %alter, error = %e, "could not migrate the Distributed table");
                    break;
                }
            }
        }
    }
}
