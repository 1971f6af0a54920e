//! Validation: the settings, checked field by field, into the [`Config`]
//! the runtime trusts (the WAL's in [`super::wal`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::level_filters::LevelFilter;

use super::{ConfigError, Overrides, Settings, duration, err, hostname, listen, size};
use crate::aggregate::AggregateLimits;
use crate::aggregate::budget::Budgets;
use crate::aggregate::mapping::{Keying, KeyingSettings};
use crate::protocol::dialect::Dialects;
use crate::protocol::statsd::Limits;
use crate::sink::SinkConfig;
use crate::wal::WalConfig;

impl Settings {
    /// Parses a TOML document.
    pub fn from_toml(text: &str, origin: &str) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e| err(origin, e.to_string().trim_end().to_owned()))
    }

    /// Reads the file (or takes the defaults), then applies the environment's
    /// password and the overrides.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let mut settings = match path {
            Some(p) => {
                let origin = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| err(&origin, e.to_string()))?;
                Settings::from_toml(&text, &origin)?
            }
            None => Settings::default(),
        };
        if let Ok(pw) = std::env::var("TALLYD_CLICKHOUSE_PASSWORD") {
            settings.clickhouse.password = pw;
        }
        if let Ok(token) = std::env::var("TALLYD_ADMIN_TOKEN") {
            settings.admin_token = token;
        }
        if settings.admin_token.is_empty() && !settings.admin_token_file.is_empty() {
            let path = &settings.admin_token_file;
            let text = std::fs::read_to_string(path)
                .map_err(|e| err("admin_token_file", format!("cannot read {path:?}: {e}")))?;
            settings.admin_token = text.lines().next().unwrap_or("").trim().to_owned();
            if settings.admin_token.is_empty() {
                return Err(err("admin_token_file", format!("{path:?} holds no token")));
            }
        }
        overrides.apply(&mut settings);
        Ok(settings)
    }

    /// The settings as TOML, with the password redacted and an empty
    /// `host_id` shown as the hostname the rows will carry.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        // The host the rows will carry, as `validate` resolves it.
        if shown.host_id.is_empty() {
            shown.host_id = hostname();
        }
        if !shown.clickhouse.password.is_empty() {
            shown.clickhouse.password = "<redacted>".into();
        }
        if !shown.admin_token.is_empty() {
            shown.admin_token = "<redacted>".into();
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print settings: {e}\n"))
    }

    /// Checks every field and converts units.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let s = &self.statsd;
        let a = &self.aggregate;
        let c = &self.clickhouse;
        let flush_interval = duration("aggregate.flush_interval", &a.flush_interval)?;
        if flush_interval < Duration::from_millis(10) {
            return Err(err("aggregate.flush_interval", "must be at least 10ms"));
        }
        let spool_max_size = size("spool.max_size", &self.spool.max_size)? as u64;
        let spool_hard_limit = size("spool.hard_limit", &self.spool.hard_limit)? as u64;
        if spool_hard_limit < spool_max_size {
            return Err(err(
                "spool.hard_limit",
                "must be at least spool.max_size (past max_size intervals merge; at hard_limit they stay open)",
            ));
        }
        let gauge_ttl = duration("aggregate.gauge_ttl", &a.gauge_ttl)?;
        if gauge_ttl < flush_interval {
            return Err(err(
                "aggregate.gauge_ttl",
                "must be at least aggregate.flush_interval (a gauge is kept for whole intervals)",
            ));
        }
        let retry_initial = duration("clickhouse.retry_initial", &c.retry_initial)?;
        let retry_max = duration("clickhouse.retry_max", &c.retry_max)?;
        if retry_initial.is_zero() || retry_max < retry_initial {
            return Err(err(
                "clickhouse.retry_max",
                "must be at least clickhouse.retry_initial, which must be above 0",
            ));
        }
        let host_id = if self.host_id.is_empty() {
            hostname()
        } else {
            self.host_id.clone()
        };
        if let Some(bad) = [
            ("aggregate.max_depth", a.max_depth as usize),
            ("aggregate.max_keys", a.max_keys),
            ("aggregate.max_set_members", a.max_set_members),
            ("aggregate.flush_queue", a.flush_queue),
            ("statsd.tcp_max_connections", s.tcp_max_connections),
            ("statsd.max_name_len", s.max_name_len),
            ("statsd.max_tag_len", s.max_tag_len),
        ]
        .iter()
        .find(|(_, v)| *v == 0)
        {
            return Err(err(bad.0, "must be at least 1"));
        }
        if !c.url.starts_with("http://") && !c.url.starts_with("https://") {
            return Err(err(
                "clickhouse.url",
                format!("{:?} is not an http:// URL", c.url),
            ));
        }
        if let Some(bad) = c
            .replicas
            .iter()
            .find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            return Err(err(
                "clickhouse.replicas",
                format!("{bad:?} is not an http:// URL"),
            ));
        }
        let ca = super::auth::pem("clickhouse.ca_file", &c.ca_file, false)?;
        let mut warnings = Vec::new();
        let auth = self.auth_config(&mut warnings)?;
        let https = std::iter::once(&c.url)
            .chain(&c.replicas)
            .any(|u| u.starts_with("https://"));
        let system = if https && ca.is_none() {
            let roots = crate::sink::tls::SystemRoots::load();
            if roots.is_empty() {
                warnings.push(
                    "no system root certificates found; set clickhouse.ca_file for an https:// ClickHouse".into(),
                );
            }
            roots
        } else {
            Default::default()
        };
        let tls = crate::sink::tls::TlsFiles {
            system,
            ca,
            client: super::auth::client_pair("clickhouse", &c.client_cert, &c.client_key)?,
        };
        // The files parse; now rustls must take them together (a version 1
        // certificate, a key that does not match the certificate...).
        if tls.ca.is_some() || tls.client.is_some() {
            crate::sink::tls::client(&tls).map_err(|e| {
                let field = if tls.client.is_some() {
                    "clickhouse.client_cert"
                } else {
                    "clickhouse.ca_file"
                };
                err(field, e)
            })?;
        }
        if tls
            .ca
            .as_ref()
            .is_some_and(|ca| crate::sink::tls::pinned_self_signed(ca) > 0)
        {
            warnings.push(
                "clickhouse.ca_file holds a self-signed CA certificate (CA:TRUE, as `openssl req -x509` makes it on OpenSSL 3): a server that presents exactly that certificate is trusted, pinned, with its name and validity still checked (as curl --cacert does; WebPKI alone would refuse a CA as the server's own)".into(),
            );
        }
        if c.database.is_empty() {
            return Err(err("clickhouse.database", "must not be empty"));
        }
        let tcp_max_line = size("statsd.tcp_max_line", &s.tcp_max_line)?;
        if tcp_max_line < 64 {
            return Err(err("statsd.tcp_max_line", "must be at least 64B"));
        }
        let udp_workers = if s.udp_workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            s.udp_workers
        };
        let max_frame = size("proto.max_frame", &self.proto.max_frame)?.max(1);
        let (wal, udp_wal_streams) = self.wal_config(udp_workers, max_frame as u64)?;
        let p = &self.proto;
        if p.max_connections == 0 {
            return Err(err("proto.max_connections", "must be at least 1"));
        }
        let proto = ProtoConfig {
            tcp: listen("proto.tcp", &p.tcp)?,
            udp: listen("proto.udp", &p.udp)?,
            max_frame,
            max_connections: p.max_connections,
            overload_timeout: duration("proto.overload_timeout", &p.overload_timeout)?,
            dedup_window: duration("proto.dedup_window", &p.dedup_window)?,
            max_clients: p.max_clients.max(1),
            idle_timeout: duration("proto.idle_timeout", &p.idle_timeout)?,
        };
        let forward = self.forward_config()?;
        let retention = self.retention_config()?;
        let otlp = self.otlp_config()?;
        let budgets = Arc::new(self.budgets()?);
        let keying = Keying::compile(&KeyingSettings {
            format: 0,
            tag_dialects: self.statsd.tag_dialects.clone(),
            mapping: self.mapping.clone(),
        })
        .map_err(|(field, why)| err(&field, why))?;
        let replication = self.replication_config()?;
        if forward.is_some() && replication.as_ref().is_some_and(|r| r.consume) {
            return Err(err(
                "replication.consume",
                "an edge (forward.upstreams) does not write ClickHouse, so it cannot aggregate the stream: set consume = false, and let the tallyds that write ClickHouse consume it",
            ));
        }
        Ok(Config {
            replication,
            warnings,
            auth,
            budgets,
            keying: Arc::new(keying),
            forward,
            retention,
            wal,
            spool_max_size,
            spool_hard_limit,
            spool_coarsen: duration("spool.coarsen", &self.spool.coarsen)?,
            spool_drain_batch: size("spool.drain_batch", &self.spool.drain_batch)? as u64,
            udp_wal_streams,
            proto,
            otlp,
            host_id,
            data_dir: PathBuf::from(&self.data_dir),
            log_level: self.log_level.parse::<LevelFilter>().map_err(|_| {
                err(
                    "log_level",
                    format!(
                        "{:?} is not one of off, error, warn, info, debug, trace",
                        self.log_level
                    ),
                )
            })?,
            admin: listen("admin", &self.admin)?,
            admin_token: admin_token(listen("admin", &self.admin)?, &self.admin_token)?,
            shutdown_timeout: duration("shutdown_timeout", &self.shutdown_timeout)?,
            statsd_udp: listen("statsd.udp", &s.udp)?,
            statsd_tcp: listen("statsd.tcp", &s.tcp)?,
            dogstatsd_socket: socket_path("statsd.dogstatsd_socket", &s.dogstatsd_socket)?,
            dogstatsd_stream_socket: socket_path(
                "statsd.dogstatsd_stream_socket",
                &s.dogstatsd_stream_socket,
            )?,
            dogstatsd_socket_mode: u32::from_str_radix(
                s.dogstatsd_socket_mode.trim_start_matches("0o"),
                8,
            )
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                err(
                    "statsd.dogstatsd_socket_mode",
                    format!(
                        "{:?} is not an octal file mode such as \"0622\"",
                        s.dogstatsd_socket_mode
                    ),
                )
            })?,
            udp_workers,
            udp_recv_buffer: size("statsd.udp_recv_buffer", &s.udp_recv_buffer)?,
            tcp_max_line,
            tcp_max_connections: s.tcp_max_connections,
            tcp_idle_timeout: duration("statsd.tcp_idle_timeout", &s.tcp_idle_timeout)?,
            parse_limits: Limits {
                max_name_len: s.max_name_len,
                max_tags: s.max_tags,
                max_tag_len: s.max_tag_len,
                // The aggregator reads lines with each interval's own
                // dialects (`keying`).
                dialects: Dialects::default(),
            },
            aggregate: AggregateLimits {
                max_keys: a.max_keys,
                max_set_members: a.max_set_members,
                max_depth: a.max_depth,
                max_memory: size("aggregate.max_memory", &a.max_memory)? as u64,
                timestamp_window: duration("aggregate.timestamp_window", &a.timestamp_window)?,
                interval: flush_interval,
            },
            flush_interval,
            gauge_ttl,
            flush_queue: a.flush_queue,
            sink: SinkConfig {
                url: c.url.clone(),
                database: c.database.clone(),
                user: c.user.clone(),
                password: c.password.clone(),
                create_schema: c.create_schema,
                timeout: duration("clickhouse.timeout", &c.timeout)?,
                retry_initial,
                retry_max,
                tls,
                replicas: c.replicas.clone(),
                cluster: (!c.cluster.is_empty()).then(|| c.cluster.clone()),
                dedup_window: c.dedup_window,
            },
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// What is valid but worth saying (`check-config` prints them, a start
    /// or a reload logs them).
    pub warnings: Vec<String>,
    /// TLS on the listeners and the ingest tokens.
    pub auth: super::AuthConfig,
    /// Acknowledged batches stored by NATS JetStream before `OK`.
    pub replication: Option<super::ReplicationConfig>,
    pub host_id: String,
    pub data_dir: PathBuf,
    pub log_level: LevelFilter,
    pub admin: Option<SocketAddr>,
    /// Required of admin API requests when set.
    pub admin_token: Option<String>,
    pub shutdown_timeout: Duration,
    pub statsd_udp: Option<SocketAddr>,
    pub statsd_tcp: Option<SocketAddr>,
    /// The DogStatsD Unix datagram socket, and its file mode.
    pub dogstatsd_socket: Option<PathBuf>,
    pub dogstatsd_stream_socket: Option<PathBuf>,
    pub dogstatsd_socket_mode: u32,
    pub udp_workers: usize,
    pub udp_recv_buffer: usize,
    pub tcp_max_line: usize,
    pub tcp_max_connections: usize,
    pub tcp_idle_timeout: Duration,
    pub parse_limits: Limits,
    pub aggregate: AggregateLimits,
    pub flush_interval: Duration,
    /// `aggregate.gauge_ttl`: see [`crate::outbox::gauges::GaugeMemory`].
    pub gauge_ttl: Duration,
    pub flush_queue: usize,
    pub sink: SinkConfig,
    /// `None` when the WAL is disabled.
    pub wal: Option<WalConfig>,
    /// `spool.max_size`, bytes.
    pub spool_max_size: u64,
    /// `spool.hard_limit`, bytes.
    pub spool_hard_limit: u64,
    /// `spool.coarsen`: see [`crate::flush::Flusher::coarsen`].
    pub spool_coarsen: Duration,
    /// `spool.drain_batch`, bytes.
    pub spool_drain_batch: u64,
    /// WAL streams the UDP workers share (worker `i` appends to stream
    /// `i % udp_wal_streams`); the TCP streams come after them.
    pub udp_wal_streams: usize,
    pub proto: ProtoConfig,
    pub otlp: OtlpConfig,
    /// `Some`: this tallyd is an edge (see [`crate::forward`]).
    pub forward: Option<ForwardConfig>,
    /// How long rows are kept at each resolution (`[retention]`).
    pub retention: crate::rollup::Retention,
    /// Per-metric key budgets (`[cardinality]`).
    pub budgets: Arc<Budgets>,
    /// Tag dialects and mapping rules (`statsd.tag_dialects`,
    /// `[[mapping]]`).
    pub keying: Arc<Keying>,
}

/// An edge's upstreams (`[forward]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardConfig {
    /// `host:port` of each aggregator, as written (resolved at connect).
    pub upstreams: Vec<String>,
    /// Rows keep this host (`forward.host = "keep"`)...
    pub keep_host: bool,
    /// ...except those of names matching these globs.
    pub host_except: Vec<String>,
    pub batch_size: usize,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// `/health` is degraded past this lag.
    pub max_lag: Duration,
    /// TLS to the upstreams (`forward.tls`): roots and client certificate.
    pub tls: Option<crate::sink::tls::TlsFiles>,
    /// The token sent first on each connection.
    pub token: Option<crate::auth::Secret>,
}

/// The protobuf listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtoConfig {
    pub tcp: Option<SocketAddr>,
    pub udp: Option<SocketAddr>,
    pub max_frame: usize,
    pub max_connections: usize,
    pub overload_timeout: Duration,
    pub dedup_window: Duration,
    pub max_clients: usize,
    pub idle_timeout: Duration,
}

/// The OTLP listener (`[otlp]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub max_body: usize,
    pub resource_tags: Vec<String>,
    pub max_staleness: Duration,
    pub max_connections: usize,
}

impl Settings {
    fn otlp_config(&self) -> Result<OtlpConfig, ConfigError> {
        let o = &self.otlp;
        let max_body = size("otlp.max_body", &o.max_body)?;
        if max_body < 1024 {
            return Err(err("otlp.max_body", "must be at least 1KiB"));
        }
        if o.max_connections == 0 {
            return Err(err("otlp.max_connections", "must be at least 1"));
        }
        if let Some(bad) = o.resource_tags.iter().find(|t| t.is_empty()) {
            return Err(err(
                "otlp.resource_tags",
                format!("{bad:?}: an attribute key must not be empty"),
            ));
        }
        let max_staleness = duration("otlp.max_staleness", &o.max_staleness)?;
        let flush_interval = duration("aggregate.flush_interval", &self.aggregate.flush_interval)?;
        if max_staleness < flush_interval {
            return Err(err(
                "otlp.max_staleness",
                "must be at least aggregate.flush_interval (it is counted in whole intervals)",
            ));
        }
        Ok(OtlpConfig {
            http: listen("otlp.http", &o.http)?,
            grpc: listen("otlp.grpc", &o.grpc)?,
            max_body,
            resource_tags: o.resource_tags.clone(),
            max_staleness,
            max_connections: o.max_connections,
        })
    }

    fn retention_config(&self) -> Result<crate::rollup::Retention, ConfigError> {
        let r = &self.retention;
        let raw = duration("retention.raw", &r.raw)?;
        let minute = duration("retention.minute", &r.minute)?;
        let hour = duration("retention.hour", &r.hour)?;
        let day = Duration::from_secs(86_400);
        for (field, d) in [
            ("retention.raw", raw),
            ("retention.minute", minute),
            ("retention.hour", hour),
        ] {
            if d < day {
                return Err(err(
                    field,
                    "must be at least 1d: rows are dropped a whole day's partition at a time",
                ));
            }
        }
        if minute < raw {
            return Err(err(
                "retention.minute",
                format!(
                    "{:?} is shorter than retention.raw ({:?}): a minute's rollup must outlive the raw rows it is computed from",
                    r.minute, r.raw
                ),
            ));
        }
        if hour < minute {
            return Err(err(
                "retention.hour",
                format!(
                    "{:?} is shorter than retention.minute ({:?}): an hour's rollup must outlive the minutes it is computed from",
                    r.hour, r.minute
                ),
            ));
        }
        Ok(crate::rollup::Retention { raw, minute, hour })
    }

    fn forward_config(&self) -> Result<Option<ForwardConfig>, ConfigError> {
        let f = &self.forward;
        let keep_host = match f.host.as_str() {
            "keep" => true,
            "drop" => false,
            other => {
                return Err(err(
                    "forward.host",
                    format!("{other:?} is not keep or drop"),
                ));
            }
        };
        let batch_size = size("forward.batch_size", &f.batch_size)?;
        if batch_size < 4096 {
            return Err(err("forward.batch_size", "must be at least 4KiB"));
        }
        let mut upstreams = Vec::new();
        for u in &f.upstreams {
            let ok = u.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(err("forward.upstreams", format!("{u:?} is not host:port")));
            }
            if upstreams.contains(u) {
                return Err(err(
                    "forward.upstreams",
                    format!(
                        "{u:?} is listed twice: each key goes to one upstream, so a second entry would only move keys"
                    ),
                ));
            }
            upstreams.push(u.clone());
        }
        if upstreams.is_empty() {
            return Ok(None);
        }
        if f.host_except.iter().any(String::is_empty) {
            return Err(err(
                "forward.host_except",
                "an empty pattern matches no name (use \"*\" for every name)",
            ));
        }
        let (tls, token) = self.forward_auth()?;
        Ok(Some(ForwardConfig {
            tls,
            token,
            upstreams,
            keep_host,
            host_except: f.host_except.clone(),
            batch_size,
            timeout: duration("forward.timeout", &f.timeout)?,
            retry_initial: duration("forward.retry_initial", &f.retry_initial)?,
            retry_max: duration("forward.retry_max", &f.retry_max)?,
            max_lag: duration("forward.max_lag", &f.max_lag)?,
        }))
    }
}

impl Settings {
    fn budgets(&self) -> Result<Budgets, ConfigError> {
        let c = &self.cardinality;
        if c.max_keys == 0 {
            return Err(err("cardinality.max_keys", "must be at least 1"));
        }
        let mut rules = Vec::with_capacity(c.metric.len());
        for (i, m) in c.metric.iter().enumerate() {
            let field = |f: &str| format!("cardinality.metric[{i}].{f}");
            if m.name.is_empty() {
                return Err(err(
                    &field("name"),
                    "must be a glob over metric names, such as \"api.*\"",
                ));
            }
            if m.max_keys == 0 {
                return Err(err(&field("max_keys"), "must be at least 1"));
            }
            rules.push((m.name.clone(), m.max_keys));
        }
        Ok(Budgets {
            default: c.max_keys,
            rules,
        })
    }
}

/// A Unix socket path setting: absolute, or empty / `off`.
fn socket_path(field: &str, path: &str) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        "" | "off" => Ok(None),
        p if !p.starts_with('/') => Err(err(field, format!("{p:?} is not an absolute path"))),
        p => Ok(Some(PathBuf::from(p))),
    }
}

/// The admin token, checked: required when the admin listener is not on
/// loopback (its API reads ClickHouse and names every metric).
fn admin_token(admin: Option<SocketAddr>, token: &str) -> Result<Option<String>, ConfigError> {
    let token = token.trim();
    match admin {
        Some(addr) if !addr.ip().is_loopback() && token.is_empty() => Err(err(
            "admin_token",
            format!(
                "admin listens on {addr}, off loopback: set admin_token_file (or TALLYD_ADMIN_TOKEN) so that its API needs a token, or bind it to 127.0.0.1"
            ),
        )),
        _ if token.len() > 4096 => Err(err("admin_token", "is longer than 4096 bytes")),
        // An HTTP header carries it: anything else could never match.
        _ if token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) => Err(err(
            "admin_token",
            "must be visible ASCII: no spaces, control characters or other bytes",
        )),
        _ if token.is_empty() => Ok(None),
        _ => Ok(Some(token.to_owned())),
    }
}
