//! Acknowledged batches to the stream (docs/replication.md, format 1): the
//! `Batch` bytes as the client framed them, on subject `tallyd.b.<shard>`
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
        let config = stream::Config {
            name: spec.name.clone(),
            subjects: vec!["tallyd.b.*".into()],
            // Limits, not WorkQueue: a work queue requires an ack per
            // message (JetStream error 10098); a confirmed cut is purged
            // from its shard's subject instead, in one request.
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: spec.replicas,
            duplicate_window: spec.duplicate_window,
            max_bytes: match spec.max_bytes {
                0 => -1,
                n => i64::try_from(n).unwrap_or(i64::MAX),
            },
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let mut stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| format!("cannot make or read stream {}: {e}", spec.name))?;
        let info = stream
            .info()
            .await
            .map_err(|e| format!("cannot read stream {}: {e}", spec.name))?;
        check_stream(&info.config, &spec).map_err(|e| format!("{UNFIT}{e}"))?;
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
        format!(
            "tallyd.b.{}",
            h.finish() % u64::from(self.spec.shards.max(1))
        )
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
        let message = PublishMessage::build()
            .payload(batch)
            // After the headers: `headers` replaces the map the id is in.
            .headers(headers)
            .message_id(format!("{client_id}/{sequence}"));
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
    if c.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "stream {name} does not keep messages until tallyd purges them (retention: limits)"
        ));
    }
    Ok(())
}
