//! The admin listener: `GET /health`, `GET /metrics` (Prometheus text),
//! the explorer and status pages (`/`, `/status`, their assets served
//! from the binary) and the JSON API under `/api/` ([`api`], [`status`]).
//!
//! Bound off loopback, every request but `/health` and the page assets
//! needs `Authorization: Bearer <admin token>` (compared in constant
//! time). On loopback without a token, the API and `/metrics` answer only
//! requests whose `Host` is a loopback name (no DNS rebinding). Refusals
//! are counted in `tallyd_admin_refused_total`. At most
//! [`MAX_CONNECTIONS`] connections, each sending its headers within
//! [`HEADER_TIMEOUT`].
//!
//! `/health` answers 200 `ok` once ready; 503 `not ready` before that and
//! while stopping; 503 `degraded: …` naming each problem while:
//! - a WAL sync has failed (no acks are sent);
//! - a closed interval is held (it could not be recorded or released: no
//!   new interval closes and the WAL fills);
//! - the spool is at `spool.hard_limit`, so intervals stay open;
//! - the WAL refused a block as full in the last [`WAL_REFUSED_RECENTLY`];
//! - a table is blocked by schema drift (its rows are kept and retried);
//! - a damaged file was quarantined since the start;
//! - on an edge, its oldest interval not yet taken by its upstreams is
//!   older than `forward.max_lag`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod api;
mod http;
mod page;
mod recent;
pub mod status;

use crate::aggregate::Aggregator;
use crate::aggregate::census::Census;
use crate::ingest::udp;
use crate::telemetry::Telemetry;
use crate::wal::Wal;
use http::Answer;
use std::fmt::Write;
use std::time::Duration;

/// How long `/health` stays degraded after the WAL refused a block.
pub const WAL_REFUSED_RECENTLY: Duration = Duration::from_secs(10);

pub struct AdminState {
    pub telemetry: Arc<Telemetry>,
    pub aggregator: Arc<Aggregator>,
    pub ready: AtomicBool,
    /// Inodes of the UDP sockets, for the kernel's drop counter.
    pub udp_inodes: Vec<u64>,
    /// The protobuf UDP socket's, likewise.
    pub proto_udp_inodes: Vec<u64>,
    pub wal: Option<Arc<Wal>>,
    pub ledger: Arc<crate::ledger::Ledger>,
    /// The explorer's ClickHouse and the rollup rule's inputs.
    pub explore: api::Explore,
    /// The rows' host (shown on the status page).
    pub host: String,
    /// Required of API requests when set (`admin_token_file` or
    /// `TALLYD_ADMIN_TOKEN`).
    pub token: Option<String>,
    /// The scans of the last minute, merged, and when the last was taken
    /// (one scan serves every request within [`CENSUS_AGE`]).
    pub census: tokio::sync::Mutex<CensusCache>,
}

#[derive(Debug, Default)]
pub struct CensusCache {
    recent: recent::Recent,
    merged: Option<(std::time::Instant, Arc<Census>)>,
}

/// Admin connections open at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a census serves before the series table is scanned again.
pub const CENSUS_AGE: Duration = Duration::from_secs(2);

impl AdminState {
    /// `/metrics`: the counters plus values read at scrape time.
    pub fn metrics(&self) -> String {
        let t = &self.telemetry;
        let current = self.aggregator.current();
        t.live_keys.store(current.keys() as u64, Relaxed);
        t.series_keys
            .store(self.aggregator.series_len() as u64, Relaxed);
        t.pending_samples
            .store(current.pending.load(Relaxed), Relaxed);
        let started = current.started;
        drop(current);
        if let Some(drops) = udp::kernel_drops(&self.udp_inodes) {
            t.udp_kernel_drops.store(drops, Relaxed);
        }
        if let Some(drops) = udp::kernel_drops(&self.proto_udp_inodes) {
            t.proto_udp_kernel_drops.store(drops, Relaxed);
        }
        let mut text = t.render();
        let _ = writeln!(
            text,
            "# HELP tallyd_files_quarantined Damaged files (spool, state) moved aside to <name>.damaged since the start; their contents are lost.\n# TYPE tallyd_files_quarantined gauge\ntallyd_files_quarantined {}",
            self.ledger.quarantined().len()
        );
        if let Some(wal) = &self.wal {
            let oldest = self.ledger.oldest_pending_ts().map_or(started, |ts| {
                Duration::from_secs(u64::from(ts)).min(started)
            });
            let age = crate::clock::wall_clock().saturating_sub(oldest);
            wal_metrics(&mut text, wal, age);
            crate::telemetry::render_wal_sync(&mut text, &wal.stats.sync_latency);
        }
        text
    }

    /// What makes tallyd degraded now, one phrase each.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.wal.as_ref().is_some_and(|w| w.poisoned()) {
            p.push(
                "a WAL sync failed; no acknowledgement is sent until a full sync succeeds".into(),
            );
        }
        let t = &self.telemetry;
        if t.flush_held.load(Relaxed) == 1 {
            p.push(format!(
                "a closed interval is held and not sent ({}); no new interval closes until it is recorded, and the WAL fills",
                crate::lock(&t.flush_held_error)
            ));
        }
        if t.spool_full.load(Relaxed) == 1 {
            p.push("the spool is at spool.hard_limit (ClickHouse has not taken the backlog): intervals stay open and coarsen in memory, and the WAL fills".into());
        }
        let refused = t.wal_refused_ms.load(Relaxed);
        let now = crate::telemetry::unix_ms();
        if refused != 0 && now.saturating_sub(refused) < WAL_REFUSED_RECENTLY.as_millis() as u64 {
            p.push(format!(
                "the WAL was full in the last {} s: StatsD blocks were dropped (tallyd_dropped_total{{reason=\"wal_full\"}}), protobuf batches answered OVERLOADED",
                WAL_REFUSED_RECENTLY.as_secs()
            ));
        }
        let max_lag = t.fleet.max_lag_secs.load(Relaxed);
        let oldest = t.backlog_oldest.load(Relaxed);
        let lag = (now / 1000).saturating_sub(oldest);
        if max_lag > 0 && oldest > 0 && lag > max_lag {
            p.push(format!(
                "the upstreams have not taken this edge's intervals for {lag} s (forward.max_lag: {max_lag} s): they wait in the spool ({} flushes; tallyd_forward_upstream_up says which upstream is down)",
                t.backlog_batches.load(Relaxed)
            ));
        }
        if let Some(error) = t.clickhouse_tls_failure() {
            p.push(format!(
                "ClickHouse's TLS handshake fails, so nothing is written (the rows wait in the spool): {error}"
            ));
        }
        let quarantined = self.ledger.quarantined();
        if !quarantined.is_empty() {
            p.push(format!(
                "{} damaged file(s) moved aside since the start, their contents lost (inspect, then remove them; a restart clears this): {}",
                quarantined.len(),
                quarantined.join(", ")
            ));
        }
        p.extend(t.replication.problems());
        let rollups = &self.telemetry.rollups;
        if rollups.flushes_table_blocked.load(Relaxed) == 1 {
            p.push("ClickHouse refuses rows of the flushes table (schema drift; see `tallyd schema`): the rows are given up, and rollups of their minutes may be missed until it is fixed".into());
        }
        let lag = rollups.lag_seconds.load(Relaxed);
        if lag > crate::telemetry::rollup::MAX_LAG_SECS {
            p.push(format!(
                "rollups are {lag} s behind ({} pending; tallyd_rollup_errors_total counts the failures)",
                rollups.pending.load(Relaxed)
            ));
        }
        for (i, table) in crate::telemetry::TABLES.iter().enumerate() {
            if self.telemetry.tables_blocked[i].load(Relaxed) == 1 {
                p.push(format!(
                    "ClickHouse refuses rows of table {table} (schema drift); they are kept and retried"
                ));
            }
        }
        p
    }

    /// `/health`'s status word and problems.
    fn health(&self) -> (&'static str, Vec<String>) {
        if !self.ready.load(Relaxed) {
            return ("not ready", Vec::new());
        }
        match self.problems() {
            p if p.is_empty() => ("ok", p),
            p => ("degraded", p),
        }
    }

    /// `None` while ClickHouse takes tallyd's statements, else (seconds it
    /// has failed every one, its last error).
    fn clickhouse_failing(&self) -> Option<(u64, String)> {
        let t = &self.telemetry;
        (t.clickhouse_failing_since_ms.load(Relaxed) != 0).then(|| {
            (
                t.clickhouse_failing_secs(),
                crate::lock(&t.clickhouse_last_error).clone(),
            )
        })
    }

    /// The metrics of the last minute ([`recent`]), with a new scan of the
    /// series table when the last is older than [`CENSUS_AGE`] (off the
    /// tokio workers: a scan of a million keys takes tens of ms).
    async fn census(&self) -> Arc<Census> {
        let mut cache = self.census.lock().await;
        if let Some((at, merged)) = &cache.merged
            && at.elapsed() < CENSUS_AGE
        {
            return Arc::clone(merged);
        }
        let aggregator = Arc::clone(&self.aggregator);
        let Ok(scan) = tokio::task::spawn_blocking(move || aggregator.census()).await else {
            return Arc::default();
        };
        let now = std::time::Instant::now();
        cache.recent.add(&scan, now);
        let merged = Arc::new(cache.recent.census(scan.open_secs));
        cache.merged = Some((now, Arc::clone(&merged)));
        merged
    }

    /// The refusal of a request that may not read the API, counted: with a
    /// token set, one that does not carry it; without (a loopback
    /// listener), one that names another host than a loopback one (a page
    /// elsewhere whose name was rebound to 127.0.0.1 names its own: DNS
    /// rebinding).
    fn refusal(&self, req: &Request<Incoming>, peer: &str) -> Option<Answer> {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let refused = match &self.token {
            None if header(hyper::header::HOST).is_some_and(|h| !loopback_host(h)) => {
                Answer::error(
                    StatusCode::FORBIDDEN,
                    "this loopback admin listener answers requests for localhost or 127.0.0.1 only (the Host header named another)",
                )
            }
            None => return None,
            Some(token) => {
                let given = header(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
                let reason = match given {
                    Some((_, t)) if same(t.trim().as_bytes(), token.as_bytes()) => return None,
                    Some(_) => crate::auth::Refusal::TokenWrong,
                    None => crate::auth::Refusal::TokenMissing,
                };
                let listener = crate::auth::Listener::Admin;
                let detail = "no admin token, or a wrong one";
                self.telemetry
                    .refused
                    .refuse(listener, reason, peer, detail);
                Answer::error(
                    StatusCode::UNAUTHORIZED,
                    "this admin listener needs Authorization: Bearer <token> (admin_token_file or TALLYD_ADMIN_TOKEN)",
                )
                .challenge()
            }
        };
        self.telemetry.admin_refused.fetch_add(1, Relaxed);
        Some(refused)
    }

    async fn respond(&self, req: Request<Incoming>, peer: &str) -> Answer {
        let path = req.uri().path().to_owned();
        let api = path.starts_with("/api/");
        if req.method() != Method::GET {
            return match api {
                true => Answer::error(StatusCode::METHOD_NOT_ALLOWED, "GET only"),
                false => Answer::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
            };
        }
        match path.as_str() {
            "/health" => {
                return match self.health() {
                    ("ok", _) => Answer::text(StatusCode::OK, "ok\n".into()),
                    ("degraded", p) => Answer::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("degraded: {}\n", p.join("; ")),
                    ),
                    _ => Answer::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
                };
            }
            p => {
                if let Some((kind, body)) = page::asset(p) {
                    return Answer::asset(kind, body);
                }
            }
        }
        if let Some(refused) = self.refusal(&req, peer) {
            return refused;
        }
        let now = crate::clock::wall_clock();
        let now_secs = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        let params = match api::Params::parse(req.uri().query()) {
            Ok(p) => p,
            Err(e) => return Answer::error(e.status, &e.message),
        };
        let answer = match path.as_str() {
            "/metrics" => {
                let text = tokio::task::block_in_place(|| self.metrics());
                return Answer::text(StatusCode::OK, text);
            }
            "/api/status" => match params.only(&[]) {
                Ok(()) => Ok(status::Status {
                    time: now.as_secs_f64(),
                    host: &self.host,
                    flush_interval: self.explore.flush_interval.as_secs().max(1),
                    health: self.health(),
                    // Reads /proc/net/udp: off the async worker.
                    metrics: &tokio::task::block_in_place(|| self.metrics()),
                    census: &*self.census().await,
                    clickhouse_failing: self.clickhouse_failing(),
                }
                .to_json()),
                Err(e) => Err(e),
            },
            "/api/metrics" => api::metrics(&*self.census().await, &params),
            "/api/series" => match api::ChartRequest::parse(&params, now_secs) {
                Ok(chart) => {
                    let open = self.aggregator.current().started.as_secs();
                    let flushed = u32::try_from(open).unwrap_or(u32::MAX);
                    self.explore.series(&chart, now_secs, flushed).await
                }
                Err(e) => Err(e),
            },
            "/api/events" => self.explore.events(&params, now_secs).await,
            _ if api => Err(api::ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint: /api/status, /api/metrics, /api/series, /api/events"
                    .into(),
            }),
            _ => {
                return Answer::text(
                    StatusCode::NOT_FOUND,
                    "not found: try /, /status, /health, /metrics or /api/status\n".into(),
                );
            }
        };
        match answer {
            Ok(v) => Answer::json(StatusCode::OK, &v),
            Err(e) => Answer::error(e.status, &e.message),
        }
    }
}

/// Whether a `Host` header names this machine by loopback: `localhost`,
/// `127.x.y.z` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Equal bytes, compared in time that depends on the lengths only
/// (`subtle`, as [`crate::auth::Tokens`]).
fn same(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

fn wal_metrics(out: &mut String, wal: &Wal, oldest_age: Duration) {
    let streams = wal.usage_by_stream();
    let (used, free) = streams
        .iter()
        .fold((0, 0), |(u, f), (used, free)| (u + used, f + free));
    let s = &wal.stats;
    let rows: [(&str, &str, &str, String); 11] = [
        (
            "tallyd_wal_used_bytes",
            "gauge",
            "WAL ring bytes holding records not yet confirmed by ClickHouse.",
            used.to_string(),
        ),
        (
            "tallyd_wal_free_bytes",
            "gauge",
            "WAL ring bytes free for new records.",
            free.to_string(),
        ),
        (
            "tallyd_wal_oldest_unflushed_seconds",
            "gauge",
            "Age of the oldest interval whose records the WAL still holds.",
            format!("{:.3}", oldest_age.as_secs_f64()),
        ),
        (
            "tallyd_wal_confirmed_generation",
            "gauge",
            "Every interval up to this one is in ClickHouse.",
            wal.confirmed().to_string(),
        ),
        (
            "tallyd_wal_records_total",
            "counter",
            "Records appended.",
            s.records.load(Relaxed).to_string(),
        ),
        (
            "tallyd_wal_bytes_total",
            "counter",
            "Bytes appended, headers and padding included.",
            s.bytes.load(Relaxed).to_string(),
        ),
        (
            "tallyd_wal_full_total",
            "counter",
            "Appends refused because the ring was full.",
            s.full.load(Relaxed).to_string(),
        ),
        (
            "tallyd_wal_sync_errors_total",
            "counter",
            "Failed msync or fdatasync calls.",
            s.sync_errors.load(Relaxed).to_string(),
        ),
        (
            "tallyd_wal_replayed_records",
            "gauge",
            "Records replayed at start.",
            s.replayed_records.load(Relaxed).to_string(),
        ),
        (
            "tallyd_wal_replayed_bytes",
            "gauge",
            "Payload bytes replayed at start.",
            s.replayed_bytes.load(Relaxed).to_string(),
        ),
        (
            "tallyd_wal_replay_seconds",
            "gauge",
            "Time the start-up scan of the WAL took.",
            format!("{:.6}", s.replay_micros.load(Relaxed) as f64 / 1e6),
        ),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP tallyd_wal_stream_used_bytes WAL bytes holding records not yet confirmed, per stream (one per ingest worker).\n# TYPE tallyd_wal_stream_used_bytes gauge"
    );
    for (i, (used, _)) in streams.iter().enumerate() {
        let _ = writeln!(out, "tallyd_wal_stream_used_bytes{{stream=\"{i}\"}} {used}");
    }
    let _ = writeln!(
        out,
        "# HELP tallyd_wal_stream_free_bytes WAL bytes free for new records, per stream.\n# TYPE tallyd_wal_stream_free_bytes gauge"
    );
    for (i, (_, free)) in streams.iter().enumerate() {
        let _ = writeln!(out, "tallyd_wal_stream_free_bytes{{stream=\"{i}\"}} {free}");
    }
    let _ = writeln!(
        out,
        "# HELP tallyd_wal_recovery_events_total Torn tails truncated and corrupt records skipped at start.\n# TYPE tallyd_wal_recovery_events_total counter\ntallyd_wal_recovery_events_total{{event=\"torn_tail\"}} {}\ntallyd_wal_recovery_events_total{{event=\"corrupt_skipped\"}} {}",
        s.torn_tails.load(Relaxed),
        s.corrupt_skipped.load(Relaxed)
    );
}

/// Serves until `stop` turns true, through the stream listeners' accept
/// loop: at most [`MAX_CONNECTIONS`] (more are closed at once, before any
/// request is read), each sending its headers within [`HEADER_TIMEOUT`];
/// at `stop` each finishes its request under way.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    guard: Arc<crate::auth::Guard>,
    stop: watch::Receiver<bool>,
) {
    let gate = crate::ingest::Gate {
        listener: crate::auth::Listener::Admin,
        guard,
        telemetry: Arc::clone(&state.telemetry),
        alpn: crate::auth::tls::Alpn::Http1,
    };
    // Admin connections use no WAL stream and are not counted as ingest's.
    crate::ingest::serve_connections(
        listener,
        MAX_CONNECTIONS,
        0..1,
        None,
        Some(gate),
        stop,
        move |stream, _, stop| {
            let state = Arc::clone(&state);
            let peer: Arc<str> = stream.peer().into();
            let svc = service_fn(move |req: Request<Incoming>| {
                let (state, peer) = (Arc::clone(&state), Arc::clone(&peer));
                let gzip = http::accepts_gzip(req.headers());
                async move {
                    Ok::<_, Infallible>(state.respond(req, &peer).await.into_response(gzip))
                }
            });
            crate::ingest::serve_http1(stream, svc, HEADER_TIMEOUT, stop)
        },
    )
    .await;
}
