//! One upstream's connection: a round of pipelined parts and their acks
//! in order, and why a round failed.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Forwarder;
use crate::auth::tls::Stream;
use crate::protocol::proto::{self, pb, pb::ack::Status};

/// A connection to an upstream: plain TCP, or TLS (`forward.tls`).
pub(super) type Link = Stream<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// An ack's most bytes (its message is short).
const MAX_ACK: usize = 64 * 1024;

/// Why a part was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failed {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the upstream answered {status:?}: {message}")]
    Refused { status: Status, message: String },
    #[error(
        "the upstream speaks protocol version {0}, not 2: it cannot read forwarded state (upgrade it)"
    )]
    TooOld(u32),
}

impl Forwarder {
    /// One attempt: the parts not yet `done`, pipelined, then their acks in
    /// order.
    pub(super) async fn round(
        &self,
        upstream: &str,
        frames: &[Vec<u8>],
        done: &mut [bool],
        link: &mut Option<Link>,
    ) -> Result<(), Failed> {
        let stream = match link {
            Some(s) => s,
            None => {
                let timeout = self.config.timeout;
                let s = tokio::time::timeout(timeout, self.connect(upstream))
                    .await
                    .map_err(|_| Failed::Timeout(timeout))??;
                link.insert(s)
            }
        };
        let todo: Vec<usize> = (0..frames.len()).filter(|&i| !done[i]).collect();
        let (mut reader, mut writer) = tokio::io::split(&mut *stream);
        let write = async {
            for &i in &todo {
                writer.write_all(&frames[i]).await?;
            }
            writer.flush().await
        };
        let read = async {
            let mut buf = Vec::new();
            for &i in &todo {
                let ack = read_ack(&mut reader, &mut buf, self.config.timeout).await?;
                let status = Status::try_from(ack.status).unwrap_or(Status::Rejected);
                match status {
                    Status::Ok | Status::Duplicate if ack.version < proto::VERSION => {
                        return Err(Failed::TooOld(ack.version.max(1)));
                    }
                    Status::Ok | Status::Duplicate => {
                        if status == Status::Duplicate {
                            self.telemetry.fleet.duplicates.fetch_add(1, Relaxed);
                        }
                        if ack.rejected_events > 0 {
                            self.telemetry
                                .fleet
                                .rejected
                                .fetch_add(u64::from(ack.rejected_events), Relaxed);
                            tracing::warn!(%upstream, rejected = ack.rejected_events, message = %ack.message, "an upstream refused rows of a forwarded batch (its limits); they are lost");
                        }
                        done[i] = true;
                    }
                    _ => {
                        return Err(Failed::Refused {
                            status,
                            message: ack.message,
                        });
                    }
                }
            }
            Ok::<(), Failed>(())
        };
        let (written, read) = tokio::join!(write, read);
        written?;
        read
    }
}

impl Forwarder {
    /// A new connection: TCP, TLS when `forward.tls` (the upstream's host
    /// as the server name), then the token when one is set (a batch of
    /// its own, whose ack must be `OK`).
    async fn connect(&self, upstream: &str) -> Result<Link, Failed> {
        let tcp = TcpStream::connect(upstream).await?;
        tcp.set_nodelay(true)?;
        let mut link = match &self.config.tls {
            None => Stream::Plain(tcp),
            Some(files) => {
                let config = crate::sink::tls::client_config(files).map_err(Failed::Tls)?;
                let host = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| Failed::Tls(format!("{host:?} is not a server name: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
                let tls = connector.connect(name, tcp).await.map_err(|e| {
                    let reason = crate::sink::tls::tls_reason(&e).unwrap_or_else(|| e.to_string());
                    Failed::Tls(reason)
                })?;
                Stream::Tls(Box::new(tls))
            }
        };
        if let Some(token) = &self.config.token {
            let hello = pb::Batch {
                token: token.expose().to_owned(),
                version: proto::VERSION,
                ..Default::default()
            };
            link.write_all(&proto::encode_frame(&hello)).await?;
            let ack = read_ack(&mut link, &mut Vec::new(), self.config.timeout).await?;
            if ack.status != Status::Ok as i32 {
                let status = Status::try_from(ack.status).unwrap_or(Status::Rejected);
                return Err(Failed::Refused {
                    status,
                    message: ack.message,
                });
            }
        }
        Ok(link)
    }
}

/// Reads one length-delimited ack within `timeout`.
async fn read_ack(
    reader: &mut (impl AsyncReadExt + Unpin),
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<pb::Ack, Failed> {
    let read = async {
        loop {
            match proto::frame_header(buf, MAX_ACK) {
                Ok(Some((prefix, len))) if buf.len() >= prefix + len => {
                    let ack = pb::Ack::decode(&buf[prefix..prefix + len])
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    buf.drain(..prefix + len);
                    return Ok(ack);
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e).into());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Failed::Timeout(timeout))?
}
