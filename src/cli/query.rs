//! `tallyd query`: one series over a range, from the table the rule picks
//! ([`crate::rollup::read::choose`]), printed as TSV with a header.

use std::process::ExitCode;

use crate::rollup::read::{Chart, Kind, Source, choose, series};

#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// The metric's name.
    pub name: String,
    /// Its type.
    #[arg(long = "type", value_enum, default_value = "counter")]
    pub kind: Kind,
    /// Only rows with this tag (`k:v`; repeat for more).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// The range: this long up to now (e.g. 15m, 6h, 30d).
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub last: String,
    /// At most this many points: the finest resolution that fits.
    #[arg(long, default_value_t = 1500)]
    pub points: u32,
    /// Print the SQL instead of running it.
    #[arg(long)]
    pub sql: bool,
}

/// Runs `tallyd query`.
pub fn query(config: crate::config::Config, args: &QueryArgs) -> ExitCode {
    let span = match humantime::parse_duration(&args.last) {
        Ok(d) => u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
        Err(e) => {
            return super::fail(&format!(
                "--last {:?} is not a duration like 6h: {e}",
                args.last
            ));
        }
    };
    let now = u32::try_from(crate::clock::wall_clock().as_secs()).unwrap_or(u32::MAX);
    let from = now.saturating_sub(span);
    let interval = u32::try_from(config.flush_interval.as_secs())
        .unwrap_or(1)
        .max(1);
    let source = choose(
        from,
        now,
        now,
        interval,
        &config.retention,
        args.points.max(1),
    );
    let sql = series(&Chart {
        database: &config.sink.database,
        kind: args.kind,
        name: &args.name,
        tags: &args.tags,
        host: None,
        from,
        to: now,
        source,
        settled: now,
    });
    let about = match source {
        Source::Raw => format!("-- raw rows ({} s each)", interval),
        Source::Rollup(r) => format!("-- {} rollups", r.name()),
    };
    if args.sql {
        return super::emit(&format!("{about}\n{sql};\n"));
    }
    eprintln!("{about}");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return super::fail(&format!("cannot start the runtime: {e}")),
    };
    let Some(client) = crate::sink::admin_clients(&config.sink).into_iter().next() else {
        return super::fail("no ClickHouse endpoint configured");
    };
    let result = runtime.block_on(async {
        // `?` binds a parameter in the client's queries; `??` is one `?`.
        let mut cursor = client
            .query(&sql.replace('?', "??"))
            .fetch_bytes("TSVWithNames")?;
        cursor.collect().await
    });
    match result {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            if text.lines().count() <= 1 {
                eprintln!(
                    "-- no rows for {} as a {:?} over the last {} (--type picks the table)",
                    args.name, args.kind, args.last
                );
            }
            super::emit(&text)
        }
        Err(e) => super::fail(&format!("the query failed at {}: {e}", config.sink.url)),
    }
}
