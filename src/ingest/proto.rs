//! Protobuf ingest: length-delimited `Batch`es over TCP, acknowledged once
//! durable, and one `Batch` per UDP datagram, unacknowledged.
//!
//! TCP: each connection has a reader task and an ack writer task joined by a
//! bounded queue of acks (so the reader can go on while earlier acks wait
//! for the WAL's sync). Acks go out in order, each only after its batch is
//! durable under the WAL's sync policy. A frame over `max_frame` or one that
//! does not decode gets a `REJECTED` ack and the connection is closed. When
//! the WAL ring is full the reader stops reading (the kernel pushes back on
//! the client) and retries; past `overload_timeout` it answers `OVERLOADED`
//! and closes the connection, so that no later frame of that connection
//! overtakes the refused one; the client retries the same sequence later
//! (any order is fine: see [`crate::ledger::dedup`]).
//!
//! The ack contract: `OK` is sent once the batch's WAL record is durable
//! under `wal.sync` (and never while a failed sync has not been followed by
//! a full one); `DUPLICATE` once the batch was accepted before (and its
//! original is durable); `REJECTED` for an undecodable, oversize, too-old
//! (below the client's dedup window) batch or an overlong client id, then
//! the connection closes. With `wal.enabled = false`, `OK` means the batch
//! is applied in memory: a crash before its flush reaches ClickHouse loses
//! it.
//!
//! Tokens (`auth.token_file`): a connection sends its token first, in a
//! batch of its own (`Batch.token`), answered `OK` and recorded nowhere;
//! until then every batch is answered `UNAUTHENTICATED`, a wrong token too,
//! and the connection closes (counted in `tallyd_refused_total`). A batch
//! with a token and anything else is `REJECTED`, on TCP and UDP, so that no
//! token is ever written to the WAL. UDP batches carry no token: UDP has
//! no connection to authenticate (`check-config` warns).

use std::net::UdpSocket;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::record::Recorder;
use crate::aggregate::Scratch;
use crate::auth::tls::{Alpn, Stream};
use crate::auth::{self, Guard, Refusal};
use crate::ledger::dedup::{Admit, Dedup, MAX_CLIENT_ID, WINDOW};
use crate::protocol::batch::BatchView;
use crate::protocol::proto::{self, Ack, FrameError, pb::ack::Status};
use crate::telemetry::{BlockStats, Telemetry};
use crate::wal::AppendError;

const READ_BUF: usize = 64 * 1024;
const WAL_RETRY: Duration = Duration::from_millis(10);
/// Acks a connection may have waiting for durability before it stops reading.
const ACK_QUEUE: usize = 1024;

mod replicated;
use replicated::Answer;

/// Counts an answer by status (`tallyd_proto_batches_total`).
fn count(telemetry: &Telemetry, a: &Ack) {
    let i = usize::try_from(a.status).unwrap_or(0).min(4);
    telemetry.proto_acks[i].fetch_add(1, Relaxed);
}

#[derive(Clone)]
pub struct ProtoIngest {
    /// The aggregator and the WAL (acks wait for its durability).
    pub recorder: Recorder,
    pub telemetry: Arc<Telemetry>,
    pub dedup: Arc<Dedup>,
    pub max_frame: usize,
    pub max_connections: usize,
    pub overload_timeout: Duration,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// WAL streams, shared with StatsD TCP: connection `n` uses `start + n % len`.
    pub wal_streams: Range<usize>,
    /// TLS (`tls.listeners` names `proto_tcp`) and the tokens asked for.
    pub guard: Arc<Guard>,
    /// With `[replication]`, the link to the stream and the publish
    /// timeout: batches go to the stream, answered once it has them
    /// (docs/replication.md), instead of to the WAL here.
    pub replication: Option<(Arc<crate::replication::link::Link>, Duration)>,
}

/// A frame, decoded as a `Batch`, or why it does not decode.
type Decoded<'a> = Result<BatchView<'a>, crate::protocol::batch::DecodeError>;

/// What a TCP connection does with a frame before the WAL sees it.
enum Entry<'a> {
    /// A batch to handle, decoded (or why not) once for both.
    Handle(Decoded<'a>),
    /// A token batch, accepted (or with no token asked for): answered.
    Answer(Ack),
    /// Refused: answered, and the connection closes.
    Close(Ack),
}

/// What a frame produced.
enum Handled {
    /// Acknowledge when `ticket` is durable.
    Ack(Ack, u64),
    /// The WAL is full: try again later.
    Full,
    /// Answer and close the connection.
    Reject(Ack),
}

fn ack(sequence: u64, status: Status, message: &str, rejected_events: u32) -> Ack {
    Ack {
        sequence,
        status: status as i32,
        message: message.to_owned(),
        rejected_events,
        version: proto::VERSION,
    }
}

impl ProtoIngest {
    /// Decodes and applies one batch (its encoded bytes, without prefix),
    /// counting it in `stats` when accepted (the caller records them, once
    /// per batch of datagrams on UDP).
    fn handle(&self, raw: &[u8], scratch: &mut Scratch, stats: &mut BlockStats) -> Handled {
        self.handle_decoded(raw, BatchView::decode(raw), scratch, stats)
    }

    /// [`Self::handle`] of a batch already decoded from `raw`.
    fn handle_decoded(
        &self,
        raw: &[u8],
        decoded: Decoded<'_>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> Handled {
        let batch = match decoded {
            Ok(b) => b,
            Err(e) => {
                return Handled::Reject(ack(
                    0,
                    Status::Rejected,
                    &format!("undecodable Batch: {e}"),
                    0,
                ));
            }
        };
        if batch.token.is_some() {
            // Never into the WAL: a token goes in a batch of its own, on
            // TCP (answered before it gets here).
            let message = "a batch that carries a token must carry nothing else, and only on TCP (a token is never written to the WAL)";
            return Handled::Reject(ack(batch.sequence, Status::Rejected, message, 0));
        }
        // Under the client's lock: the check, the WAL append and the mark;
        // the apply after it, so that one client's batches on several
        // threads do not wait for each other's apply.
        let admitted = self.dedup.admit(batch.client_id, batch.sequence, || {
            self.recorder.record_batch(raw, scratch)
        });
        match admitted {
            Ok(Admit::Accepted(recorded)) => {
                let rejected = self
                    .recorder
                    .apply_recorded(&recorded, &batch, scratch, stats);
                let ticket = recorded.ticket;
                stats.blocks += 1;
                stats.bytes += raw.len() as u64;
                self.heard(&batch);
                Handled::Ack(ack(batch.sequence, Status::Ok, "", rejected), ticket)
            }
            Ok(Admit::Duplicate) => {
                let ticket = self.recorder.wal.as_ref().map_or(0, |w| w.ticket());
                let message = "already accepted";
                Handled::Ack(ack(batch.sequence, Status::Duplicate, message, 0), ticket)
            }
            Ok(Admit::TooOld) => {
                self.telemetry.proto_too_old.fetch_add(1, Relaxed);
                let message = format!(
                    "sequence {} is more than {WINDOW} below this client's highest accepted sequence: tallyd can no longer tell whether it was accepted",
                    batch.sequence
                );
                Handled::Reject(ack(batch.sequence, Status::Rejected, &message, 0))
            }
            Ok(Admit::BadClientId) => {
                let message = format!("client_id is longer than {MAX_CLIENT_ID} bytes");
                Handled::Reject(ack(batch.sequence, Status::Rejected, &message, 0))
            }
            Err(AppendError::Full) => {
                self.telemetry.wal_refused(AppendError::Full);
                Handled::Full
            }
            Err(AppendError::TooLarge) => {
                self.telemetry.wal_refused(AppendError::TooLarge);
                Handled::Reject(ack(
                    batch.sequence,
                    Status::Rejected,
                    "batch larger than a WAL segment",
                    0,
                ))
            }
        }
    }

    /// Notes an edge's batch of forwarded state (protocol version 2): who,
    /// and its newest interval (`tallyd_edges_seen`, `tallyd_edge_lag_seconds`).
    fn heard(&self, batch: &BatchView<'_>) {
        if batch.version < 2 || batch.client_id.is_empty() {
            return;
        }
        let newest = batch.events().map(|e| e.interval_start).max();
        if let Some(newest) = newest.filter(|&n| n > 0) {
            let now = crate::notify::now_ms();
            self.telemetry.fleet.heard(batch.client_id, newest, now);
        }
    }

    /// A frame on a connection that has shown `shown` (its token batch's
    /// token, if any), against the tokens asked for now: a reload that
    /// removes a token refuses the connections that showed it at their
    /// next frame.
    fn entry<'a>(&self, raw: &'a [u8], shown: &mut Option<Vec<u8>>, peer: &str) -> Entry<'a> {
        let tokens = self.guard.tokens();
        // The connection's standing without a new token: `None` to go on.
        let standing = |sequence| match (&tokens, shown.as_deref()) {
            (None, _) => None,
            (Some(t), Some(s)) if t.accepts(s) => None,
            (Some(_), Some(_)) => Some(self.unauthenticated(sequence, Refusal::TokenWrong, peer)),
            (Some(_), None) => Some(self.unauthenticated(sequence, Refusal::TokenMissing, peer)),
        };
        let batch = match BatchView::decode(raw) {
            Ok(b) => b,
            // `handle` says why it does not decode, to a connection that
            // may send batches.
            Err(e) => return standing(0).unwrap_or(Entry::Handle(Err(e))),
        };
        match batch.token {
            None => standing(batch.sequence).unwrap_or(Entry::Handle(Ok(batch))),
            // `handle` refuses it: a token never goes to the WAL.
            Some(_) if batch.len > 0 || batch.notes > 0 => Entry::Handle(Ok(batch)),
            Some(t) if tokens.as_ref().is_some_and(|ts| !ts.accepts(t)) => {
                self.unauthenticated(batch.sequence, Refusal::TokenWrong, peer)
            }
            Some(t) => {
                *shown = Some(t.to_vec());
                Entry::Answer(ack(batch.sequence, Status::Ok, "token accepted", 0))
            }
        }
    }

    fn unauthenticated(&self, sequence: u64, reason: Refusal, peer: &str) -> Entry<'static> {
        let message = match reason {
            Refusal::TokenWrong => "the token is not one this listener accepts",
            _ => {
                "this listener needs a token first: a Batch with only its token field set (auth.token_file)"
            }
        };
        self.telemetry
            .refused
            .refuse(auth::Listener::ProtoTcp, reason, peer, message);
        Entry::Close(ack(sequence, Status::Unauthenticated, message, 0))
    }

    /// Counts an answer by status (`tallyd_proto_batches_total`).
    fn count(&self, a: &Ack) {
        count(&self.telemetry, a)
    }

    /// Accepts connections until `stop` turns true, then lets each one
    /// finish the frames it holds and send their acks.
    pub async fn serve_tcp(self, listener: TcpListener, stop: watch::Receiver<bool>) {
        let (max, streams, telemetry) = (
            self.max_connections,
            self.wal_streams.clone(),
            Arc::clone(&self.telemetry),
        );
        let gate = super::Gate {
            listener: auth::Listener::ProtoTcp,
            guard: Arc::clone(&self.guard),
            telemetry: Arc::clone(&telemetry),
            alpn: Alpn::None,
        };
        super::serve_connections(
            listener,
            max,
            streams,
            Some(telemetry),
            Some(gate),
            stop,
            move |stream, wal_stream, stop| {
                let this = self.clone();
                async move { this.connection(stream, wal_stream, stop).await }
            },
        )
        .await;
    }

    async fn connection(
        &self,
        stream: Stream<TcpStream>,
        wal_stream: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let peer = stream.peer();
        let mut shown = None;
        let (mut reader, mut writer) = tokio::io::split(stream);
        // Each ack with the WAL ticket it waits for and when its batch
        // was taken (an ack's latency: until it is written).
        let (acks, mut queue) = mpsc::channel::<(Answer, u64, Instant)>(ACK_QUEUE);
        let wal = self.recorder.wal.clone();
        let telemetry = Arc::clone(&self.telemetry);
        let ack_writer = tokio::spawn(async move {
            while let Some((answer, ticket, taken)) = queue.recv().await {
                // The stream's answer, in the order the batches came.
                let (ack, close) = match answer {
                    Answer::Now(ack) => (ack, false),
                    Answer::Stream(answer) => {
                        let ack = answer.await;
                        let close = ack.status == Status::Overloaded as i32;
                        (ack, close)
                    }
                };
                if let Some(wal) = &wal
                    && !wal.wait_durable(ticket).await
                {
                    // Never durable before shutdown: no ack; the client
                    // retries, and the batch is counted once.
                    return;
                }
                if writer.write_all(&proto::encode_frame(&ack)).await.is_err() {
                    return;
                }
                telemetry.latency.proto_ack.record(taken.elapsed());
                if close {
                    // Like OVERLOADED on the WAL path: the client retries
                    // on a new connection (the reader sees this end).
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        let mut scratch = Scratch::for_stream(wal_stream);
        let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
        let mut chunk = vec![0u8; READ_BUF];
        'read: loop {
            // Every complete frame in the buffer.
            loop {
                let (prefix, len) = match proto::frame_header(&buf, self.max_frame) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        self.telemetry.proto_frames_too_large.fetch_add(1, Relaxed);
                        let message = match e {
                            FrameError::TooLarge(n) if n != u64::MAX => format!(
                                "frame of {n} bytes is over the {} byte limit",
                                self.max_frame
                            ),
                            _ => format!("{e} (limit {} bytes)", self.max_frame),
                        };
                        let a = ack(0, Status::Rejected, &message, 0);
                        self.count(&a);
                        let _ = acks.send((Answer::Now(a), 0, Instant::now())).await;
                        break 'read;
                    }
                };
                if buf.len() < prefix + len {
                    break;
                }
                let raw = &buf[prefix..prefix + len];
                let decoded = match self.entry(raw, &mut shown, &peer) {
                    Entry::Handle(decoded) => decoded,
                    Entry::Answer(a) => {
                        // A token batch: answered, not counted as data.
                        buf.drain(..prefix + len);
                        if acks
                            .send((Answer::Now(a), 0, Instant::now()))
                            .await
                            .is_err()
                        {
                            break 'read;
                        }
                        continue;
                    }
                    Entry::Close(a) => {
                        self.count(&a);
                        let _ = acks.send((Answer::Now(a), 0, Instant::now())).await;
                        break 'read;
                    }
                };
                let taken = Instant::now();
                let (answer, ticket, close) = match &self.replication {
                    Some((link, timeout)) => self.replicate(link, *timeout, raw, decoded).await,
                    None => {
                        let (a, ticket, close) =
                            self.handle_with_retry(raw, decoded, &mut scratch).await;
                        self.count(&a);
                        (Answer::Now(a), ticket, close)
                    }
                };
                buf.drain(..prefix + len);
                if acks.send((answer, ticket, taken)).await.is_err() || close {
                    break 'read;
                }
            }
            let n = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, reader.read(&mut chunk)) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        self.telemetry.connections_idle_closed.fetch_add(1, Relaxed);
                        break 'read;
                    }
                },
                _ = stop.changed() => break 'read,
            };
            match n {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        drop(acks);
        let _ = ack_writer.await;
    }

    /// Retries a batch the full WAL refused until `overload_timeout`, then
    /// answers `OVERLOADED` (nothing applied; the client retries later).
    /// Returns the ack, the WAL ticket it waits for, and whether to close.
    async fn handle_with_retry(
        &self,
        raw: &[u8],
        decoded: Decoded<'_>,
        scratch: &mut Scratch,
    ) -> (Ack, u64, bool) {
        let deadline = Instant::now() + self.overload_timeout;
        loop {
            let mut stats = BlockStats::default();
            let handled = self.handle_decoded(raw, decoded.clone(), scratch, &mut stats);
            if stats.blocks > 0 {
                self.telemetry.record_block(&self.telemetry.proto, &stats);
            }
            match handled {
                Handled::Full if Instant::now() < deadline => tokio::time::sleep(WAL_RETRY).await,
                Handled::Full => {
                    let sequence = decoded.as_ref().map_or(0, |b| b.sequence);
                    let message = "the write-ahead log is full; retry later";
                    return (ack(sequence, Status::Overloaded, message, 0), 0, true);
                }
                Handled::Ack(a, ticket) => return (a, ticket, false),
                Handled::Reject(a) => return (a, 0, true),
            }
        }
    }

    /// One `Batch` per datagram, no ack, read by the StatsD path's
    /// receive threads ([`super::udp::spawn_with`]: a lead and helpers on
    /// one socket, the datagrams queued together taken at once); they stop
    /// when `stop` is set. Every datagram is counted once by its outcome
    /// (`tallyd_proto_batches_total`), or by the kernel as dropped
    /// (`tallyd_dropped_total{reason="udp_kernel",listener="proto"}`).
    pub fn spawn_udp(
        self,
        sockets: Vec<UdpSocket>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        let telemetry = Arc::clone(&self.telemetry);
        let streams = self.wal_streams.clone();
        let name = "tallyd-proto-udp";
        super::udp::spawn_with(sockets, streams, name, &telemetry, stop, |stream| {
            let this = self.clone();
            let mut scratch = Scratch::for_stream(stream);
            move |batch: &mut super::udp::Batch, stream: usize| {
                scratch.wal_stream = stream;
                let mut stats = BlockStats::default();
                for datagram in batch.each() {
                    // No ack: a refused or undecodable datagram is counted,
                    // not answered.
                    match this.handle(datagram, &mut scratch, &mut stats) {
                        Handled::Ack(a, _) | Handled::Reject(a) => this.count(&a),
                        Handled::Full => {
                            this.telemetry.proto_acks[Status::Overloaded as usize]
                                .fetch_add(1, Relaxed);
                        }
                    }
                }
                this.recorder.settle(stream);
                this.telemetry.record_block(&this.telemetry.proto, &stats);
                if batch.too_large() > 0 {
                    this.telemetry
                        .datagrams_too_large
                        .fetch_add(batch.too_large(), Relaxed);
                }
            }
        })
    }
}
