//! Configuration: a TOML file, `TALLYD_*` environment variables and flags,
//! validated once into a [`Config`] the runtime trusts.
//!
//! Precedence: flag > environment > file > default. Unknown keys in the file
//! are an error naming the key; a bad value is an error naming its field.
//! The ClickHouse password comes only from the file or from
//! `TALLYD_CLICKHOUSE_PASSWORD`, and the admin token from the file,
//! `admin_token_file` or `TALLYD_ADMIN_TOKEN`: never from a flag.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod auth;
mod flags;
mod replication;
mod validate;
mod wal;

pub use auth::AuthConfig;
pub use flags::Overrides;
pub use replication::ReplicationConfig;
pub use validate::{Config, ForwardConfig, OtlpConfig, ProtoConfig};
pub use wal::{WalGeometry, wal_geometry};

/// The settings as written in the file (human units, `off` for listeners).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Written in every row's `host` column. Empty: the machine's hostname.
    pub host_id: String,
    pub data_dir: String,
    pub log_level: String,
    /// `/health`, `/metrics`, the explorer and its API; `off` disables.
    pub admin: String,
    /// The bearer token the admin API and `/metrics` require (needed when
    /// `admin` is not on loopback). Prefer `admin_token_file` or
    /// `TALLYD_ADMIN_TOKEN`.
    pub admin_token: String,
    /// A file holding the admin token (its first line).
    pub admin_token_file: String,
    pub shutdown_timeout: String,
    pub statsd: StatsdSettings,
    pub aggregate: AggregateSettings,
    pub clickhouse: ClickhouseSettings,
    pub wal: WalSettings,
    pub spool: SpoolSettings,
    pub proto: ProtoSettings,
    pub otlp: OtlpSettings,
    pub forward: ForwardSettings,
    pub retention: RetentionSettings,
    pub cardinality: CardinalitySettings,
    pub tls: TlsSettings,
    pub auth: AuthSettings,
    pub replication: ReplicationSettings,
    /// Mapping rules (`[[mapping]]`), the first match applying (see
    /// [`crate::aggregate::mapping`]).
    pub mapping: Vec<crate::aggregate::mapping::RuleSettings>,
}

/// `[tls]`: TLS on the stream listeners (see [`crate::auth::tls`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// The listeners that speak TLS: `statsd_tcp`, `proto_tcp`,
    /// `otlp_http`, `otlp_grpc`, `admin`.
    pub listeners: Vec<String>,
    /// The server's certificate chain (PEM, leaf first).
    pub cert_file: String,
    /// Its private key (PEM).
    pub key_file: String,
    /// mTLS: clients must show a certificate signed by one of these CAs
    /// (PEM); empty: no client certificate is asked for.
    pub client_ca_file: String,
}

/// `[replication]`: acknowledged batches stored by a NATS JetStream
/// stream before `OK` (docs/replication.md). Off while `servers` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSettings {
    /// NATS URLs (`nats://host:4222`).
    pub servers: Vec<String>,
    /// Each server's monitoring URL (`http://host:8222`), where tallyd
    /// checks that it fsyncs every write (`/varz`).
    pub monitor_urls: Vec<String>,
    pub stream: String,
    pub shards: u32,
    pub replicas: usize,
    pub duplicate_window: String,
    /// How long a publish may wait for the stream's answer before the
    /// batch is answered `OVERLOADED`.
    pub publish_timeout: String,
    /// Bytes the stream may hold (a ClickHouse outage fills it); past it
    /// batches are answered `OVERLOADED`. "0": no bound.
    pub max_bytes: String,
    /// How long a shard's lease lives unrenewed: the bound on a takeover.
    pub lease: String,
    /// The `host` of the rows aggregated from the stream (the same
    /// whichever tallyd writes them); empty: the stream's name.
    pub host: String,
    /// Messages a held shard may be behind before `/health` says so.
    pub max_lag: u64,
    /// Whether this tallyd aggregates shards (stands by for their leases)
    /// as well as publishing.
    pub consume: bool,
    /// A NATS `.creds` file (user JWT and NKey seed).
    pub credentials_file: String,
    /// A file whose first line is the servers' token
    /// (`TALLYD_NATS_TOKEN` instead).
    pub token_file: String,
    /// A user name, with its password in `password_file`
    /// (`TALLYD_NATS_PASSWORD` instead).
    pub user: String,
    pub password_file: String,
    /// Require TLS (also implied by a `tls://` server).
    pub tls: bool,
    /// PEM: the CA of the servers' certificates; a client certificate and
    /// its key.
    pub ca_file: String,
    pub client_cert: String,
    pub client_key: String,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        ReplicationSettings {
            servers: Vec::new(),
            monitor_urls: Vec::new(),
            stream: "TALLYD".into(),
            shards: 1,
            replicas: 3,
            duplicate_window: "2m".into(),
            publish_timeout: "5s".into(),
            max_bytes: "8GiB".into(),
            lease: "10s".into(),
            host: String::new(),
            max_lag: 100_000,
            consume: true,
            credentials_file: String::new(),
            token_file: String::new(),
            user: String::new(),
            password_file: String::new(),
            tls: false,
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
        }
    }
}

/// `[auth]`: bearer tokens (see [`crate::auth::Tokens`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A file of tokens, one per line, any of which protobuf TCP and OTLP
    /// clients may send; `TALLYD_INGEST_TOKEN` adds one. Without either,
    /// no token is asked for.
    pub token_file: String,
}

/// `[cardinality]`: per-metric key budgets (see
/// [`crate::aggregate::budget`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CardinalitySettings {
    /// Keys one metric may write in one interval; past it, its new keys
    /// fold into its overflow series (tag values `tallyd_overflow`).
    pub max_keys: u32,
    /// Budgets of metrics by name (`[[cardinality.metric]]`), the first
    /// match winning.
    pub metric: Vec<MetricBudget>,
}

impl Default for CardinalitySettings {
    fn default() -> Self {
        CardinalitySettings {
            max_keys: crate::aggregate::budget::Budgets::default().default,
            metric: Vec::new(),
        }
    }
}

/// `[[cardinality.metric]]`: the budget of the metrics whose name matches
/// a glob (`*`, `?`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricBudget {
    pub name: String,
    pub max_keys: u32,
}

/// `[retention]`: how long rows are kept at each resolution (see
/// [`crate::rollup`]). The defaults are StatsHouse's: raw (per flush
/// interval) rows for about two days, minutes for about a month, hours
/// for two years.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    pub raw: String,
    pub minute: String,
    pub hour: String,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            raw: "2d".into(),
            minute: "35d".into(),
            hour: "2y".into(),
        }
    }
}

/// `[forward]`: an edge's aggregators. With upstreams, closed intervals go
/// to them (their protobuf TCP listeners) instead of to ClickHouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardSettings {
    /// `host:port` of each aggregator; empty: this tallyd writes ClickHouse.
    pub upstreams: Vec<String>,
    /// `keep`: rows keep this host in their `host` column; `drop`: the
    /// fleet's rows of a key merge into one per interval.
    pub host: String,
    /// Globs over metric names (`*`, `?`) whose rows take the other mode.
    pub host_except: Vec<String>,
    /// The largest batch sent upstream (at most the aggregators'
    /// `proto.max_frame`).
    pub batch_size: String,
    /// How long an upstream may take to connect or to answer a batch.
    pub timeout: String,
    pub retry_initial: String,
    pub retry_max: String,
    /// `/health` is degraded while the oldest interval not yet taken by
    /// the upstreams is older than this.
    pub max_lag: String,
    /// TLS to the upstreams (their `tls.listeners` holds `proto_tcp`).
    pub tls: bool,
    /// The CAs the upstreams' certificates must be signed by (PEM); empty:
    /// the system's roots. A self-signed certificate it holds is pinned,
    /// as `clickhouse.ca_file` pins one.
    pub ca_file: String,
    /// A client certificate and key (PEM), for upstreams that ask (mTLS).
    pub client_cert: String,
    pub client_key: String,
    /// A file whose first line is the token sent to the upstreams (their
    /// `auth.token_file`); `TALLYD_FORWARD_TOKEN` overrides it.
    pub token_file: String,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        ForwardSettings {
            upstreams: Vec::new(),
            host: "keep".into(),
            host_except: Vec::new(),
            batch_size: "1MiB".into(),
            timeout: "10s".into(),
            retry_initial: "100ms".into(),
            retry_max: "10s".into(),
            max_lag: "5m".into(),
            tls: false,
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
            token_file: String::new(),
        }
    }
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
    /// Past `max_size`, how long an interval may stay open before it is
    /// merged (or until the WAL is half full): a merge then folds this span,
    /// not one interval, into the newest waiting file. `0s`: every interval.
    pub coarsen: String,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            max_size: "1GiB".into(),
            drain_batch: "32MiB".into(),
            hard_limit: "4GiB".into(),
            coarsen: "1m".into(),
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

/// `[otlp]`: OpenTelemetry metrics in (see [`crate::ingest::otlp`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpSettings {
    /// OTLP/HTTP listen address (`POST /v1/metrics`), or `off`.
    pub http: String,
    /// OTLP/gRPC listen address (`MetricsService/Export`), or `off`.
    pub grpc: String,
    /// Most bytes of a request body, compressed or not (20 MiB, as the
    /// spec recommends).
    pub max_body: String,
    /// Resource attributes promoted to tags (`host.name` is the row's
    /// host in any case).
    pub resource_tags: Vec<String>,
    /// A series with no point for this long is forgotten (its next
    /// cumulative point is a reference again).
    pub max_staleness: String,
    pub max_connections: usize,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        OtlpSettings {
            http: "127.0.0.1:4318".into(),
            grpc: "127.0.0.1:4317".into(),
            max_body: "20MiB".into(),
            resource_tags: crate::protocol::otlp::RESOURCE_TAGS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            max_staleness: "1h".into(),
            max_connections: 1024,
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
    /// Tags written in names that are read as tags: any of `influxdb`
    /// (`name,k=v`), `librato` (`name#k=v`), `signalfx` (`na[k=v]me`),
    /// `graphite` (`name;k=v`). See [`crate::protocol::dialect`].
    pub tag_dialects: Vec<String>,
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
            admin_token: String::new(),
            admin_token_file: String::new(),
            shutdown_timeout: "30s".into(),
            statsd: StatsdSettings::default(),
            aggregate: AggregateSettings::default(),
            clickhouse: ClickhouseSettings::default(),
            wal: WalSettings::default(),
            spool: SpoolSettings::default(),
            proto: ProtoSettings::default(),
            otlp: OtlpSettings::default(),
            forward: ForwardSettings::default(),
            retention: RetentionSettings::default(),
            cardinality: CardinalitySettings::default(),
            replication: ReplicationSettings::default(),
            tls: TlsSettings::default(),
            auth: AuthSettings::default(),
            mapping: Vec::new(),
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
            tag_dialects: Vec::new(),
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
            max_depth: 10_000_000,
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
