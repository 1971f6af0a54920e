//! Acknowledged batches to the stream (docs/replication.md, format 1): the
//! `Batch` bytes as the client framed them, on subject `tallyd.<stream>.<shard>`
//! (`<shard>` = sipHash64 of the client id, mod the shard count), with
//! `Nats-Msg-Id: <client_id>/<sequence>` (the stream's dedup within its
//! duplicate window) and `Tallyd-Format: 1`. A publish is answered only
//! once a quorum of the stream's servers has stored it, and, with
//! `sync_interval: always` (see [`super::check`]), fsynced it.

use std::hash::Hasher;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::Secret;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;

/// The message format written in `Tallyd-Format`.
pub const FORMAT: &str = "1";

/// The stream tallyd publishes to, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub shards: u32,
    /// At least this many replicas (a quorum of them stores each message).
    pub replicas: usize,
    /// The stream's dedup window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Bytes the stream holds at most (0: no bound); past it a publish is
    /// refused (`discard: new`), and the batch answered `OVERLOADED`.
    pub max_bytes: u64,
}

/// A stored batch: its stream sequence, and whether the stream had it
/// already (within its duplicate window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    pub duplicate: bool,
}

pub struct Publisher {
    js: jetstream::Context,
    spec: StreamSpec,
}

/// How tallyd proves itself to the NATS servers, and their TLS. Secrets
/// come from files or the environment, never a flag
/// (`[replication]` `credentials_file`, `token_file` / `TALLYD_NATS_TOKEN`,
/// `user` and `password_file` / `TALLYD_NATS_PASSWORD`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// A `.creds` file's contents (a user JWT and its NKey seed).
    pub credentials: Option<Secret>,
    pub token: Option<Secret>,
    pub user_password: Option<(String, Secret)>,
    /// TLS required (also implied by a `tls://` server URL).
    pub tls: bool,
    /// PEM files: the CA that signed the servers' certificates, and a
    /// client certificate and its key.
    pub ca_file: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl Publisher {
    /// Connects to `servers` (NATS URLs), makes the stream if it is
    /// missing, and checks it: work-queue retention, file storage, at
    /// least `spec.replicas` replicas, and no `persist_mode: async`.
    pub async fn connect(
        servers: &[String],
        auth: &NatsAuth,
        spec: StreamSpec,
        timeout: Duration,
    ) -> Result<Publisher, String> {
        let addrs = servers
            .iter()
            .map(|s| {
                s.parse::<async_nats::ServerAddr>()
                    .map_err(|e| format!("{s:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut options = async_nats::ConnectOptions::new();
        if let Some(creds) = &auth.credentials {
            options = options
                .credentials(creds.expose())
                .map_err(|e| format!("replication.credentials_file: {e}"))?;
        }
        if let Some(token) = &auth.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some((user, password)) = &auth.user_password {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if auth.tls {
            options = options.require_tls(true);
        }
        if let Some(ca) = &auth.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &auth.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let client = options
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .connect(addrs)
            .await
            .map_err(|e| format!("cannot connect to NATS {servers:?}: {e}"))?;
        let js = jetstream::new(client);
        let max_bytes = match spec.max_bytes {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        };
        let config = stream::Config {
            name: spec.name.clone(),
            subjects: vec![format!("tallyd.{}.*", spec.name)],
            // Limits, not WorkQueue: a work queue requires an ack per
            // message (JetStream error 10098); a confirmed cut is purged
            // from its shard's subject instead, in one request.
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: spec.replicas,
            duplicate_window: spec.duplicate_window,
            max_bytes,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let mut stream = js.get_or_create_stream(config).await.map_err(|e| {
            let e = e.to_string();
            // Answers no retry mends: subjects taken by another stream
            // (10065), more replicas than the servers have (10074).
            let unfit = if e.contains("10065") || e.contains("10074") {
                UNFIT
            } else {
                ""
            };
            format!("{unfit}cannot make or read stream {}: {e}", spec.name)
        })?;
        let info = stream
            .info()
            .await
            .map_err(|e| format!("cannot read stream {}: {e}", spec.name))?;
        check_stream(&info.config, &spec).map_err(|e| format!("{UNFIT}{e}"))?;
        // Settings a stream made earlier may hold otherwise: brought to
        // this config's.
        if info.config.duplicate_window != spec.duplicate_window
            || info.config.max_bytes != max_bytes
        {
            let mut updated = info.config.clone();
            updated.duplicate_window = spec.duplicate_window;
            updated.max_bytes = max_bytes;
            js.update_stream(updated).await.map_err(|e| {
                format!(
                    "cannot update stream {}'s duplicate_window and max_bytes: {e}",
                    spec.name
                )
            })?;
        }
        Ok(Publisher { js, spec })
    }

    /// The JetStream context (for the cuts and leases).
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// The subject of a client's batches.
    pub fn subject(&self, client_id: &str) -> String {
        let mut h = siphasher::sip::SipHasher24::new();
        h.write(client_id.as_bytes());
        let shards = u64::from(self.spec.shards.max(1));
        subject(&self.spec.name, (h.finish() % shards) as u32)
    }

    /// Publishes one batch and waits for the stream's answer.
    pub async fn publish(
        &self,
        batch: Bytes,
        client_id: &str,
        sequence: u64,
    ) -> Result<Published, String> {
        self.send(batch, client_id, sequence).await?.await
    }

    /// Sends one batch to the stream; the future returned is its answer,
    /// so that a connection may have several batches on their way at once
    /// (answered in the order sent).
    pub async fn send(
        &self,
        batch: Bytes,
        client_id: &str,
        sequence: u64,
    ) -> Result<impl Future<Output = Result<Published, String>> + Send + use<>, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Tallyd-Format", FORMAT);
        let mut message = PublishMessage::build()
            .payload(batch)
            // After the headers: `headers` replaces the map the id is in.
            .headers(headers);
        if let Some(id) = message_id(client_id, sequence) {
            message = message.message_id(id);
        }
        let answer = self
            .js
            .send_publish(self.subject(client_id), message)
            .await
            .map_err(|e| e.to_string())?;
        Ok(async move {
            let ack = answer.await.map_err(|e| e.to_string())?;
            Ok(Published {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            })
        })
    }
}

/// `error` with what NATS's "no stream found for given subject" means
/// here: not a deleted stream, but one without a leader for a moment.
pub fn explain(error: &str) -> String {
    if error.contains("no stream found") || error.contains("no responders") {
        format!(
            "{error} (the stream has no leader: a server was lost and the others are electing one, or fewer than a quorum are up)"
        )
    } else {
        error.to_owned()
    }
}

/// The subject of shard `shard` of stream `stream`: `tallyd.<stream>.<shard>`
/// (each stream its own subjects, so that two groups of tallyds may share
/// one NATS account).
pub fn subject(stream: &str, shard: u32) -> String {
    format!("tallyd.{stream}.{shard}")
}

/// The synthetic instance of a shard, whose flushes any tallyd may write:
/// SipHash-2-4 of `<stream>/<shard>`, the same on every tallyd.
pub fn shard_instance(stream: &str, shard: u32) -> u64 {
    let mut h = siphasher::sip::SipHasher24::new();
    h.write(format!("{stream}/{shard}").as_bytes());
    h.finish()
}

/// The `Nats-Msg-Id` of a client's batch: `<client_id>/<sequence>`, the
/// id hex-encoded after `h:` when it is not all visible ASCII or starts
/// with `h:` (a header holds no control character, and the two forms
/// never meet). `None` for an empty `client_id`, which opts out of
/// deduplication: two such batches must both be stored.
pub fn message_id(client_id: &str, sequence: u64) -> Option<String> {
    if client_id.is_empty() {
        return None;
    }
    let plain = client_id.bytes().all(|b| b.is_ascii_graphic()) && !client_id.starts_with("h:");
    Some(if plain {
        format!("{client_id}/{sequence}")
    } else {
        let hex: String = client_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("h:{hex}/{sequence}")
    })
}

/// How [`Publisher::connect`]'s error starts when the stream exists and
/// cannot hold what tallyd acknowledges (not worth a retry).
pub const UNFIT: &str = "unfit: ";

/// Whether an existing stream can hold what tallyd acknowledges.
fn check_stream(c: &stream::Config, spec: &StreamSpec) -> Result<(), String> {
    let name = &spec.name;
    if c.num_replicas < spec.replicas {
        return Err(format!(
            "stream {name} has {} replicas, fewer than replication.replicas ({})",
            c.num_replicas, spec.replicas
        ));
    }
    if c.storage != stream::StorageType::File {
        return Err(format!(
            "stream {name} keeps its messages in memory, not in files"
        ));
    }
    if c.persist_mode == Some(stream::PersistenceMode::Async) {
        return Err(format!(
            "stream {name} has persist_mode: async, which acknowledges writes before they are stored"
        ));
    }
    if c.max_age != Duration::ZERO || c.max_messages > 0 || c.max_messages_per_subject > 0 {
        return Err(format!(
            "stream {name} has max_age, max_msgs or max_msgs_per_subject, which delete messages tallyd has acknowledged and not yet aggregated"
        ));
    }
    if c.discard != stream::DiscardPolicy::New {
        return Err(format!(
            "stream {name} has discard: old, which deletes acknowledged messages when it is full"
        ));
    }
    if c.deny_purge {
        return Err(format!(
            "stream {name} has deny_purge, but tallyd purges each interval once ClickHouse has it"
        ));
    }
    if c.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "stream {name} does not keep messages until tallyd purges them (retention: limits)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_id_names_client_and_sequence_and_none_without_a_client() {
        assert_eq!(message_id("app-1", 7).as_deref(), Some("app-1/7"));
        // An empty client opts out of deduplication: no id, both stored.
        assert_eq!(message_id("", 7), None);
        // No control character reaches a header; the two forms never meet.
        assert_eq!(message_id("a\r\nb", 1).as_deref(), Some("h:610d0a62/1"));
        assert_eq!(message_id("h:0a", 1).as_deref(), Some("h:683a3061/1"));
        assert_ne!(message_id("\n", 1), message_id("h:0a", 1));
        assert_eq!(message_id("a b", 2).as_deref(), Some("h:612062/2"));
    }

    #[test]
    fn stream_settings_that_would_delete_acked_messages_are_refused() {
        let spec = StreamSpec {
            name: "T".into(),
            shards: 1,
            replicas: 3,
            duplicate_window: Duration::from_secs(120),
            max_bytes: 0,
        };
        let fit = stream::Config {
            num_replicas: 3,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        check_stream(&fit, &spec).expect("fit");
        for (unfit, why) in [
            (
                stream::Config {
                    max_age: Duration::from_secs(60),
                    ..fit.clone()
                },
                "max_age",
            ),
            (
                stream::Config {
                    max_messages: 10,
                    ..fit.clone()
                },
                "max_msgs",
            ),
            (
                stream::Config {
                    discard: stream::DiscardPolicy::Old,
                    ..fit.clone()
                },
                "discard: old",
            ),
            (
                stream::Config {
                    deny_purge: true,
                    ..fit.clone()
                },
                "deny_purge",
            ),
            (
                stream::Config {
                    num_replicas: 1,
                    ..fit.clone()
                },
                "replicas",
            ),
            (
                stream::Config {
                    storage: stream::StorageType::Memory,
                    ..fit.clone()
                },
                "memory",
            ),
        ] {
            let e = check_stream(&unfit, &spec).expect_err(why);
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
