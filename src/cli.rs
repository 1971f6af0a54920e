//! The command line: `tallyd run | check-config | schema | query | top | wal | send`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Overrides, Settings};

mod map;
mod query;
mod top;

#[derive(Debug, Parser)]
#[command(
    name = "tallyd",
    version,
    about = "StatsD-compatible metrics aggregator that writes one compacted row per key to ClickHouse"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(ConfigArgs),
    /// Validate the configuration and print the effective settings.
    CheckConfig(ConfigArgs),
    /// Print the DDL of the ClickHouse tables tallyd makes at start.
    Schema(SchemaArgs),
    /// Look into the write-ahead log.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Send StatsD lines (arguments, or standard input) to a tallyd.
    Send(SendArgs),
    /// Print one series over a range, from raw rows or the rollup the
    /// range needs (README, "Reading rollups").
    Query(query::QueryArgs),
    /// Watch a running tallyd in the terminal: health, rates, drops, the
    /// WAL, the backlog and the metrics with the most keys (its admin API).
    Top(top::TopArgs),
    /// Mapping rules and tag dialects (README, "Cardinality").
    #[command(subcommand)]
    Map(MapCommand),
}

#[derive(Debug, Subcommand)]
pub enum MapCommand {
    /// Print what each StatsD line becomes: its key, the rule that made it
    /// and its metric's key budget (exits 1 when a line is refused).
    Test(map::MapTestArgs),
}

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The DDL for this cluster (replicated tables, ON CLUSTER, Distributed
    /// `*_all` tables) [default: clickhouse.cluster]
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// The DDL for this ClickHouse version [default: ask the configured server]
    #[arg(long, value_name = "VERSION")]
    pub server_version: Option<String>,
    /// Print what tallyd would change in the existing tables (ALTER
    /// statements), without changing anything.
    #[arg(long)]
    pub migrate: bool,
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// As protobuf batches over TCP, waiting for each ack (the default).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8126", conflicts_with_all = ["statsd_udp", "statsd_tcp"])]
    pub proto: SocketAddr,
    /// As StatsD datagrams instead.
    #[arg(long, value_name = "ADDR")]
    pub statsd_udp: Option<SocketAddr>,
    /// As a StatsD TCP stream instead.
    #[arg(long, value_name = "ADDR")]
    pub statsd_tcp: Option<SocketAddr>,
    /// Protobuf client id [default: unique to this run]. Give the same id and
    /// --sequence to a retried run so that its batches are deduplicated.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Sequence of the first batch [default: Unix time in microseconds]
    #[arg(long)]
    pub sequence: Option<u64>,
    /// Events per protobuf batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Over TLS (the listener's `tls.listeners` names it); TCP only.
    #[arg(long)]
    pub tls: bool,
    /// The CAs the server's certificate must be signed by (PEM) [default:
    /// the system's roots]; a self-signed certificate it holds is pinned.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub ca_file: Option<String>,
    /// A client certificate (PEM), for a listener that asks for one (mTLS).
    #[arg(long, value_name = "FILE", requires_all = ["tls", "client_key"])]
    pub client_cert: Option<String>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<String>,
    /// The name the server's certificate must be for [default: the
    /// address's IP].
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub server_name: Option<String>,
    /// A file whose first line is the token (protobuf); `TALLYD_TOKEN`
    /// works too. Never a flag's value, which `ps` would show.
    #[arg(long, value_name = "FILE", env = "TALLYD_TOKEN_FILE")]
    pub token_file: Option<String>,
    /// StatsD lines; read from standard input when absent.
    pub lines: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Print the segments, LSN ranges, checkpoint, record counts and any corruption.
    Inspect(ConfigArgs),
    /// Like inspect; exits with 1 when corruption is found.
    Verify(ConfigArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (see tallyd.example.toml)
    #[arg(long, short, env = "TALLYD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();

    let args = match &cli.command {
        Command::Send(args) => return send(args),
        Command::Top(args) => return top::top(args),
        Command::Run(args)
        | Command::CheckConfig(args)
        | Command::Schema(SchemaArgs { config: args, .. })
        | Command::Query(query::QueryArgs { config: args, .. })
        | Command::Wal(WalCommand::Inspect(args) | WalCommand::Verify(args))
        | Command::Map(MapCommand::Test(map::MapTestArgs { config: args, .. })) => args,
    };
    let settings = match Settings::load(args.config.as_deref(), &args.overrides) {
        Ok(s) => s,
        Err(e) => return fail_with(exit::CONFIG, &format!("configuration error: {e}")),
    };
    let config = match settings.validate() {
        Ok(c) => c,
        Err(e) => return fail_with(exit::CONFIG, &format!("configuration error: {e}")),
    };
    match cli.command {
        Command::CheckConfig(_) => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            if let Some(r) = &config.replication {
                if r.spec.replicas > r.monitor_urls.len() {
                    eprintln!(
                        "warning: replication.replicas is {} but {} server(s) are named: a stream is made only when the cluster has that many servers",
                        r.spec.replicas,
                        r.monitor_urls.len()
                    );
                }
                // What the start checks: every server fsyncs every write.
                for url in &r.monitor_urls {
                    match crate::replication::check::server(url) {
                        Ok(fit) => eprintln!(
                            "replication: {url}: {} {} fsyncs every write",
                            fit.name, fit.version
                        ),
                        Err(crate::replication::check::Refused::Unfit(why)) => {
                            return fail_with(
                                exit::CONFIG,
                                &format!("configuration error: replication.monitor_urls: {why}"),
                            );
                        }
                        Err(crate::replication::check::Refused::Unreachable(why)) => eprintln!(
                            "warning: {why} (tallyd starts, answers acknowledged batches OVERLOADED and tries again until it can)"
                        ),
                    }
                }
            }
            print!("{}", settings.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Schema(schema) => schema_command(config, &schema),
        Command::Query(args) => query::query(config, &args),
        Command::Map(MapCommand::Test(args)) => map::map_test(&config, &args),
        Command::Top(args) => top::top(&args),
        Command::Run(args) => run(config, args.config.clone(), args.overrides.clone()),
        // Handled before the configuration is read.
        Command::Send(args) => send(&args),
        Command::Wal(cmd) => {
            let dir = config.data_dir.join("wal");
            let report = match crate::wal::inspect::inspect(&dir) {
                Ok(r) => r,
                Err(e) => return fail(&format!("cannot read the WAL: {e}")),
            };
            print!("{report}");
            if matches!(cmd, WalCommand::Verify(_)) && !report.corruption().is_empty() {
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Exit codes (sysexits.h), so that a unit file can tell them apart.
mod exit {
    /// A configuration error.
    pub const CONFIG: u8 = 78;
    /// A listener could not be bound (port in use, no permission).
    pub const UNAVAILABLE: u8 = 69;
    /// The data dir or the WAL could not be created, opened or locked.
    pub const CANT_CREATE: u8 = 73;
    /// Rows were lost at shutdown (only without the WAL).
    pub const LOST: u8 = 3;
}

fn run(config: crate::config::Config, file: Option<PathBuf>, overrides: Overrides) -> ExitCode {
    // Before any thread exists: it reads and clears LISTEN_* variables.
    if let Err(e) = crate::activation::capture() {
        return fail_with(
            exit::UNAVAILABLE,
            &format!("cannot take the sockets systemd passed: {e}"),
        );
    }
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (level, level_handle) = tracing_subscriber::reload::Layer::new(config.log_level);
    tracing_subscriber::registry()
        .with(level)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .init();
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async move {
        let (reloads, reload_rx) = tokio::sync::mpsc::channel(4);
        // SIGHUP: read the file again (same flags and environment); an
        // invalid file is refused and the running configuration stays.
        let reloader = tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
                return;
            };
            while hup.recv().await.is_some() {
                // Reading the files (config, TLS) is blocking work.
                let (f, o) = (file.clone(), overrides.clone());
                let loaded = tokio::task::spawn_blocking(move || {
                    Settings::load(f.as_deref(), &o).and_then(|s| s.validate())
                })
                .await
                .unwrap_or_else(|e| {
                    Err(crate::config::ConfigError {
                        field: "(reload)".into(),
                        reason: e.to_string(),
                    })
                });
                match loaded {
                    Ok(config) => {
                        for w in &config.warnings {
                            tracing::warn!("{w}");
                        }
                        if let Err(e) = level_handle.modify(|l| *l = config.log_level) {
                            tracing::error!(error = %e, "cannot change the log level");
                        }
                        if reloads.send(config).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!("reload refused, the running configuration stays: {e}")
                    }
                }
            }
        });
        let result = crate::server::run(config, shutdown_signal(), reload_rx).await;
        reloader.abort();
        result
    });
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(exit::LOST),
        Err(e) => {
            let code =
                match e {
                    crate::server::StartError::Bind { .. }
                    | crate::server::StartError::BindPath { .. } => exit::UNAVAILABLE,
                    crate::server::StartError::DataDir { .. }
                    | crate::server::StartError::Wal(_) => exit::CANT_CREATE,
                    crate::server::StartError::Tls(_)
                    | crate::server::StartError::Replication(_) => exit::CONFIG,
                };
            eprintln!("tallyd: {e}");
            ExitCode::from(code)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn send(args: &SendArgs) -> ExitCode {
    use crate::client::{self, Target};
    let target = match (args.statsd_udp, args.statsd_tcp) {
        (Some(a), _) => Target::StatsdUdp(a),
        (_, Some(a)) => Target::StatsdTcp(a),
        _ => Target::Proto(args.proto),
    };
    let lines = match client::read_lines(&args.lines) {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot read standard input: {e}")),
    };
    let sequence = args
        .sequence
        .unwrap_or_else(|| crate::clock::wall_clock().as_micros() as u64);
    // Unique per run: two runs must never share a dedup window by accident.
    let client_id = args.client_id.clone().unwrap_or_else(|| {
        format!(
            "tallyd-send-{}-{}",
            std::process::id(),
            crate::clock::wall_clock().as_nanos()
        )
    });
    let secure = match secure(args, target) {
        Ok(s) => s,
        Err(e) => return fail_with(exit::CONFIG, &e),
    };
    match client::send(
        target,
        &lines,
        &client_id,
        sequence,
        args.batch_size,
        &secure,
    ) {
        Ok(s) => {
            let n =
                |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
            let lines = n(s.lines, "line", "lines");
            match target {
                client::Target::StatsdUdp(_) => {
                    eprintln!("tallyd send: {lines} sent over UDP (StatsD has no acknowledgement)")
                }
                client::Target::StatsdTcp(_) => {
                    eprintln!("tallyd send: {lines} sent over TCP (StatsD has no acknowledgement)")
                }
                client::Target::Proto(_) => eprintln!(
                    "tallyd send: {lines}, {} acknowledged ({}), {} rejected",
                    n(s.batches, "batch", "batches"),
                    n(s.duplicates, "duplicate", "duplicates"),
                    n(s.rejected_events, "event", "events")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("send failed: {e}")),
    }
}

fn fail(message: &str) -> ExitCode {
    fail_with(2, message)
}

/// `tallyd schema`: the DDL for the server tallyd would talk to (or a
/// given version), or with `--migrate` what it would change in the
/// existing tables.
fn schema_command(mut config: crate::config::Config, args: &SchemaArgs) -> ExitCode {
    use std::fmt::Write as _;
    if let Some(c) = &args.cluster {
        config.sink.cluster = Some(c.clone());
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let mut sink_config = config.sink.clone();
    sink_config.timeout = std::time::Duration::from_secs(5);
    let telemetry = std::sync::Arc::new(crate::telemetry::Telemetry::default());
    // Written at the end, at once: a closed pipe (`| head`) is no error.
    let mut out = String::new();
    let sink = crate::sink::Sink::new(sink_config.clone(), telemetry);
    if args.migrate {
        return match runtime.block_on(sink.migration_plan()) {
            Ok(plan) if plan.is_empty() => {
                let _ = writeln!(
                    out,
                    "-- the tables have tallyd's columns and settings: nothing to change"
                );
                emit(&out)
            }
            Ok(plan) => {
                for statement in plan {
                    let _ = writeln!(out, "{statement};");
                }
                emit(&out)
            }
            Err(e) => fail(&format!(
                "cannot read the tables at {}: {e}",
                sink_config.url
            )),
        };
    }
    let version = match &args.server_version {
        Some(v) => Some(v.clone()),
        None => runtime.block_on(sink.server_version()).ok(),
    };
    let _ = match &version {
        Some(v) => writeln!(out, "-- For ClickHouse {v}.\n"),
        None => writeln!(
            out,
            "-- {} did not answer: the DDL for 18.16 to 22.1; on 22.2 and later each\n-- table also gets SETTINGS non_replicated_deduplication_window = {}.\n",
            sink_config.url, sink_config.dedup_window
        ),
    };
    let window = version
        .as_deref()
        .is_some_and(crate::sink::schema::has_dedup_token)
        .then_some(config.sink.dedup_window);
    let cluster = config.sink.cluster.as_deref();
    let low_cardinality = version
        .as_deref()
        .is_some_and(crate::sink::schema::has_low_cardinality);
    let database = &config.sink.database;
    for statement in crate::sink::schema::ddl(database, window, cluster, low_cardinality)
        .into_iter()
        .chain(crate::sink::flushes::ddl(database, cluster))
        .chain(crate::rollup::sql::ddl(database, cluster, low_cardinality))
    {
        let _ = writeln!(out, "{statement};\n");
    }
    emit(&out)
}

/// Writes `text` to standard output; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> ExitCode {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    ExitCode::SUCCESS
}

fn fail_with(code: u8, message: &str) -> ExitCode {
    eprintln!("tallyd: {message}");
    ExitCode::from(code)
}

/// `tallyd send`'s TLS and token, read from its flags' files.
fn secure(args: &SendArgs, target: crate::client::Target) -> Result<crate::client::Secure, String> {
    use crate::sink::tls::{Pem, SystemRoots, TlsFiles, client_config};
    let mut secure = crate::client::Secure::default();
    if args.tls {
        let addr = match target {
            crate::client::Target::StatsdUdp(_) => return Err("--tls: UDP has no TLS".into()),
            crate::client::Target::StatsdTcp(a) | crate::client::Target::Proto(a) => a,
        };
        let ca = args
            .ca_file
            .as_deref()
            .map(|p| Pem::read(p, false))
            .transpose()?;
        let client = match (&args.client_cert, &args.client_key) {
            (Some(c), Some(k)) => Some((Pem::read(c, false)?, Pem::read(k, true)?)),
            _ => None,
        };
        let system = if ca.is_none() {
            SystemRoots::load()
        } else {
            SystemRoots::default()
        };
        let config = client_config(&TlsFiles { ca, system, client })?;
        let name = match &args.server_name {
            Some(n) => rustls_pki_types::ServerName::try_from(n.clone())
                .map_err(|e| format!("--server-name {n:?}: {e}"))?,
            None => rustls_pki_types::ServerName::from(addr.ip()),
        };
        secure.tls = Some((std::sync::Arc::new(config), name));
    }
    let token = match (&args.token_file, std::env::var("TALLYD_TOKEN")) {
        (Some(p), _) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| format!("--token-file {p:?}: {e}"))?;
            let first = crate::auth::token_lines(&text).next();
            Some(
                first
                    .ok_or_else(|| format!("--token-file {p:?} holds no token"))?
                    .to_owned(),
            )
        }
        (None, Ok(t)) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        _ => None,
    };
    secure.token = token.map(|t| crate::auth::Secret::new(&t));
    Ok(secure)
}
