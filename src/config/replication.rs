//! `[replication]`, validated (docs/replication.md). The servers' own
//! checks (`/varz`) need the network and are made at start and by
//! `check-config`, not here.

use std::time::Duration;

use super::{ConfigError, Settings, duration, err};
use crate::auth::Secret;
use crate::replication::publish::{NatsAuth, StreamSpec};

/// Where acknowledged batches are stored before `OK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub servers: Vec<String>,
    pub auth: NatsAuth,
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
        // Each shard's rows carry its instance's low 20 bits in their flush
        // ids (and one host): two shards alike would collapse each other's.
        let mut tags = std::collections::HashMap::new();
        for shard in 0..r.shards {
            let tag = crate::outbox::flush::tag(crate::replication::publish::shard_instance(
                &r.stream, shard,
            ));
            if let Some(other) = tags.insert(tag, shard) {
                return Err(err(
                    "replication.shards",
                    format!(
                        "shards {other} and {shard} of stream {:?} would share a flush id tag; choose another shard count or stream name",
                        r.stream
                    ),
                ));
            }
        }
        let lease = duration("replication.lease", &r.lease)?;
        if lease < Duration::from_secs(3) {
            return Err(err(
                "replication.lease",
                "must be at least 3s (it is renewed every third of it, each renewal a round trip to the stream's servers)",
            ));
        }
        Ok(Some(ReplicationConfig {
            auth: self.nats_auth()?,
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

/// The first line of a secret: from `env` when set, else from `file`
/// (field `field`), else none.
fn secret(field: &str, file: &str, env: &str) -> Result<Option<Secret>, ConfigError> {
    if let Ok(v) = std::env::var(env)
        && !v.trim().is_empty()
    {
        return Ok(Some(Secret::new(v.trim())));
    }
    if file.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| err(field, format!("cannot read {file:?}: {e}")))?;
    let first = crate::auth::token_lines(&text).next();
    first
        .map(|t| Some(Secret::new(t)))
        .ok_or_else(|| err(field, format!("{file:?} is empty")))
}

impl Settings {
    /// `[replication]`'s credentials and TLS, their files read (so that a
    /// bad one is an error naming its field).
    fn nats_auth(&self) -> Result<NatsAuth, ConfigError> {
        let r = &self.replication;
        let credentials = match r.credentials_file.as_str() {
            "" => None,
            path => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    err(
                        "replication.credentials_file",
                        format!("cannot read {path:?}: {e}"),
                    )
                })?;
                if !text.contains("BEGIN NATS USER JWT") || !text.contains("BEGIN USER NKEY SEED") {
                    return Err(err(
                        "replication.credentials_file",
                        format!(
                            "{path:?} is not a NATS .creds file (a user JWT and its NKey seed)"
                        ),
                    ));
                }
                Some(Secret::new(&text))
            }
        };
        let token = secret("replication.token_file", &r.token_file, "TALLYD_NATS_TOKEN")?;
        let password = secret(
            "replication.password_file",
            &r.password_file,
            "TALLYD_NATS_PASSWORD",
        )?;
        let user_password = match (r.user.as_str(), password) {
            ("", None) => None,
            ("", Some(_)) => {
                return Err(err(
                    "replication.user",
                    "a password is set (password_file or TALLYD_NATS_PASSWORD) without a user",
                ));
            }
            (_, None) => {
                return Err(err(
                    "replication.password_file",
                    "a user is set without a password (password_file or TALLYD_NATS_PASSWORD)",
                ));
            }
            (user, Some(p)) => Some((user.to_owned(), p)),
        };
        let kinds = [
            credentials.is_some(),
            token.is_some(),
            user_password.is_some(),
        ];
        if kinds.iter().filter(|&&k| k).count() > 1 {
            return Err(err(
                "replication.credentials_file",
                "set one of credentials_file, token_file (or TALLYD_NATS_TOKEN), and user with password_file (or TALLYD_NATS_PASSWORD)",
            ));
        }
        let ca_file = super::auth::pem("replication.ca_file", &r.ca_file, false)?
            .map(|_| std::path::PathBuf::from(&r.ca_file));
        let client = super::auth::client_pair("replication", &r.client_cert, &r.client_key)?
            .map(|_| (r.client_cert.clone().into(), r.client_key.clone().into()));
        let tls = r.tls || r.servers.iter().any(|s| s.starts_with("tls://"));
        if !tls && (ca_file.is_some() || client.is_some()) {
            return Err(err(
                "replication.tls",
                "replication.ca_file or client_cert is set, but neither replication.tls nor a tls:// server",
            ));
        }
        Ok(NatsAuth {
            credentials,
            token,
            user_password,
            tls,
            ca_file,
            client,
        })
    }
}
