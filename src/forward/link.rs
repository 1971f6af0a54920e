//! One upstream's connection: a round of pipelined parts and their acks
//! in order, and why a round failed.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Forwarder;
use crate::protocol::proto::{self, pb, pb::ack::Status};

/// An ack's most bytes (its message is short).
const MAX_ACK: usize = 64 * 1024;

/// Why a part was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failed {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
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
        link: &mut Option<TcpStream>,
    ) -> Result<(), Failed> {
        let stream = match link {
            Some(s) => s,
            None => {
                let s = tokio::time::timeout(self.config.timeout, TcpStream::connect(upstream))
                    .await
                    .map_err(|_| Failed::Timeout(self.config.timeout))??;
                s.set_nodelay(true)?;
                link.insert(s)
            }
        };
        let todo: Vec<usize> = (0..frames.len()).filter(|&i| !done[i]).collect();
        let (mut reader, mut writer) = stream.split();
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
