//! Configuration: a TOML file, `TALLYD_*` environment variables and flags,
//! validated once into a [`Config`] the runtime trusts.
//!
//! Precedence: flag > environment > file > default. Unknown keys in the file
//! are an error naming the key; a bad value is an error naming its field.
//! The ClickHouse password comes only from the file or from
//! `TALLYD_CLICKHOUSE_PASSWORD`, never from a flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};
use tracing::level_filters::LevelFilter;

use crate::aggregate::AggregateLimits;
use crate::protocol::statsd::Limits;
use crate::sink::SinkConfig;
use crate::wal::{SyncMode, WalConfig};

/// The settings as written in the file (human units, `off` for listeners).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Written in every row's `host` column. Empty: the machine's hostname.
    pub host_id: String,
    pub data_dir: String,
    pub log_level: String,
    /// `/health` and `/metrics`; `off` disables.
    pub admin: String,
    pub shutdown_timeout: String,
    pub statsd: StatsdSettings,
    pub aggregate: AggregateSettings,
    pub clickhouse: ClickhouseSettings,
    pub wal: WalSettings,
    pub spool: SpoolSettings,
    pub proto: ProtoSettings,
}

/// `[spool]`: flushes recorded on disk until ClickHouse has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Past this size, each new interval is merged into the newest waiting
    /// one (coarser `ts`, same totals) instead of adding a file.
    pub max_size: String,
    /// While a backlog drains, parked intervals are sent together, up to
    /// this many bytes of spool files per INSERT (fewer, larger parts).
    pub drain_batch: String,
    /// The spool's hard cap. At it, intervals are not closed (the overflow
    /// policy "defer"): the open one keeps compacting in memory, within
    /// `aggregate.max_memory`, and the WAL fills.
    pub hard_limit: String,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            max_size: "1GiB".into(),
            drain_batch: "32MiB".into(),
            hard_limit: "4GiB".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtoSettings {
    pub tcp: String,
    pub udp: String,
    pub max_frame: String,
    pub max_connections: usize,
    /// How long a batch waits for room in a full WAL before `OVERLOADED`.
    pub overload_timeout: String,
    /// How long a silent client's last sequence is remembered.
    pub dedup_window: String,
    /// Clients whose sequences are remembered; past it, the least recently
    /// seen are forgotten.
    pub max_clients: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: String,
}

impl Default for ProtoSettings {
    fn default() -> Self {
        ProtoSettings {
            tcp: "127.0.0.1:8126".into(),
            udp: "127.0.0.1:8126".into(),
            max_frame: "4MiB".into(),
            max_connections: 1024,
            overload_timeout: "5s".into(),
            dedup_window: "24h".into(),
            max_clients: 100_000,
            idle_timeout: "10m".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSettings {
    pub enabled: bool,
    /// Total size of every segment of every stream.
    pub size: String,
    pub segment_size: String,
    /// `never`, `interval` or `always`.
    pub sync: String,
    pub sync_interval: String,
    /// Streams TCP connections share (UDP sockets get one each).
    pub tcp_streams: u32,
    pub skip_corrupt: bool,
}

impl Default for WalSettings {
    fn default() -> Self {
        WalSettings {
            enabled: true,
            size: "1GiB".into(),
            segment_size: "32MiB".into(),
            sync: "interval".into(),
            sync_interval: "100ms".into(),
            tcp_streams: 2,
            skip_corrupt: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsdSettings {
    pub udp: String,
    pub tcp: String,
    /// Threads reading the UDP socket. 0: one per core.
    pub udp_workers: usize,
    pub udp_recv_buffer: String,
    pub tcp_max_line: String,
    pub tcp_max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub tcp_idle_timeout: String,
    pub max_name_len: usize,
    pub max_tags: usize,
    pub max_tag_len: usize,
    /// A Unix datagram socket for DogStatsD clients (`socket_path=`), e.g.
    /// `/var/run/datadog/dsd.socket`; empty: off.
    pub dogstatsd_socket: String,
    /// A Unix stream socket for DogStatsD clients (`unixstream://` in
    /// Datadog's clients: each payload prefixed by its length); empty: off.
    pub dogstatsd_stream_socket: String,
    /// The socket files' permissions, octal (senders need write access).
    pub dogstatsd_socket_mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateSettings {
    pub flush_interval: String,
    pub max_depth: u64,
    pub max_keys: usize,
    pub max_set_members: usize,
    pub flush_queue: usize,
    /// Memory one interval's keys and accumulators may take (estimated).
    pub max_memory: String,
    /// Samples with a `|T` timestamp further than this from their
    /// interval are refused and counted.
    pub timestamp_window: String,
    /// A gauge not updated for this long (counted in flush intervals) is
    /// forgotten: a later delta resolves against 0.
    pub gauge_ttl: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickhouseSettings {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub create_schema: bool,
    pub timeout: String,
    pub retry_initial: String,
    pub retry_max: String,
    /// PEM roots to trust for an https:// URL instead of the system's.
    pub ca_file: String,
    /// A PEM client certificate (chain) and its key, for servers that ask.
    pub client_cert: String,
    pub client_key: String,
    /// Other replicas of the shard `url` belongs to: tried in turn when
    /// the one in use fails.
    pub replicas: Vec<String>,
    /// A cluster name from the servers' `remote_servers`: the schema is
    /// made ON CLUSTER with replicated tables. Empty: one server.
    pub cluster: String,
    /// Inserts per table whose deduplication tokens a 22.2+ server keeps
    /// (`non_replicated_deduplication_window` of the tables tallyd makes).
    pub dedup_window: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host_id: String::new(),
            data_dir: "/var/lib/tallyd".into(),
            log_level: "info".into(),
            admin: "127.0.0.1:8127".into(),
            shutdown_timeout: "30s".into(),
            statsd: StatsdSettings::default(),
            aggregate: AggregateSettings::default(),
            clickhouse: ClickhouseSettings::default(),
            wal: WalSettings::default(),
            spool: SpoolSettings::default(),
            proto: ProtoSettings::default(),
        }
    }
}

impl Default for StatsdSettings {
    fn default() -> Self {
        StatsdSettings {
            udp: "127.0.0.1:8125".into(),
            tcp: "127.0.0.1:8125".into(),
            udp_workers: 0,
            udp_recv_buffer: "8MiB".into(),
            tcp_max_line: "64KiB".into(),
            tcp_max_connections: 1024,
            tcp_idle_timeout: "10m".into(),
            max_name_len: 256,
            max_tags: 64,
            max_tag_len: 256,
            dogstatsd_socket: String::new(),
            dogstatsd_stream_socket: String::new(),
            dogstatsd_socket_mode: "0622".into(),
        }
    }
}

impl Default for AggregateSettings {
    fn default() -> Self {
        AggregateSettings {
            flush_interval: "1s".into(),
            max_depth: 1_000_000,
            max_keys: 1_000_000,
            max_set_members: 100_000,
            flush_queue: 1,
            max_memory: "1GiB".into(),
            timestamp_window: "1h".into(),
            gauge_ttl: "24h".into(),
        }
    }
}

impl Default for ClickhouseSettings {
    fn default() -> Self {
        ClickhouseSettings {
            url: "http://127.0.0.1:8123".into(),
            database: "tallyd".into(),
            user: "default".into(),
            password: String::new(),
            create_schema: true,
            timeout: "30s".into(),
            retry_initial: "100ms".into(),
            retry_max: "10s".into(),
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
            replicas: Vec::new(),
            cluster: String::new(),
            dedup_window: 1000,
        }
    }
}

/// Flags (each also read from its `TALLYD_*` variable) that override the file.
#[derive(Debug, Default, Clone, Args)]
pub struct Overrides {
    /// StatsD UDP listen address, or `off` [default: 127.0.0.1:8125]
    #[arg(long, env = "TALLYD_STATSD_UDP", value_name = "ADDR")]
    pub statsd_udp: Option<String>,
    /// StatsD TCP listen address, or `off` [default: 127.0.0.1:8125]
    #[arg(long, env = "TALLYD_STATSD_TCP", value_name = "ADDR")]
    pub statsd_tcp: Option<String>,
    /// Admin HTTP address (/health, /metrics), or `off` [default: 127.0.0.1:8127]
    #[arg(long, env = "TALLYD_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// ClickHouse HTTP URL [default: http://127.0.0.1:8123]
    #[arg(long, env = "TALLYD_CLICKHOUSE_URL", value_name = "URL")]
    pub clickhouse_url: Option<String>,
    /// ClickHouse database [default: tallyd]
    #[arg(long, env = "TALLYD_CLICKHOUSE_DATABASE", value_name = "NAME")]
    pub clickhouse_database: Option<String>,
    /// ClickHouse user (the password comes from TALLYD_CLICKHOUSE_PASSWORD or the file) [default: default]
    #[arg(long, env = "TALLYD_CLICKHOUSE_USER", value_name = "NAME")]
    pub clickhouse_user: Option<String>,
    /// Create the database and tables at start if missing [default: true]
    #[arg(long, env = "TALLYD_CREATE_SCHEMA", value_name = "BOOL")]
    pub create_schema: Option<bool>,
    /// Close an interval at every multiple of this (e.g. 1s, 500ms) [default: 1s]
    #[arg(long, env = "TALLYD_FLUSH_INTERVAL", value_name = "DURATION")]
    pub flush_interval: Option<String>,
    /// Flush early when this many raw increments are pending [default: 1000000]
    #[arg(long, env = "TALLYD_MAX_DEPTH", value_name = "N")]
    pub max_depth: Option<u64>,
    /// The `host` column of every row [default: the hostname]
    #[arg(long, env = "TALLYD_HOST_ID", value_name = "NAME")]
    pub host_id: Option<String>,
    /// State directory [default: /var/lib/tallyd]
    #[arg(long, env = "TALLYD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<String>,
    /// error, warn, info, debug or trace [default: info]
    #[arg(long, env = "TALLYD_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Protobuf TCP listen address (acknowledged batches), or `off` [default: 127.0.0.1:8126]
    #[arg(long, env = "TALLYD_PROTO_TCP", value_name = "ADDR")]
    pub proto_tcp: Option<String>,
    /// Protobuf UDP listen address (one batch per datagram), or `off` [default: 127.0.0.1:8126]
    #[arg(long, env = "TALLYD_PROTO_UDP", value_name = "ADDR")]
    pub proto_udp: Option<String>,
    /// Total WAL size, e.g. 1GiB [default: 1GiB]
    #[arg(long, env = "TALLYD_WAL_SIZE", value_name = "SIZE")]
    pub wal_size: Option<String>,
    /// WAL durability: never, interval or always [default: interval]
    #[arg(long, env = "TALLYD_WAL_SYNC", value_name = "MODE")]
    pub wal_sync: Option<String>,
    /// UDP receive threads; 0 = one per core [default: 0]
    #[arg(long, env = "TALLYD_UDP_WORKERS", value_name = "N")]
    pub udp_workers: Option<usize>,
    /// DogStatsD Unix datagram socket path, e.g. /var/run/datadog/dsd.socket [default: off]
    #[arg(long, env = "TALLYD_DOGSTATSD_SOCKET", value_name = "PATH")]
    pub dogstatsd_socket: Option<String>,
    /// DogStatsD Unix stream socket path (length-prefixed payloads) [default: off]
    #[arg(long, env = "TALLYD_DOGSTATSD_STREAM_SOCKET", value_name = "PATH")]
    pub dogstatsd_stream_socket: Option<String>,
}

impl Overrides {
    pub fn apply(&self, s: &mut Settings) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut s.statsd.udp, &self.statsd_udp);
        set(&mut s.statsd.tcp, &self.statsd_tcp);
        set(&mut s.admin, &self.admin);
        set(&mut s.clickhouse.url, &self.clickhouse_url);
        set(&mut s.clickhouse.database, &self.clickhouse_database);
        set(&mut s.clickhouse.user, &self.clickhouse_user);
        set(&mut s.clickhouse.create_schema, &self.create_schema);
        set(&mut s.aggregate.flush_interval, &self.flush_interval);
        set(&mut s.aggregate.max_depth, &self.max_depth);
        set(&mut s.host_id, &self.host_id);
        set(&mut s.data_dir, &self.data_dir);
        set(&mut s.log_level, &self.log_level);
        set(&mut s.wal.size, &self.wal_size);
        set(&mut s.proto.tcp, &self.proto_tcp);
        set(&mut s.proto.udp, &self.proto_udp);
        set(&mut s.wal.sync, &self.wal_sync);
        set(&mut s.statsd.udp_workers, &self.udp_workers);
        set(&mut s.statsd.dogstatsd_socket, &self.dogstatsd_socket);
        set(
            &mut s.statsd.dogstatsd_stream_socket,
            &self.dogstatsd_stream_socket,
        );
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

/// A configuration error, naming the field (or file) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

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
        overrides.apply(&mut settings);
        Ok(settings)
    }

    /// The settings as TOML, with the password redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.clickhouse.password.is_empty() {
            shown.clickhouse.password = "<redacted>".into();
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
        let pem = |field: &str, path: &str, key: bool| {
            (!path.is_empty())
                .then(|| crate::sink::tls::Pem::read(path, key).map_err(|e| err(field, e)))
                .transpose()
        };
        let ca = pem("clickhouse.ca_file", &c.ca_file, false)?;
        let https = std::iter::once(&c.url)
            .chain(&c.replicas)
            .any(|u| u.starts_with("https://"));
        let system = if https && ca.is_none() {
            let roots = crate::sink::tls::SystemRoots::load();
            if roots.is_empty() {
                tracing::warn!(
                    "no system root certificates found; set clickhouse.ca_file for an https:// ClickHouse"
                );
            }
            roots
        } else {
            Default::default()
        };
        let tls = crate::sink::tls::TlsFiles {
            system,
            ca,
            client: match (
                pem("clickhouse.client_cert", &c.client_cert, false)?,
                pem("clickhouse.client_key", &c.client_key, true)?,
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => {
                    return Err(err(
                        "clickhouse.client_cert",
                        "client_cert and client_key go together",
                    ));
                }
            },
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
        Ok(Config {
            wal,
            spool_max_size,
            spool_hard_limit,
            spool_drain_batch: size("spool.drain_batch", &self.spool.drain_batch)? as u64,
            udp_wal_streams,
            proto,
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
    pub host_id: String,
    pub data_dir: PathBuf,
    pub log_level: LevelFilter,
    pub admin: Option<SocketAddr>,
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
    /// `spool.drain_batch`, bytes.
    pub spool_drain_batch: u64,
    /// WAL streams the UDP workers share (worker `i` appends to stream
    /// `i % udp_wal_streams`); the TCP streams come after them.
    pub udp_wal_streams: usize,
    pub proto: ProtoConfig,
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

impl Settings {
    fn wal_config(
        &self,
        udp_workers: usize,
        max_frame: u64,
    ) -> Result<(Option<WalConfig>, usize), ConfigError> {
        let w = &self.wal;
        if !w.enabled {
            return Ok((None, udp_workers.max(1)));
        }
        let size = size("wal.size", &w.size)? as u64;
        let segment_size = size_of("wal.segment_size", &w.segment_size)?;
        // A TCP read or a UDP datagram (64 KiB at most) is one record: it
        // must fit a segment, or it would be refused and dropped.
        let least =
            (crate::wal::format::SEGMENT_HEADER + crate::wal::format::record_len(64 * 1024) + 8)
                .next_multiple_of(4096) as u64;
        if segment_size < least {
            return Err(err(
                "wal.segment_size",
                format!(
                    "must be at least {} (a TCP read or a UDP datagram, up to 64 KiB, is one record and must fit a segment)",
                    bytesize::ByteSize(least)
                ),
            ));
        }
        if w.tcp_streams == 0 {
            return Err(err("wal.tcp_streams", "must be at least 1"));
        }
        let g = wal_geometry(
            size,
            segment_size,
            max_frame,
            udp_workers as u64,
            u64::from(w.tcp_streams),
        )
        .map_err(|why| err("wal.size", format!("{} {why}", w.size)))?;
        let sync = match w.sync.as_str() {
            "never" => SyncMode::Never,
            "interval" => SyncMode::Interval,
            "always" => SyncMode::Always,
            other => {
                return Err(err(
                    "wal.sync",
                    format!("{other:?} is not one of never, interval, always"),
                ));
            }
        };
        let config = WalConfig {
            dir: PathBuf::from(&self.data_dir).join("wal"),
            streams: g.streams,
            segments_per_stream: g.segments_per_stream,
            segment_size: g.segment_size,
            sync,
            sync_interval: duration("wal.sync_interval", &w.sync_interval)?,
            skip_corrupt: w.skip_corrupt,
        };
        Ok((Some(config), g.udp_streams as usize))
    }
}

/// How `wal.size` is laid out (see [`wal_geometry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalGeometry {
    pub streams: u32,
    pub udp_streams: u32,
    pub segment_size: u64,
    pub segments_per_stream: u32,
}

/// Lays `size` bytes of WAL out for `udp_workers` UDP workers and
/// `tcp_streams` TCP streams, whatever the core count: the total is always
/// at most `size`.
///
/// 1. One stream per UDP worker plus `tcp_streams` is wanted, with 4
///    segments each.
/// 2. The segment size shrinks from `segment_size` to fit that, but not
///    below what the largest protobuf batch needs (`max_frame` + 64 KiB,
///    unless `segment_size` is smaller still), in steps of 64 KiB.
/// 3. If the streams still do not fit with 2 segments each, there are
///    fewer UDP streams and UDP workers share them (`i % udp_streams`).
///
/// Errors (a reason) when not even one UDP stream fits beside the TCP ones.
pub fn wal_geometry(
    size: u64,
    segment_size: u64,
    max_frame: u64,
    udp_workers: u64,
    tcp_streams: u64,
) -> Result<WalGeometry, String> {
    const STEP: u64 = 64 * 1024;
    let wanted = udp_workers.max(1).saturating_add(tcp_streams);
    let floor = max_frame
        .saturating_add(STEP)
        .div_ceil(STEP)
        .saturating_mul(STEP);
    let floor = floor.min(segment_size);
    let fit = size / wanted.saturating_mul(4) / STEP * STEP;
    let seg = fit.clamp(floor, segment_size);
    let streams = wanted.min(size / seg.saturating_mul(2));
    if streams <= tcp_streams {
        return Err(format!(
            "holds fewer than 2 segments of {} for each of {} streams (one UDP stream and wal.tcp_streams); give it at least {}",
            bytesize::ByteSize(seg),
            tcp_streams + 1,
            bytesize::ByteSize(seg.saturating_mul(2).saturating_mul(tcp_streams + 1)),
        ));
    }
    let to_u32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(WalGeometry {
        streams: to_u32(streams),
        udp_streams: to_u32(streams - tcp_streams),
        segment_size: seg,
        segments_per_stream: to_u32(size / seg / streams),
    })
}

fn size_of(field: &str, text: &str) -> Result<u64, ConfigError> {
    size(field, text).map(|s| s as u64)
}

fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| {
        err(
            field,
            format!("{text:?} is not a duration like 1s or 500ms: {e}"),
        )
    })
}

fn size(field: &str, text: &str) -> Result<usize, ConfigError> {
    let bytes: bytesize::ByteSize = text.parse().map_err(|e| {
        err(
            field,
            format!("{text:?} is not a size like 64KiB or 8MiB: {e}"),
        )
    })?;
    usize::try_from(bytes.as_u64()).map_err(|_| err(field, "too large"))
}

fn listen(field: &str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        err(
            field,
            format!("{text:?} is not an IP:port address or `off`"),
        )
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests;
