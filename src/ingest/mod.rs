//! Ingest: sockets only. Each listener reads blocks of bytes (a datagram, a
//! TCP read of whole lines) and hands them to
//! [`Aggregator::ingest_block`](crate::aggregate::Aggregator::ingest_block);
//! parsing and aggregation live elsewhere.
//!
//! - [`udp`]: `SO_REUSEPORT` sockets, one blocking receive thread each.
//! - [`tcp`]: tokio tasks, newline framing, line and connection limits.
//! - [`proto`]: protobuf batches over TCP (acknowledged) and UDP.
//! - [`uds`]: DogStatsD over a Unix datagram socket, one blocking thread.

pub mod proto;
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

/// The accept loop both TCP listeners share: at most `max_connections`
/// at once (more are closed at once and counted), connection `n` gets WAL
/// stream `streams.start + n % streams.len()`. Stops accepting when `stop`
/// turns true, then waits for every connection to finish.
pub(crate) async fn serve_connections<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    streams: Range<usize>,
    telemetry: Arc<Telemetry>,
    mut stop: watch::Receiver<bool>,
    connection: F,
) where
    F: Fn(TcpStream, usize, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    let mut accepted = 0usize;
    loop {
        tokio::select! {
            result = listener.accept() => match result {
                Ok((stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        telemetry.tcp_connections_refused.fetch_add(1, Relaxed);
                        continue;
                    };
                    telemetry.tcp_connections.fetch_add(1, Relaxed);
                    let stream_index = streams.start + accepted % streams.len().max(1);
                    accepted += 1;
                    let task = connection(stream, stream_index, stop.clone());
                    connections.spawn(async move {
                        task.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
