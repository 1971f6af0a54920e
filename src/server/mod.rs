//! Wiring and lifecycle: binds the listeners, starts every stage, and runs
//! the one shutdown path.
//!
//! ```text
//!  UDP threads ─┐                      ┌─ flush loop ── bounded queue ── sink ── ClickHouse
//!  TCP tasks ───┴─ Aggregator (gens) ──┘   (1 s / max_depth)  (flush_queue)      │
//!                                                              rollups, retention ┘
//! ```
//!
//! Start-up, in order: `bind` every listener (a taken port fails fast);
//! `recover` the ledger and the WAL from the data dir (off the tokio
//! workers); `serve`: start the sink, re-send the spool, replay the WAL's
//! unrecorded generations, start the flush loop and the WAL sync task, then
//! serve the listeners and say READY.
//!
//! Shutdown, in order: `/health` turns 503; the listeners stop and drain
//! what the kernel already holds (acks still waiting for a sync give up at
//! `shutdown_timeout`); the flush loop closes the last interval; the sink
//! writes what is queued, bounded by `shutdown_timeout` (with the WAL, rows
//! still unsent stay in the spool for the next start; without it they are
//! counted and logged as lost); the rollup job is cut wherever it is (a
//! rollup cut short is recomputed by the next start, see [`crate::rollup`]);
//! the WAL sync task stops last, after one final sync.
//!
//! One file a phase: [`bind`], [`recover`] (with the replay), [`serve`],
//! [`shutdown`], and [`reload`] for SIGHUP.

mod bind;
pub mod keying;
mod recover;
mod reload;
mod serve;
mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::aggregate::{Aggregator, Scratch};
use crate::config::Config;
use crate::flush::{self, Clock, Flusher};
use crate::fs::{Fs, RealFs};
use crate::ingest::{proto::ProtoIngest, tcp::TcpIngest, udp};
use crate::ledger::{Ledger, Recovered};
use crate::outbox::gauges::GaugeMemory;
use crate::protocol::batch::BatchView;
use crate::sink::{self, Queued, Sink};
use crate::telemetry::{BlockStats, Telemetry};
use crate::wal::format::Kind;
use crate::wal::{Recovery, SyncMode, Wal};

/// Why tallyd could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error("write-ahead log: {0}")]
    Wal(#[from] crate::wal::WalError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {what} {path}: {source}")]
    BindPath {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("replication: {0}")]
    Replication(String),
}

/// A running tallyd.
pub struct Running {
    pub udp_addr: Option<SocketAddr>,
    pub tcp_addr: Option<SocketAddr>,
    pub proto_tcp_addr: Option<SocketAddr>,
    pub otlp_http_addr: Option<SocketAddr>,
    pub otlp_grpc_addr: Option<SocketAddr>,
    pub proto_udp_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    proto_tcp: Option<JoinHandle<()>>,
    otlp_http: Option<JoinHandle<()>>,
    otlp_grpc: Option<JoinHandle<()>>,
    pub telemetry: Arc<Telemetry>,
    config: Config,
    state: Arc<AdminState>,
    udp_stop: Arc<AtomicBool>,
    udp_threads: Vec<std::thread::JoinHandle<()>>,
    /// The DogStatsD socket file tallyd made, removed at stop.
    uds_path: Option<std::path::PathBuf>,
    /// The DogStatsD stream socket's task and the file tallyd made.
    uds_stream: Option<JoinHandle<()>>,
    uds_stream_path: Option<std::path::PathBuf>,
    stop: watch::Sender<bool>,
    flush_stop: watch::Sender<bool>,
    interval: watch::Sender<Duration>,
    sink_config: watch::Sender<sink::SinkConfig>,
    aggregator: Arc<Aggregator>,
    /// The ledger's filesystem seam (the keying files, see [`keying`]).
    fs: Arc<dyn Fs>,
    /// The listeners' TLS and the ingest tokens (swapped on reload).
    guard: Arc<crate::auth::Guard>,
    tcp: Option<JoinHandle<()>>,
    flush: JoinHandle<u64>,
    sink: JoinHandle<()>,
    /// The rollup job (a tallyd that writes ClickHouse).
    rollups: Option<JoinHandle<()>>,
    /// The replication consumer (docs/replication.md), with `[replication]`.
    replication: Option<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
    systemd: JoinHandle<()>,
    wal: Option<Arc<Wal>>,
    wal_sync: Option<JoinHandle<()>>,
    wal_sync_stop: watch::Sender<bool>,
}

/// Binds everything and starts every stage. tallyd is ready (`/health` 200)
/// when this returns.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, Arc::new(RealFs)).await
}

/// [`start`], with every durable file operation going through `fs` (tests
/// inject failed syncs, ENOSPC and torn writes).
pub async fn start_with(config: Config, fs: Arc<dyn Fs>) -> Result<Running, StartError> {
    start_with_clock(config, fs, Arc::new(crate::clock::wall_clock)).await
}

/// [`start_with`], with intervals started and flush ids drawn by `clock`
/// (tests step it, as NTP or a VM resumed from a snapshot would).
pub async fn start_with_clock(
    config: Config,
    fs: Arc<dyn Fs>,
    clock: Clock,
) -> Result<Running, StartError> {
    // Listeners are bound first (a taken port fails fast), served only after
    // the ledger and the WAL are recovered and replayed.
    // A NATS server that answers and cannot promise an fsync per write
    // refuses the start before anything is made (the WAL, the database).
    if let Some(r) = &config.replication
        && let Err(crate::replication::check::Refused::Unfit(why)) =
            crate::replication::link::check_all(r.monitor_urls.clone()).await
    {
        return Err(StartError::Replication(why));
    }
    let listeners = bind::bind(&config).await?;
    let opened = recover::recover(&config, fs).await?;
    serve::serve(config, listeners, opened, clock).await
}

/// Runs blocking file work (opening the ledger and the WAL) off the tokio
/// workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, std::io::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
}

/// A listener systemd passed, made ready for tokio.
fn from_std(l: std::net::TcpListener) -> std::io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Runs until `signal` resolves, then shuts down. Each configuration that
/// arrives on `reloads` (already validated) is applied as it comes.
pub async fn run(
    config: Config,
    signal: impl std::future::Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<u64, StartError> {
    let mut running = start(config).await?;
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            Some(config) = reloads.recv() => running.reload(config).await,
        }
    }
    Ok(running.shutdown().await)
}
