//! Start-up phase 3: every stage started (the sink, the replay, the flush
//! loop, the WAL sync task), then the listeners served and READY said.

use super::bind::Listeners;
use super::recover::{Opened, replay};
use super::*;
use crate::ingest::record::Recorder;

/// Start-up phase 3: starts every stage, replays, then serves.
pub(super) async fn serve(
    config: Config,
    listeners: Listeners,
    opened: Opened,
    clock: Clock,
) -> Result<Running, StartError> {
    let Listeners {
        udp_sockets,
        tcp_listener,
        proto_tcp_listener,
        otlp_http_listener,
        otlp_grpc_listener,
        proto_udp_sockets,
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
    let aggregator = Arc::new(Aggregator::starting_at(
        config.aggregate,
        config.parse_limits,
        (Arc::clone(&config.budgets), Arc::clone(&config.keying)),
        clock(),
        recovery.next_generation,
    ));
    let recorder = Recorder::new(Arc::clone(&aggregator), wal.clone());

    let udp_addr = udp_sockets.first().and_then(|s| s.local_addr().ok());
    if let Some(bytes) = udp::receive_buffer(&udp_sockets, config.udp_recv_buffer) {
        telemetry
            .udp_receive_buffer
            .store(bytes as u64, Ordering::Relaxed);
    }
    let tcp_addr = tcp_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (stop, stop_rx) = watch::channel(false);
    let (sink_config, sink_config_rx) = watch::channel(config.sink.clone());
    let state = Arc::new(AdminState {
        telemetry: Arc::clone(&telemetry),
        aggregator: Arc::clone(&aggregator),
        ready: AtomicBool::new(false),
        udp_inodes: udp::inodes(&udp_sockets),
        proto_udp_inodes: udp::inodes(&proto_udp_sockets),
        wal: wal.clone(),
        ledger: Arc::clone(&ledger),
        explore: admin::api::Explore {
            sink: sink_config.subscribe(),
            retention: config.retention,
            flush_interval: config.flush_interval,
            telemetry: Arc::clone(&telemetry),
            queries: Arc::new(tokio::sync::Semaphore::new(admin::api::MAX_QUERIES)),
        },
        host: config.host_id.clone(),
        token: config.admin_token.clone(),
        census: tokio::sync::Mutex::default(),
    });

    let sink = Sink::new(config.sink.clone(), Arc::clone(&telemetry))
        .with_reload(sink_config_rx)
        .with_ledger(Arc::clone(&ledger));
    // Replayed generations beyond the queue are parked in the spool, like
    // any flush that finds the queue full: replay never waits for
    // ClickHouse, and holds one generation in memory at a time.
    let (queue_tx, queue_rx) = mpsc::channel(config.flush_queue.max(1));
    // An edge forwards its flushes to its aggregators instead.
    let sink = match &config.forward {
        Some(forward) => {
            tracing::info!(upstreams = ?forward.upstreams, keep_host = forward.keep_host, "an edge: closed intervals go to the upstream aggregators, not to ClickHouse");
            let forwarder = crate::forward::Forwarder {
                config: forward.clone(),
                host: config.host_id.clone(),
                ledger: Arc::clone(&ledger),
                telemetry: Arc::clone(&telemetry),
            };
            drop(sink);
            tokio::spawn(forwarder.run(queue_rx))
        }
        None => tokio::spawn(prepare_and_run(sink, config.sink.clone(), queue_rx)),
    };
    // A tallyd that writes ClickHouse keeps its rollups and retention.
    let rollups = config.forward.is_none().then(|| {
        let rollups = crate::rollup::Rollups {
            config: sink_config.subscribe(),
            retention: config.retention,
            ledger: Arc::clone(&ledger),
            telemetry: Arc::clone(&telemetry),
        };
        tokio::spawn(rollups.run(stop_rx.clone()))
    });

    // The TTL in flushes at the configured interval (a reload of the
    // interval keeps the count).
    let ttl_flushes = config.gauge_ttl.as_nanos() / config.flush_interval.as_nanos().max(1);
    let mut gauges = GaugeMemory::new(config.aggregate.max_keys)
        .with_ttl(u64::try_from(ttl_flushes).unwrap_or(u64::MAX));
    if let Some(bytes) = recovered.gauges_log_bytes {
        gauges = gauges.with_log_bytes(bytes);
    }
    gauges.remember_saved(std::mem::take(&mut recovered.gauges));
    let mut flusher = Flusher {
        aggregator: Arc::clone(&aggregator),
        ledger: Arc::clone(&ledger),
        gauges,
        host: config.host_id.clone(),
        queue: queue_tx,
        telemetry: Arc::clone(&telemetry),
        clock,
        held: None,
        coarsen: config.spool_coarsen,
        spare: Default::default(),
    };
    let first_open = recovery.next_generation;
    replay(&mut flusher, recovered, recovery, &telemetry, &dedup)
        .await
        .map_err(|source| StartError::DataDir {
            dir: config.data_dir.display().to_string(),
            source,
        })?;
    // The live intervals' keying is on disk before the first of them opens
    // (see `keying`).
    let (fs, dir, keying) = (
        ledger.fs(),
        config.data_dir.clone(),
        Arc::clone(&config.keying),
    );
    blocking(move || super::keying::save(&*fs, &dir, &keying))
        .await
        .and_then(|r| r)
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
        recorder.clone(),
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
    let guard = Arc::new(
        crate::auth::Guard::new(
            config.auth.tls.as_ref(),
            &config.auth.tls_on,
            config.auth.tokens.clone(),
        )
        .map_err(StartError::Tls)?,
    );
    let tcp = tcp_listener.map(|listener| {
        let ingest = TcpIngest {
            guard: Arc::clone(&guard),
            recorder: recorder.clone(),
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
                recorder: recorder.clone(),
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
    let otlp = crate::ingest::otlp::OtlpIngest {
        guard: Arc::clone(&guard),
        recorder: recorder.clone(),
        telemetry: Arc::clone(&telemetry),
        temporality: Arc::clone(&ledger.temporality),
        max_body: config.otlp.max_body,
        resource_tags: config.otlp.resource_tags.clone().into(),
        max_connections: config.otlp.max_connections,
        overload_timeout: config.proto.overload_timeout,
        idle_timeout: config.proto.idle_timeout,
        wal_streams: shared_streams.clone(),
    };
    let replication = match &config.replication {
        None => None,
        Some(r) => {
            let target = crate::replication::link::Target {
                servers: r.servers.clone(),
                auth: r.auth.clone(),
                monitor_urls: r.monitor_urls.clone(),
                spec: r.spec.clone(),
                timeout: r.publish_timeout,
            };
            let link = crate::replication::link::Link::open(
                target,
                Arc::clone(&telemetry),
                stop_rx.clone(),
            )
            .await
            .map_err(StartError::Replication)?;
            Some((link, r.publish_timeout))
        }
    };
    let replication_task = match (&config.replication, &replication) {
        (Some(r), Some(p)) if r.consume => {
            telemetry.replication.start(r.spec.shards, r.max_lag);
            let ttl_flushes =
                config.proto.dedup_window.as_nanos() / config.flush_interval.as_nanos().max(1);
            let consumer = crate::replication::consume::Consumer {
                link: Arc::clone(&p.0),
                stream: r.spec.name.clone(),
                shards: r.spec.shards,
                replicas: r.spec.replicas,
                lease: r.lease,
                host: r.host.clone(),
                holder: format!("{} pid {}", config.host_id, std::process::id()),
                interval: config.flush_interval,
                dir: config.data_dir.join("replication"),
                dedup_window: u64::try_from(ttl_flushes).unwrap_or(u64::MAX),
                max_gauges: config.aggregate.max_keys,
                limits: (config.aggregate, config.parse_limits),
                sink: Sink::new(config.sink.clone(), Arc::clone(&telemetry))
                    .with_reload(sink_config.subscribe())
                    .with_ledger(Arc::clone(&ledger)),
                telemetry: Arc::clone(&telemetry),
            };
            Some(tokio::spawn(
                consumer.run(config.sink.clone(), stop_rx.clone()),
            ))
        }
        (Some(_), Some(_)) => {
            telemetry.replication.start(0, 0);
            None
        }
        _ => None,
    };
    let proto = ProtoIngest {
        replication,
        guard: Arc::clone(&guard),
        recorder: recorder.clone(),
        telemetry: Arc::clone(&telemetry),
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
    let proto_udp_addr = proto_udp_sockets.first().and_then(|s| s.local_addr().ok());
    let mut udp_threads = udp_threads;
    let uds_path = match uds_socket {
        Some((socket, path)) => {
            udp_threads.push(
                crate::ingest::uds::spawn(
                    socket,
                    0,
                    recorder.clone(),
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
    if !proto_udp_sockets.is_empty() {
        let addr = proto_udp_addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        udp_threads.extend(
            proto
                .clone()
                .spawn_udp(proto_udp_sockets, Arc::clone(&udp_stop))
                .map_err(bind_err("protobuf UDP", addr))?,
        );
    }
    let proto_tcp = proto_tcp_listener.map(|l| tokio::spawn(proto.serve_tcp(l, stop_rx.clone())));
    let otlp_http_addr = otlp_http_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok());
    let otlp_grpc_addr = otlp_grpc_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok());
    let otlp_grpc =
        otlp_grpc_listener.map(|l| tokio::spawn(otlp.clone().serve_grpc(l, stop_rx.clone())));
    let otlp_http = otlp_http_listener.map(|l| tokio::spawn(otlp.serve_http(l, stop_rx.clone())));
    let admin = admin_listener.map(|l| {
        let (state, guard) = (Arc::clone(&state), Arc::clone(&guard));
        tokio::spawn(admin::serve(l, state, guard, stop_rx.clone()))
    });

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
    tracing::info!(udp = ?udp_addr, tcp = ?tcp_addr, proto_tcp = ?proto_tcp_addr, proto_udp = ?proto_udp_addr, otlp_http = ?otlp_http_addr, otlp_grpc = ?otlp_grpc_addr, admin = ?admin_addr, tls = ?config.auth.tls_on.iter().map(|l| l.name()).collect::<Vec<_>>(), tokens = config.auth.tokens.is_some(), host = %config.host_id, "tallyd is ready");
    Ok(Running {
        guard,
        udp_addr,
        tcp_addr,
        proto_tcp_addr,
        proto_udp_addr,
        otlp_http_addr,
        otlp_grpc_addr,
        admin_addr,
        proto_tcp,
        otlp_http,
        otlp_grpc,
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
        fs: ledger.fs(),
        tcp,
        flush,
        sink,
        rollups,
        replication: replication_task,
        admin,
        systemd,
        wal,
        wal_sync,
        wal_sync_stop,
    })
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
                let error = sink::describe(&e);
                sink.count_retry(&error);
                if sink::tls::tls_reason(&e).is_some() {
                    tracing::error!(%error, url = %config.url, retry_in = ?delay, "ClickHouse's TLS handshake fails; buffering");
                } else {
                    tracing::warn!(%error, url = %config.url, retry_in = ?delay, "ClickHouse is not usable yet; buffering");
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
    sink.run(queue).await;
}
