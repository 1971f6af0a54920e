//! Wiring and lifecycle: binds the listeners, starts every stage, and runs
//! the one shutdown path.
//!
//! ```text
//!  UDP threads ─┐                      ┌─ flush loop ── bounded queue ── sink ── ClickHouse
//!  TCP tasks ───┴─ Aggregator (gens) ──┘   (1 s / max_depth)  (flush_queue)
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
//! counted and logged as lost); the WAL sync task stops last, after one
//! final sync.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::aggregate::{Aggregator, Generation, Scratch};
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
}

/// A running tallyd.
pub struct Running {
    pub udp_addr: Option<SocketAddr>,
    pub tcp_addr: Option<SocketAddr>,
    pub proto_tcp_addr: Option<SocketAddr>,
    pub proto_udp_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    proto_tcp: Option<JoinHandle<()>>,
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
    tcp: Option<JoinHandle<()>>,
    flush: JoinHandle<u64>,
    sink: JoinHandle<()>,
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
    let listeners = bind(&config).await?;
    let opened = recover(&config, fs).await?;
    serve(config, listeners, opened, clock).await
}

/// Every socket tallyd listens on, bound (or passed by systemd).
struct Listeners {
    udp_sockets: Vec<std::net::UdpSocket>,
    tcp_listener: Option<TcpListener>,
    proto_tcp_listener: Option<TcpListener>,
    proto_udp_socket: Option<std::net::UdpSocket>,
    /// The DogStatsD Unix datagram socket, and its path when tallyd made it
    /// (removed at stop).
    uds_socket: Option<(std::os::unix::net::UnixDatagram, Option<std::path::PathBuf>)>,
    /// The DogStatsD Unix stream socket, likewise.
    uds_stream: Option<(tokio::net::UnixListener, Option<std::path::PathBuf>)>,
    admin_listener: Option<TcpListener>,
}

/// Start-up phase 1: binds every listener.
async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let bind_err = |what, addr| move |source| StartError::Bind { what, addr, source };
    let activated = crate::activation::take();
    let activated_addr = |what: &'static str| {
        move |source| StartError::Bind {
            what,
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        }
    };
    let udp_sockets = match (activated.statsd_udp, config.statsd_udp) {
        // One passed socket, read by every UDP worker.
        (Some(socket), _) => udp::share(socket, config.udp_workers)
            .map_err(activated_addr("StatsD UDP (passed by systemd)"))?,
        (None, Some(addr)) => udp::bind(addr, config.udp_workers, config.udp_recv_buffer)
            .map_err(bind_err("StatsD UDP", addr))?,
        (None, None) => Vec::new(),
    };
    let tcp_listener = match (activated.statsd_tcp, config.statsd_tcp) {
        (Some(l), _) => {
            Some(from_std(l).map_err(activated_addr("StatsD TCP (passed by systemd)"))?)
        }
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("StatsD TCP", addr))?,
        ),
        (None, None) => None,
    };
    let proto_tcp_listener = match (activated.proto_tcp, config.proto.tcp) {
        (Some(l), _) => {
            Some(from_std(l).map_err(activated_addr("protobuf TCP (passed by systemd)"))?)
        }
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("protobuf TCP", addr))?,
        ),
        (None, None) => None,
    };
    let proto_udp_socket = match (activated.proto_udp, config.proto.udp) {
        (Some(s), _) => Some(s),
        (None, Some(addr)) => {
            Some(std::net::UdpSocket::bind(addr).map_err(bind_err("protobuf UDP", addr))?)
        }
        (None, None) => None,
    };
    let uds_socket = match (activated.dogstatsd_socket, &config.dogstatsd_socket) {
        (Some(s), _) => {
            s.set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .map_err(activated_addr("DogStatsD socket (passed by systemd)"))?;
            Some((s, None))
        }
        (None, Some(path)) => {
            let (p, mode, buffer) = (
                path.clone(),
                config.dogstatsd_socket_mode,
                config.udp_recv_buffer,
            );
            let socket =
                tokio::task::spawn_blocking(move || crate::ingest::uds::bind(&p, mode, buffer))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|source| StartError::BindPath {
                        what: "the DogStatsD socket",
                        path: path.display().to_string(),
                        source,
                    })?;
            Some((socket, Some(path.clone())))
        }
        (None, None) => None,
    };
    let uds_stream = match (
        activated.dogstatsd_stream_socket,
        &config.dogstatsd_stream_socket,
    ) {
        (Some(l), _) => {
            let l = l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(l))
                .map_err(activated_addr(
                    "DogStatsD stream socket (passed by systemd)",
                ))?;
            Some((l, None))
        }
        (None, Some(path)) => {
            let (p, mode) = (path.clone(), config.dogstatsd_socket_mode);
            let listener =
                tokio::task::spawn_blocking(move || crate::ingest::uds::bind_stream(&p, mode))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .and_then(tokio::net::UnixListener::from_std)
                    .map_err(|source| StartError::BindPath {
                        what: "the DogStatsD stream socket",
                        path: path.display().to_string(),
                        source,
                    })?;
            Some((listener, Some(path.clone())))
        }
        (None, None) => None,
    };
    let admin_listener = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("admin", addr))?,
        ),
        None => None,
    };
    Ok(Listeners {
        udp_sockets,
        tcp_listener,
        proto_tcp_listener,
        proto_udp_socket,
        uds_socket,
        uds_stream,
        admin_listener,
    })
}

/// What start-up phase 2 recovered from the data dir.
struct Opened {
    ledger: Arc<Ledger>,
    recovered: Recovered,
    wal: Option<Arc<Wal>>,
    recovery: Recovery,
}

/// Start-up phase 2: opens the ledger and the WAL (off the tokio workers)
/// and reads what they hold.
async fn recover(config: &Config, fs: Arc<dyn Fs>) -> Result<Opened, StartError> {
    let data_dir_err = |source| StartError::DataDir {
        dir: config.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(data_dir_err)?;
    let (ledger, recovered) = {
        // The window in flushes at the configured interval.
        let flushes =
            config.proto.dedup_window.as_nanos() / config.flush_interval.as_nanos().max(1);
        let (dir, window, fs) = (
            config.data_dir.clone(),
            u64::try_from(flushes).unwrap_or(u64::MAX),
            Arc::clone(&fs),
        );
        let budget = config.spool_max_size;
        let max_clients = config.proto.max_clients;
        blocking(move || Ledger::open(&dir, window, max_clients, budget, fs))
            .await
            .and_then(|r| r)
            .map_err(data_dir_err)?
    };
    let (wal, mut recovery) = match &config.wal {
        Some(wc) => {
            let (wc, fs) = (wc.clone(), Arc::clone(&fs));
            let (wal, recovery) =
                blocking(move || Wal::open_with(wc, fs))
                    .await
                    .map_err(|e| crate::wal::WalError::Io {
                        path: "(recovery thread)".into(),
                        source: e,
                    })??;
            (Some(Arc::new(wal)), recovery)
        }
        None => (
            None,
            Recovery {
                next_generation: 1,
                ..Recovery::default()
            },
        ),
    };
    let ledger = Arc::new(
        ledger
            .with_wal(wal.clone())
            .with_drain_batch(config.spool_drain_batch)
            .with_hard_limit(config.spool_hard_limit),
    );
    // Generations recorded in the spool before a crash are not rebuilt.
    if let Some(newest) = recovered.flushes.iter().map(|f| f.generation).max() {
        recovery.next_generation = recovery.next_generation.max(newest + 1);
    }
    Ok(Opened {
        ledger,
        recovered,
        wal,
        recovery,
    })
}

/// Start-up phase 3: starts every stage, replays, then serves.
async fn serve(
    config: Config,
    listeners: Listeners,
    opened: Opened,
    clock: Clock,
) -> Result<Running, StartError> {
    let Listeners {
        udp_sockets,
        tcp_listener,
        proto_tcp_listener,
        proto_udp_socket,
        uds_socket,
        uds_stream,
        admin_listener,
    } = listeners;
    let Opened {
        ledger,
        mut recovered,
        wal,
        recovery,
    } = opened;
    let dedup = Arc::clone(&ledger.dedup);
    let telemetry = Arc::new(Telemetry::default());
    let bind_err = |what, addr| move |source| StartError::Bind { what, addr, source };
    let aggregator = Arc::new(Aggregator::with_wal(
        config.aggregate,
        config.parse_limits,
        clock(),
        wal.clone(),
        recovery.next_generation,
    ));

    let udp_addr = udp_sockets.first().and_then(|s| s.local_addr().ok());
    if let Some(bytes) = udp::receive_buffer(&udp_sockets, config.udp_recv_buffer) {
        telemetry
            .udp_receive_buffer
            .store(bytes as u64, Ordering::Relaxed);
    }
    let tcp_addr = tcp_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (stop, stop_rx) = watch::channel(false);
    let state = Arc::new(AdminState {
        telemetry: Arc::clone(&telemetry),
        aggregator: Arc::clone(&aggregator),
        ready: AtomicBool::new(false),
        udp_inodes: udp::inodes(&udp_sockets),
        wal: wal.clone(),
        ledger: Arc::clone(&ledger),
    });

    let (sink_config, sink_config_rx) = watch::channel(config.sink.clone());
    let sink = Sink::new(config.sink.clone(), Arc::clone(&telemetry))
        .with_reload(sink_config_rx)
        .with_ledger(Arc::clone(&ledger));
    // Replayed generations beyond the queue are parked in the spool, like
    // any flush that finds the queue full: replay never waits for
    // ClickHouse, and holds one generation in memory at a time.
    let (queue_tx, queue_rx) = mpsc::channel(config.flush_queue.max(1));
    let sink = tokio::spawn(prepare_and_run(sink, config.sink.clone(), queue_rx));

    // The TTL in flushes at the configured interval (a reload of the
    // interval keeps the count).
    let ttl_flushes = config.gauge_ttl.as_nanos() / config.flush_interval.as_nanos().max(1);
    let mut gauges = GaugeMemory::new(config.aggregate.max_keys)
        .with_ttl(u64::try_from(ttl_flushes).unwrap_or(u64::MAX));
    if let Some(bytes) = recovered.gauges_log_bytes {
        gauges = gauges.with_log_bytes(bytes);
    }
    for (key, value) in std::mem::take(&mut recovered.gauges) {
        gauges.remember(key, value);
    }
    let mut flusher = Flusher {
        aggregator: Arc::clone(&aggregator),
        ledger: Arc::clone(&ledger),
        gauges,
        host: config.host_id.clone(),
        queue: queue_tx,
        telemetry: Arc::clone(&telemetry),
        clock,
        held: None,
    };
    let first_open = recovery.next_generation;
    replay(&mut flusher, recovered, recovery, &telemetry, &dedup)
        .await
        .map_err(|source| StartError::DataDir {
            dir: config.data_dir.display().to_string(),
            source,
        })?;
    // Every generation before the first open one is released or was never
    // in this WAL (see `Wal::confirm_through`).
    if let Some(w) = &wal {
        let w = Arc::clone(w);
        blocking(move || w.confirm_through(first_open.saturating_sub(1)))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r.map_err(std::io::Error::other))
            .map_err(|source| StartError::DataDir {
                dir: config.data_dir.display().to_string(),
                source,
            })?;
    }
    // The flush loop stops only after every listener has drained, so its
    // last interval holds everything received.
    let (flush_stop, flush_stop_rx) = watch::channel(false);
    let (interval, interval_rx) = watch::channel(config.flush_interval);
    let flush = tokio::spawn(flush::run(flusher, interval_rx, flush_stop_rx));
    // The WAL sync task stops last, after every ack and the last flush.
    let (wal_sync_stop, wal_sync_stop_rx) = watch::channel(false);
    let wal_sync = wal
        .as_ref()
        .and_then(|w| spawn_wal_sync(Arc::clone(w), wal_sync_stop_rx));

    let udp_stop = Arc::new(AtomicBool::new(false));
    let udp_threads = udp::spawn(
        udp_sockets,
        config.udp_wal_streams,
        Arc::clone(&aggregator),
        Arc::clone(&telemetry),
        Arc::clone(&udp_stop),
    )
    .map_err(bind_err(
        "StatsD UDP",
        config
            .statsd_udp
            .unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
    ))?;
    // TCP connections (StatsD and protobuf) share the streams after the
    // UDP workers'.
    let udp_streams = config.udp_wal_streams;
    let shared_streams = udp_streams
        ..wal
            .as_ref()
            .map_or(udp_streams + 1, |w| w.streams().max(udp_streams + 1));
    let tcp = tcp_listener.map(|listener| {
        let ingest = TcpIngest {
            aggregator: Arc::clone(&aggregator),
            telemetry: Arc::clone(&telemetry),
            max_line: config.tcp_max_line,
            max_connections: config.tcp_max_connections,
            idle_timeout: config.tcp_idle_timeout,
            wal_streams: shared_streams.clone(),
        };
        tokio::spawn(ingest.serve(listener, stop_rx.clone()))
    });
    let (uds_stream, uds_stream_path) = match uds_stream {
        Some((listener, path)) => {
            let ingest = crate::ingest::uds::StreamIngest {
                aggregator: Arc::clone(&aggregator),
                telemetry: Arc::clone(&telemetry),
                max_frame: config.tcp_max_line,
                max_connections: config.tcp_max_connections,
                idle_timeout: config.tcp_idle_timeout,
                wal_streams: shared_streams.clone(),
            };
            (
                Some(tokio::spawn(ingest.serve(listener, stop_rx.clone()))),
                path,
            )
        }
        None => (None, None),
    };
    let proto = ProtoIngest {
        aggregator: Arc::clone(&aggregator),
        telemetry: Arc::clone(&telemetry),
        wal: wal.clone(),
        dedup,
        max_frame: config.proto.max_frame,
        max_connections: config.proto.max_connections,
        overload_timeout: config.proto.overload_timeout,
        idle_timeout: config.proto.idle_timeout,
        wal_streams: shared_streams,
    };
    let proto_tcp_addr = proto_tcp_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok());
    let proto_udp_addr = proto_udp_socket.as_ref().and_then(|s| s.local_addr().ok());
    let mut udp_threads = udp_threads;
    let uds_path = match uds_socket {
        Some((socket, path)) => {
            udp_threads.push(
                crate::ingest::uds::spawn(
                    socket,
                    0,
                    Arc::clone(&aggregator),
                    Arc::clone(&telemetry),
                    Arc::clone(&udp_stop),
                )
                .map_err(|source| StartError::BindPath {
                    what: "the DogStatsD socket",
                    path: path
                        .as_ref()
                        .map_or("(passed by systemd)".into(), |p| p.display().to_string()),
                    source,
                })?,
            );
            path
        }
        None => None,
    };
    if let Some(socket) = proto_udp_socket {
        let addr = proto_udp_addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        udp_threads.push(
            proto
                .clone()
                .spawn_udp(socket, Arc::clone(&udp_stop))
                .map_err(bind_err("protobuf UDP", addr))?,
        );
    }
    let proto_tcp = proto_tcp_listener.map(|l| tokio::spawn(proto.serve_tcp(l, stop_rx.clone())));
    let admin =
        admin_listener.map(|l| tokio::spawn(admin::serve(l, Arc::clone(&state), stop_rx.clone())));

    let now = crate::notify::now_ms();
    telemetry.flush_heartbeat_ms.store(now, Ordering::Relaxed);
    telemetry.udp_heartbeat_ms.store(now, Ordering::Relaxed);
    state.ready.store(true, Ordering::Relaxed);
    crate::notify::ready(&format!(
        "ready: StatsD UDP {udp_addr:?}, TCP {tcp_addr:?}; protobuf TCP {proto_tcp_addr:?}"
    ));
    // Watchdog pings start after READY=1, never before it.
    let systemd = crate::notify::spawn(
        Arc::clone(&telemetry),
        Arc::clone(&aggregator),
        config.flush_interval,
        udp_addr.is_some(),
        stop_rx.clone(),
    );
    tracing::info!(udp = ?udp_addr, tcp = ?tcp_addr, proto_tcp = ?proto_tcp_addr, proto_udp = ?proto_udp_addr, admin = ?admin_addr, host = %config.host_id, "tallyd is ready");
    Ok(Running {
        udp_addr,
        tcp_addr,
        proto_tcp_addr,
        proto_udp_addr,
        admin_addr,
        proto_tcp,
        telemetry,
        config,
        state,
        udp_stop,
        udp_threads,
        uds_path,
        uds_stream,
        uds_stream_path,
        stop,
        flush_stop,
        interval,
        sink_config,
        aggregator,
        tcp,
        flush,
        sink,
        admin,
        systemd,
        wal,
        wal_sync,
        wal_sync_stop,
    })
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

/// Queues the spooled flushes again (as they are), then rebuilds each WAL
/// generation that was not recorded and queues it (see the durable order in
/// [`crate::ledger`]).
async fn replay(
    flusher: &mut Flusher,
    recovered: Recovered,
    recovery: Recovery,
    telemetry: &Telemetry,
    dedup: &crate::ledger::dedup::Dedup,
) -> std::io::Result<()> {
    let spooled: std::collections::BTreeSet<u64> =
        recovered.flushes.iter().map(|f| f.generation).collect();
    let hosts: std::collections::BTreeSet<&str> =
        recovered.flushes.iter().map(|f| f.host.as_str()).collect();
    if hosts.iter().any(|h| *h != flusher.host) {
        tracing::warn!(pending = ?hosts, configured = %flusher.host, "spooled flushes were recorded for another host_id; they are re-sent under the identity they were recorded with");
    }
    let started = std::time::Instant::now();
    // 1. Every protobuf batch in the WAL goes back into the dedup state, and
    //    the generations already in the spool are released; only then may
    //    the sink take spooled flushes (sending and completing one must not
    //    leave its generation in the WAL to be rebuilt).
    for r in &recovery.generations {
        for (_, block) in r.blocks.iter().filter(|(k, _)| *k == Kind::Proto) {
            if let Some(batch) = decode_recorded(block) {
                dedup.observe(batch.client_id, batch.sequence);
            }
        }
        if spooled.contains(&r.generation) {
            flusher.release_checked(r.generation).await?;
        }
    }
    flusher.ledger.park_recovered();
    crate::ledger::publish_backlog(&flusher.ledger, telemetry);
    // 2. The other generations are rebuilt and flushed, oldest first.
    let mut stats = BlockStats::default();
    let mut scratch = Scratch::default();
    let count = recovery.generations.len();
    for r in recovery.generations {
        if spooled.contains(&r.generation) {
            continue;
        }
        // The live start when the WAL has it: the same `ts` and `|T`
        // window as live.
        let mut generation = Generation::new(r.generation, r.started.unwrap_or((flusher.clock)()));
        generation.replayed = r.started.is_none();
        for (kind, block) in &r.blocks {
            match kind {
                Kind::Statsd => {
                    flusher
                        .aggregator
                        .apply_block(&generation, block, &mut scratch, &mut stats)
                }
                Kind::Start => {}
                Kind::Proto => {
                    if let Some(batch) = decode_recorded(block) {
                        flusher.aggregator.apply_batch(
                            &generation,
                            &batch,
                            &mut scratch,
                            &mut stats,
                        );
                    }
                }
            }
        }
        flusher.flush_replayed(generation, r.intent).await?;
    }
    telemetry
        .replayed_samples
        .fetch_add(stats.samples, Ordering::Relaxed);
    // What the replay dropped (limits apply as to live traffic) is counted.
    for (counter, n) in [
        (&telemetry.dropped_memory, stats.dropped_memory),
        (&telemetry.dropped_key_limit, stats.dropped_key_limit),
        (&telemetry.dropped_set_members, stats.dropped_set_members),
    ] {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    if count > 0 || !spooled.is_empty() {
        tracing::info!(
            generations = count,
            spooled_flushes = recovered.flushes.len(),
            records = recovery.records,
            bytes = recovery.bytes,
            samples = stats.samples,
            dropped_memory = stats.dropped_memory,
            dropped_key_limit = stats.dropped_key_limit,
            took = ?started.elapsed(),
            "replayed the write-ahead log"
        );
    }
    Ok(())
}

/// The `interval` durability policy: sync new records every interval (and,
/// with `always`, the full sync that follows a failed one).
fn spawn_wal_sync(wal: Arc<Wal>, mut stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    let (mode, every) = wal.sync_mode();
    if mode == SyncMode::Never {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = wal.sync_wanted() => {}
                _ = stop.changed() => break,
            }
            let wal = Arc::clone(&wal);
            let _ = tokio::task::spawn_blocking(move || wal.sync()).await;
        }
    }))
}

/// Creates the schema (retrying while ClickHouse is unreachable), then
/// writes batches. Batches queue up meanwhile; nothing is lost.
async fn prepare_and_run(mut sink: Sink, config: sink::SinkConfig, queue: mpsc::Receiver<Queued>) {
    let mut attempt = 0;
    loop {
        match sink.connect().await {
            Ok(version) => {
                tracing::info!(%version, url = %config.url, database = %config.database, "connected to ClickHouse");
                break;
            }
            Err(e) => {
                let delay = sink::backoff(attempt, config.retry_initial, config.retry_max, 1.0);
                sink.count_retry();
                if sink::is_certificate_error(&e) {
                    tracing::error!(error = %e, url = %config.url, retry_in = ?delay, "ClickHouse's TLS certificate is not trusted (set clickhouse.ca_file for a private CA); buffering");
                } else {
                    tracing::warn!(error = %e, url = %config.url, retry_in = ?delay, "ClickHouse is not usable yet; buffering");
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
    sink.run(queue).await;
}

impl Running {
    /// The one shutdown path (see the module doc). Returns the rows that could
    /// not be written within `shutdown_timeout`.
    pub async fn shutdown(self) -> u64 {
        self.state.ready.store(false, Ordering::Relaxed);
        crate::notify::stopping();
        tracing::info!("stopping: draining listeners");
        // One deadline for the whole stop; the listeners get half of it.
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.shutdown_timeout;
        let listen_deadline = started + self.config.shutdown_timeout / 2;
        self.udp_stop.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        // Acks that still wait for durability then give up (a failing disk
        // must not hold the stop).
        let close_acks = self.wal.as_ref().map(|wal| {
            let wal = Arc::clone(wal);
            tokio::spawn(async move {
                tokio::time::sleep_until(listen_deadline).await;
                wal.close_acks();
            })
        });
        let threads = self.udp_threads;
        let uds_path = self.uds_path;
        let uds_stream_path = self.uds_stream_path;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            for path in [uds_path, uds_stream_path].into_iter().flatten() {
                let _ = std::fs::remove_file(path);
            }
        })
        .await;
        for mut task in [self.tcp, self.proto_tcp, self.uds_stream]
            .into_iter()
            .flatten()
        {
            if tokio::time::timeout_at(listen_deadline, &mut task)
                .await
                .is_err()
            {
                // A sender that never pauses, or a client that stopped
                // reading its acks: its connection is cut.
                task.abort();
                let _ = task.await;
                tracing::warn!("TCP connections did not drain in time; cut");
            }
        }
        // The last interval is recorded in the spool (parked if the queue is
        // full), so it does not wait for ClickHouse.
        let _ = self.flush_stop.send(true);
        let mut flush = self.flush;
        let unrecorded = match tokio::time::timeout_at(deadline, &mut flush).await {
            Ok(Ok(samples)) => samples,
            Ok(Err(_)) => 0,
            Err(_) => {
                flush.abort();
                // Wait for the cancelled task to be dropped (it holds the WAL).
                let _ = flush.await;
                self.aggregator.current().pending.load(Ordering::Relaxed)
            }
        };
        let lost = match (unrecorded, &self.wal) {
            (0, _) => 0,
            (samples, Some(_)) => {
                tracing::warn!(
                    samples,
                    "the last interval could not be recorded in time; it stays in the WAL for the next start"
                );
                0
            }
            (samples, None) => {
                self.telemetry
                    .rows_lost_at_shutdown
                    .fetch_add(samples, Ordering::Relaxed);
                tracing::error!(
                    samples,
                    "the last interval could not be recorded in time and the WAL is off; it is lost"
                );
                samples
            }
        };
        let mut sink = self.sink;
        if tokio::time::timeout_at(deadline, &mut sink).await.is_err() {
            sink.abort();
            let _ = sink.await;
            let rows = self.telemetry.backlog_rows.load(Ordering::Relaxed);
            tracing::warn!(rows, timeout = ?self.config.shutdown_timeout, "ClickHouse did not take the last rows in time; they stay in the spool for the next start");
        }
        if let Some(task) = close_acks {
            task.abort();
            let _ = task.await; // it holds the WAL
        }
        let _ = self.wal_sync_stop.send(true);
        if let Some(task) = self.wal_sync {
            let _ = task.await;
        }
        if let Some(wal) = &self.wal {
            let wal = Arc::clone(wal);
            let _ = tokio::task::spawn_blocking(move || wal.sync()).await;
        }
        if let Some(admin) = self.admin {
            let _ = admin.await;
        }
        let _ = self.systemd.await;
        tracing::info!("stopped");
        lost
    }
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
            Some(config) = reloads.recv() => running.reload(config),
        }
    }
    Ok(running.shutdown().await)
}

impl Running {
    /// Applies a new configuration without losing pending data: limits,
    /// flush interval and max depth, ClickHouse URL, credentials and
    /// timeouts, and the shutdown timeout. What needs a restart (listeners,
    /// the data dir, the WAL geometry, TCP limits) is logged, not applied.
    pub fn reload(&mut self, new: Config) {
        let old = &self.config;
        let restart: Vec<&str> = [
            ("statsd.udp", old.statsd_udp != new.statsd_udp),
            ("statsd.tcp", old.statsd_tcp != new.statsd_tcp),
            ("admin", old.admin != new.admin),
            ("proto", old.proto != new.proto),
            ("data_dir", old.data_dir != new.data_dir),
            ("wal", old.wal != new.wal),
            ("host_id", old.host_id != new.host_id),
            ("statsd.udp_workers", old.udp_workers != new.udp_workers),
            (
                "statsd.udp_recv_buffer",
                old.udp_recv_buffer != new.udp_recv_buffer,
            ),
            ("statsd.tcp_max_line", old.tcp_max_line != new.tcp_max_line),
            (
                "statsd.tcp_max_connections",
                old.tcp_max_connections != new.tcp_max_connections,
            ),
            ("aggregate.flush_queue", old.flush_queue != new.flush_queue),
            (
                "statsd.dogstatsd_socket",
                old.dogstatsd_socket != new.dogstatsd_socket
                    || old.dogstatsd_stream_socket != new.dogstatsd_stream_socket
                    || old.dogstatsd_socket_mode != new.dogstatsd_socket_mode,
            ),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect();
        if !restart.is_empty() {
            tracing::warn!(fields = ?restart, "these settings changed but apply only after a restart");
        }
        self.aggregator.set_limits(new.aggregate, new.parse_limits);
        self.interval.send_replace(new.flush_interval);
        self.sink_config.send_replace(new.sink.clone());
        let applied = Config {
            aggregate: new.aggregate,
            parse_limits: new.parse_limits,
            flush_interval: new.flush_interval,
            sink: new.sink,
            shutdown_timeout: new.shutdown_timeout,
            log_level: new.log_level,
            ..self.config.clone()
        };
        self.config = applied;
        tracing::info!(
            flush_interval = ?self.config.flush_interval,
            max_depth = self.config.aggregate.max_depth,
            max_keys = self.config.aggregate.max_keys,
            clickhouse = %self.config.sink.url,
            "configuration reloaded"
        );
    }
}

/// A protobuf batch read back from the WAL.
fn decode_recorded(block: &[u8]) -> Option<BatchView<'_>> {
    match BatchView::decode(block) {
        Ok(batch) => Some(batch),
        // It decoded when it was accepted: only damage gets here.
        Err(e) => {
            tracing::error!(error = %e, "a protobuf batch in the WAL does not decode; skipped");
            None
        }
    }
}
