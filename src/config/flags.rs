//! The flags: each also read from its `TALLYD_*` variable, each
//! overriding its setting in the file.

use clap::Args;

use super::Settings;

/// Flags (each also read from its `TALLYD_*` variable) that override the file.
#[derive(Debug, Default, Clone, Args)]
pub struct Overrides {
    /// StatsD UDP listen address, or `off` [default: 127.0.0.1:8125]
    #[arg(long, env = "TALLYD_STATSD_UDP", value_name = "ADDR")]
    pub statsd_udp: Option<String>,
    /// StatsD TCP listen address, or `off` [default: 127.0.0.1:8125]
    #[arg(long, env = "TALLYD_STATSD_TCP", value_name = "ADDR")]
    pub statsd_tcp: Option<String>,
    /// Admin HTTP address (/health, /metrics, the explorer and its API), or `off` [default: 127.0.0.1:8127]
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
    /// Flush early when this many raw increments are pending [default: 10000000]
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
    /// OTLP/HTTP listen address (POST /v1/metrics), or `off` [default: 127.0.0.1:4318]
    #[arg(long, env = "TALLYD_OTLP_HTTP", value_name = "ADDR")]
    pub otlp_http: Option<String>,
    /// OTLP/gRPC listen address, or `off` [default: 127.0.0.1:4317]
    #[arg(long, env = "TALLYD_OTLP_GRPC", value_name = "ADDR")]
    pub otlp_grpc: Option<String>,
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
    /// Aggregators to forward closed intervals to, comma separated host:port (this tallyd is then an edge) [default: none]
    #[arg(
        long,
        env = "TALLYD_FORWARD_UPSTREAMS",
        value_name = "ADDRS",
        value_delimiter = ','
    )]
    pub forward_upstreams: Option<Vec<String>>,
    /// keep (rows keep this host) or drop (one row per key for the fleet) [default: keep]
    #[arg(long, env = "TALLYD_FORWARD_HOST", value_name = "MODE")]
    pub forward_host: Option<String>,
    /// How long raw rows are kept, e.g. 2d [default: 2d]
    #[arg(long, env = "TALLYD_RETENTION_RAW", value_name = "DURATION")]
    pub retention_raw: Option<String>,
    /// How long minute rollups are kept [default: 35d]
    #[arg(long, env = "TALLYD_RETENTION_MINUTE", value_name = "DURATION")]
    pub retention_minute: Option<String>,
    /// How long hour rollups are kept [default: 2y]
    #[arg(long, env = "TALLYD_RETENTION_HOUR", value_name = "DURATION")]
    pub retention_hour: Option<String>,
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
        set(&mut s.otlp.http, &self.otlp_http);
        set(&mut s.otlp.grpc, &self.otlp_grpc);
        set(&mut s.wal.sync, &self.wal_sync);
        set(&mut s.statsd.udp_workers, &self.udp_workers);
        set(&mut s.statsd.dogstatsd_socket, &self.dogstatsd_socket);
        set(&mut s.forward.upstreams, &self.forward_upstreams);
        set(&mut s.forward.host, &self.forward_host);
        set(&mut s.retention.raw, &self.retention_raw);
        set(&mut s.retention.minute, &self.retention_minute);
        set(&mut s.retention.hour, &self.retention_hour);
        set(
            &mut s.statsd.dogstatsd_stream_socket,
            &self.dogstatsd_stream_socket,
        );
    }
}
