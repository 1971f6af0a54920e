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

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::telemetry::Telemetry;

/// A listener the accept loop serves: TCP, or a Unix stream socket.
pub(crate) trait Listener {
    type Stream;
    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept_stream(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<tokio::net::UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The accept loop the stream listeners (and the admin listener) share:
/// at most `max_connections` at once (more are closed at once, and
/// counted in `counted`'s `tallyd_tcp_connections_*` when given),
/// connection `n` gets WAL stream `streams.start + n % streams.len()`. Stops accepting when `stop`
/// turns true (connections the kernel had already completed are taken,
/// so what their clients sent is applied too), then waits for every
/// connection to finish.
pub(crate) async fn serve_connections<L, F, Fut>(
    listener: L,
    max_connections: usize,
    streams: Range<usize>,
    counted: Option<Arc<Telemetry>>,
    mut stop: watch::Receiver<bool>,
    connection: F,
) where
    L: Listener,
    F: Fn(L::Stream, usize, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    let mut accepted = 0usize;
    let mut serve = |stream, connections: &mut JoinSet<()>, stop: &watch::Receiver<bool>| {
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
        let task = connection(stream, stream_index, stop);
        connections.spawn(async move {
            task.await;
            drop(slot);
        });
    };
    loop {
        tokio::select! {
            result = listener.accept_stream() => match result {
                Ok(stream) => serve(stream, &mut connections, &stop),
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
            Ok(Ok(stream)) => serve(stream, &mut connections, &stop),
            _ => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one HTTP/1 connection with `svc` until it ends: one that sends
/// no request's headers within `header_timeout` is closed, and at `stop`
/// the request under way is finished, then the connection closed.
pub(crate) async fn serve_http1<S, B>(
    stream: TcpStream,
    svc: S,
    header_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) where
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
