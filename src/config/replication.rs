//! `[replication]`, validated (docs/replication.md). The servers' own
//! checks (`/varz`) need the network and are made at start and by
//! `check-config`, not here.

use std::time::Duration;

use super::{ConfigError, Settings, duration, err};
use crate::replication::publish::StreamSpec;

/// Where acknowledged batches are stored before `OK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub servers: Vec<String>,
    pub monitor_urls: Vec<String>,
    pub spec: StreamSpec,
    pub publish_timeout: Duration,
    pub lease: Duration,
    /// The rows' host.
    pub host: String,
    pub max_lag: u64,
    pub consume: bool,
}

impl Settings {
    /// `None` while `replication.servers` is empty.
    pub(super) fn replication_config(&self) -> Result<Option<ReplicationConfig>, ConfigError> {
        let r = &self.replication;
        if r.servers.is_empty() {
            return Ok(None);
        }
        if let Some(bad) = r
            .servers
            .iter()
            .find(|s| !s.starts_with("nats://") && !s.starts_with("tls://"))
        {
            return Err(err(
                "replication.servers",
                format!("{bad:?} is not a nats:// or tls:// URL"),
            ));
        }
        if r.monitor_urls.len() != r.servers.len() {
            return Err(err(
                "replication.monitor_urls",
                format!(
                    "names {} monitoring URLs for {} servers: each server's is needed, to check that it fsyncs every write (its /varz)",
                    r.monitor_urls.len(),
                    r.servers.len()
                ),
            ));
        }
        if let Some(bad) = r.monitor_urls.iter().find(|u| !u.starts_with("http://")) {
            return Err(err(
                "replication.monitor_urls",
                format!("{bad:?} is not an http:// URL"),
            ));
        }
        let name_ok = !r.stream.is_empty()
            && r.stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(err(
                "replication.stream",
                format!(
                    "{:?} is not a stream name (letters, digits, _ and -)",
                    r.stream
                ),
            ));
        }
        if !(1..=1024).contains(&r.shards) {
            return Err(err("replication.shards", "must be 1 to 1024"));
        }
        if !(1..=5).contains(&r.replicas) {
            return Err(err(
                "replication.replicas",
                "must be 1 to 5 (JetStream's limit)",
            ));
        }
        let lease = duration("replication.lease", &r.lease)?;
        if lease < Duration::from_secs(3) {
            return Err(err(
                "replication.lease",
                "must be at least 3s (it is renewed every third of it, each renewal a round trip to the stream's servers)",
            ));
        }
        Ok(Some(ReplicationConfig {
            servers: r.servers.clone(),
            monitor_urls: r.monitor_urls.clone(),
            spec: StreamSpec {
                name: r.stream.clone(),
                shards: r.shards,
                replicas: r.replicas,
                duplicate_window: duration("replication.duplicate_window", &r.duplicate_window)?,
                max_bytes: super::size_of("replication.max_bytes", &r.max_bytes)?,
            },
            publish_timeout: duration("replication.publish_timeout", &r.publish_timeout)?,
            lease,
            host: if r.host.is_empty() {
                r.stream.clone()
            } else {
                r.host.clone()
            },
            max_lag: r.max_lag,
            consume: r.consume,
        }))
    }
}
