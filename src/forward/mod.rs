//! The edge's forwarder: the outbox's second destination. With
//! `[forward] upstreams`, a recorded flush goes to aggregator tallyds
//! instead of ClickHouse, as protobuf batches of forwarded state (protocol
//! version 2; [`encode`] makes them), and is complete (its spool file
//! goes) only once every part is acknowledged.
//!
//! The durable order is the sink's ([`crate::ledger`], steps 6 and 7):
//!
//! 1. the flush's sent marker is written: from then on it is never merged
//!    or joined again, so every send of it carries the same rows under the
//!    same sequences;
//! 2. each upstream gets its parts (pipelined on one TCP connection), and
//!    a part is done when the upstream answers `OK` (its WAL record is
//!    durable under the aggregator's `wal.sync`) or `DUPLICATE` (it took
//!    it before: an ack was lost, or this edge restarted after sending);
//! 3. when every part of every upstream is done, the flush is complete.
//!
//! Failures: a connection that fails or times out, `OVERLOADED`, or an
//! answer that is not an ack is retried with capped exponential backoff
//! and jitter, for as long as it takes; the flush waits in the spool (the
//! outage buffer, merged past `spool.max_size` as for ClickHouse).
//! `REJECTED` (a frame over the aggregator's `proto.max_frame`, a sequence
//! outside its deduplication window) and an `OK` without protocol version
//! 2 (an older tallyd, which cannot read state) are logged as errors and
//! retried the same way: nothing is completed that an aggregator did not
//! take.
//!
//! Hazard: a flush re-sent to a *second* aggregator after the first may
//! have taken it would count twice. A flush's keys go to the upstream
//! [`encode::upstream_of`] names among `upstreams`; as long as the list is
//! unchanged, every re-send goes where the first send went, and that
//! aggregator's deduplication (by edge and flush) answers `DUPLICATE`.
//! Changing the list while flushes wait moves their keys: do it with the
//! spool empty (`/metrics`: `tallyd_spool_flushes`).

pub mod encode;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::ForwardConfig;
use crate::ledger::Ledger;
use crate::outbox::rowbinary;
use crate::protocol::proto::{self, pb, pb::ack::Status};
use crate::sink::{Queued, backoff};
use crate::telemetry::Telemetry;

/// An ack's most bytes (its message is short).
const MAX_ACK: usize = 64 * 1024;

pub struct Forwarder {
    pub config: ForwardConfig,
    /// This edge's host (the rows' `host` under `forward.host = "keep"`).
    pub host: String,
    pub ledger: Arc<Ledger>,
    pub telemetry: Arc<Telemetry>,
}

/// Why a part was not taken.
#[derive(Debug, thiserror::Error)]
enum Failed {
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
    /// Forwards flushes until the queue closes and no flush is parked: the
    /// queue's first, then those parked in the spool, oldest first.
    pub async fn run(self, mut queue: mpsc::Receiver<Queued>) {
        let mut links: Vec<Option<TcpStream>> =
            self.config.upstreams.iter().map(|_| None).collect();
        let mut open = true;
        loop {
            let q = match queue.try_recv() {
                Ok(q) => q,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    match self.next_parked().await {
                        Some(q) => q,
                        None => return,
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => match self.next_parked().await {
                    Some(q) => q,
                    None if !open => return,
                    None => tokio::select! {
                        q = queue.recv() => match q {
                            Some(q) => q,
                            None => { open = false; continue; }
                        },
                        _ = self.ledger.parked() => continue,
                    },
                },
            };
            self.forward(&q, &mut links).await;
        }
    }

    /// Steps 1 to 3 for one flush.
    async fn forward(&self, q: &Queued, links: &mut [Option<TcpStream>]) {
        let flush_id = q.flush.flush_id;
        self.mark_sending(flush_id).await;
        let bodies = match &q.spooled {
            None => Ok(q.flush.tables.clone()),
            Some(ranges) => {
                let (l, f, r) = (Arc::clone(&self.ledger), Arc::clone(&q.flush), *ranges);
                blocking(move || l.read_bodies(&f, &r)).await
            }
        };
        let rows = bodies.and_then(|b| {
            rowbinary::decode(&b)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        });
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // Quarantined by the ledger (see /health), or not rows at all.
                let lost: u64 = q.flush.tables.rows.iter().map(|&r| u64::from(r)).sum();
                self.telemetry.rows_lost_damaged.fetch_add(lost, Relaxed);
                tracing::error!(error = %e, flush_id, rows = lost, "a flush's spool file is damaged or gone; its rows are lost");
                self.complete(flush_id).await;
                return;
            }
        };
        let client_id = encode::client_id(&self.host, q.flush.instance);
        let host = if self.config.keep_host {
            self.host.as_str()
        } else {
            ""
        };
        let shape = encode::Shape {
            upstreams: &self.config.upstreams,
            client_id: &client_id,
            flush_id,
            host,
            batch_size: self.config.batch_size,
        };
        let parts = encode::batches(&rows, &shape);
        drop(rows);
        for (u, parts) in parts.iter().enumerate() {
            if !parts.is_empty() {
                self.deliver(u, parts, &mut links[u], q.resent).await;
            }
        }
        self.complete(flush_id).await;
    }

    /// Sends `parts` to upstream `u` until each is taken, retrying for as
    /// long as it takes.
    async fn deliver(
        &self,
        u: usize,
        parts: &[pb::Batch],
        link: &mut Option<TcpStream>,
        resent: bool,
    ) {
        let upstream = &self.config.upstreams[u];
        let frames: Vec<Vec<u8>> = parts.iter().map(proto::encode_frame).collect();
        let mut done = vec![false; frames.len()];
        let mut attempt = 0u32;
        loop {
            let sent = tokio::time::timeout(
                self.config.timeout.saturating_mul(4),
                self.round(upstream, &frames, &mut done, link),
            )
            .await
            .unwrap_or(Err(Failed::Timeout(self.config.timeout)));
            match sent {
                Ok(()) => break,
                Err(e) => {
                    *link = None;
                    let delay = backoff(
                        attempt,
                        self.config.retry_initial,
                        self.config.retry_max,
                        crate::sink::jitter(),
                    );
                    self.telemetry.forward_retries.fetch_add(1, Relaxed);
                    match &e {
                        Failed::Refused { .. } | Failed::TooOld(_) => {
                            tracing::error!(%upstream, error = %e, retry_in = ?delay, "an upstream refuses a forwarded flush; it waits in the spool")
                        }
                        _ => {
                            tracing::warn!(%upstream, error = %e, retry_in = ?delay, "forwarding failed; will retry")
                        }
                    }
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
        let rows: u64 = parts
            .iter()
            .map(|p| (p.events.len() + p.dogstatsd_events.len() + p.service_checks.len()) as u64)
            .sum();
        let t = &self.telemetry;
        t.forward_batches.fetch_add(parts.len() as u64, Relaxed);
        if resent {
            t.forward_rows_resent.fetch_add(rows, Relaxed);
        } else {
            t.forward_rows.fetch_add(rows, Relaxed);
        }
        if attempt > 0 {
            tracing::info!(%upstream, attempts = attempt + 1, "forwarded after retries");
        }
    }

    /// One attempt: the parts not yet `done`, pipelined, then their acks in
    /// order.
    async fn round(
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
                    Status::Ok if ack.version < proto::VERSION => {
                        return Err(Failed::TooOld(ack.version.max(1)));
                    }
                    Status::Ok | Status::Duplicate => {
                        if status == Status::Duplicate {
                            self.telemetry.forward_duplicates.fetch_add(1, Relaxed);
                        }
                        if ack.rejected_events > 0 {
                            self.telemetry
                                .forward_rejected
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

    /// The oldest parked flushes, read back (several joined into one, see
    /// [`Ledger::read_taken`]). One that cannot be read is skipped (a
    /// damaged one is moved aside by the ledger).
    async fn next_parked(&self) -> Option<Queued> {
        loop {
            let taken = self.ledger.take_parked()?;
            let (l, t) = (Arc::clone(&self.ledger), taken.clone());
            match blocking(move || l.read_taken(&t)).await {
                Ok((flush, spooled)) => {
                    return Some(Queued {
                        flush: Arc::new(flush),
                        resent: taken.earlier,
                        spooled,
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, flush_ids = ?taken.ids, "cannot read a parked flush back; skipped (a damaged one is moved aside, see /health)")
                }
            }
        }
    }

    /// Step 1, retried until the marker is on disk.
    async fn mark_sending(&self, flush_id: u64) {
        let mut attempt = 0;
        loop {
            let l = Arc::clone(&self.ledger);
            match blocking(move || l.sending(flush_id)).await {
                Ok(()) => return,
                Err(e) => {
                    let c = &self.config;
                    let delay =
                        backoff(attempt, c.retry_initial, c.retry_max, crate::sink::jitter());
                    self.telemetry.spool_errors.fetch_add(1, Relaxed);
                    tracing::error!(error = %e, flush_id, retry_in = ?delay, "cannot write a flush's sent marker; it is not forwarded until it can");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Step 3: the flush's spool file goes.
    async fn complete(&self, flush_id: u64) {
        let l = Arc::clone(&self.ledger);
        if let Err(e) = blocking(move || l.complete(flush_id)).await {
            // The spool file stays: forwarded again (identical) at the next start.
            tracing::error!(error = %e, flush_id, "could not remove a forwarded flush from the spool");
        }
        crate::ledger::publish_backlog(&self.ledger, &self.telemetry);
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

/// Runs blocking spool work off the tokio workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
}

#[cfg(test)]
mod tests;
