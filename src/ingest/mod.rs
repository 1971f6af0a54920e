//! Ingest: sockets, and the write-ahead order. Each listener reads blocks
//! of bytes (a datagram, a TCP read of whole lines) and hands them to
//! [`record::Recorder::block`], or, for datagrams found queued together,
//! [`record::Recorder::datagrams`], which record them in the WAL, then have
//! the aggregator apply them; parsing and aggregation live elsewhere.
//!
//! - [`record`]: record, then apply (the WAL's order, in one place).
//! - [`udp`]: one socket, read by several blocking receive threads.
//! - [`tcp`]: tokio tasks, newline framing, line and connection limits.
//! - [`proto`]: protobuf batches over TCP (acknowledged) and UDP.
//! - [`otlp`]: OpenTelemetry metrics over HTTP, acknowledged once durable.
//! - [`uds`]: DogStatsD over a Unix datagram socket, one blocking thread.

pub mod otlp;
pub mod proto;
pub mod record;
pub mod tcp;
pub mod udp;
pub mod uds;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::auth::{self, tls::Alpn, tls::Stream};
use crate::telemetry::Telemetry;

/// A listener the accept loop serves: TCP, or a Unix stream socket.
pub(crate) trait Listener {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A connection, and its peer as a log line names it.
    fn accept_stream(&self)
    -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept_stream(&self) -> std::io::Result<(TcpStream, String)> {
        self.accept().await.map(|(s, a)| (s, a.to_string()))
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<(tokio::net::UnixStream, String)> {
        self.accept().await.map(|(s, _)| (s, "unix".to_owned()))
    }
}

/// What a listener asks of a connection before serving it: TLS when the
/// guard says it speaks it, the handshake in the connection's own task
/// (within [`crate::auth::tls::HANDSHAKE_TIMEOUT`]); a refusal is counted
/// and logged at a bounded rate ([`crate::telemetry::refused`]).
/// How long a TLS handshake under way may go on after a stop.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone)]
pub struct Gate {
    pub listener: auth::Listener,
    pub guard: Arc<auth::Guard>,
    pub telemetry: Arc<Telemetry>,
    pub alpn: Alpn,
}

impl Gate {
    /// The stream to serve, or `None` when the handshake was refused, or
    /// had not ended [`STOP_GRACE`] after `stop` (a connection the drain
    /// took at a stop still gets its handshake, and its data counts).
    async fn open<S>(
        &self,
        stream: S,
        peer: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Stream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(tls) = self.guard.tls(self.listener) else {
            return Some(Stream::Plain(stream));
        };
        let stopped = async {
            let _ = stop.changed().await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::select! {
            r = tls.accept(stream, self.alpn) => match r {
                Ok(s) => Some(s),
                Err((reason, detail)) => {
                    self.telemetry.refused.refuse(self.listener, reason, peer, &detail);
                    None
                }
            },
            _ = stopped => None,
        }
    }
}

/// The accept loop the stream listeners (and the admin listener) share:
/// at most `max_connections` at once (more are closed at once, and
/// counted in `counted`'s `tallyd_tcp_connections_*` when given),
/// connection `n` gets WAL stream `streams.start + n % streams.len()`, and
/// passes `gate` (TLS) before `connection` sees it. Stops accepting when
/// `stop` turns true (connections the kernel had already completed are
/// taken, so what their clients sent is applied too), then waits for
/// every connection to finish.
pub(crate) async fn serve_connections<L, F, Fut>(
    listener: L,
    max_connections: usize,
    streams: Range<usize>,
    counted: Option<Arc<Telemetry>>,
    gate: Option<Gate>,
    mut stop: watch::Receiver<bool>,
    connection: F,
) where
    L: Listener,
    F: Fn(Stream<L::Stream>, usize, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let connection = Arc::new(connection);
    let mut connections = JoinSet::new();
    let mut accepted = 0usize;
    let mut serve = |(stream, peer): (L::Stream, String),
                     connections: &mut JoinSet<()>,
                     stop: &watch::Receiver<bool>| {
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(t) = &counted {
                t.tcp_connections_refused.fetch_add(1, Relaxed);
            }
            return;
        };
        if let Some(t) = &counted {
            t.tcp_connections.fetch_add(1, Relaxed);
        }
        let stream_index = streams.start + accepted % streams.len().max(1);
        accepted += 1;
        let mut stop = stop.clone();
        if *stop.borrow() {
            // Seen by the accept loop already: the connection must see it.
            stop.mark_changed();
        }
        let (gate, connection) = (gate.clone(), Arc::clone(&connection));
        connections.spawn(async move {
            let stream = match &gate {
                Some(gate) => {
                    let mut seen = stop.clone();
                    match gate.open(stream, &peer, &mut seen).await {
                        Some(s) => s,
                        None => return drop(slot),
                    }
                }
                None => Stream::Plain(stream),
            };
            connection(stream, stream_index, stop).await;
            drop(slot);
        });
    };
    loop {
        tokio::select! {
            result = listener.accept_stream() => match result {
                Ok(accepted) => serve(accepted, &mut connections, &stop),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    // Connections already completed by the kernel: their data counts too
    // (they see the stop at once and only drain).
    for _ in 0..max_connections {
        match tokio::time::timeout(std::time::Duration::ZERO, listener.accept_stream()).await {
            Ok(Ok(accepted)) => serve(accepted, &mut connections, &stop),
            _ => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one HTTP/1 connection with `svc` until it ends: one that sends
/// no request's headers within `header_timeout` is closed, and at `stop`
/// the request under way is finished, then the connection closed.
pub(crate) async fn serve_http1<T, S, B>(
    stream: T,
    svc: S,
    header_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Some(header_timeout))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection failed");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
