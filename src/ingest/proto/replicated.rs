//! Protobuf batches with `[replication]` (docs/replication.md): each goes
//! to the stream and is answered by the stream's answer, not by the local
//! WAL. A connection sends its batches on as they come and answers them in
//! order as the stream does, so up to [`super::ACK_QUEUE`] are on their
//! way at once; past that it stops reading (the kernel pushes back on the
//! client).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::{ProtoIngest, ack, count};
use crate::ledger::dedup::MAX_CLIENT_ID;
use crate::protocol::proto::{Ack, pb::ack::Status};
use crate::replication::link::Link;
use crate::telemetry::replication::{DUPLICATE, STORED};

/// An ack, or the stream's answer that will make one.
pub(super) enum Answer {
    Now(Ack),
    Stream(Pin<Box<dyn Future<Output = Ack> + Send>>),
}

impl ProtoIngest {
    /// Publishes a batch to the stream: answered `OK` once stored,
    /// `DUPLICATE` when the stream had it (within its duplicate window),
    /// `OVERLOADED` (and the connection closed) when it refused or did not
    /// answer within `timeout`, or is not usable yet. Returns the answer,
    /// the WAL ticket (none) and whether to close now.
    pub(super) async fn replicate(
        &self,
        link: &Link,
        timeout: Duration,
        raw: &[u8],
        decoded: super::Decoded<'_>,
    ) -> (Answer, u64, bool) {
        let now = |a: Ack, close| {
            count(&self.telemetry, &a);
            (Answer::Now(a), 0, close)
        };
        let batch = match decoded {
            Ok(b) => b,
            Err(e) => {
                let message = format!("undecodable Batch: {e}");
                return now(ack(0, Status::Rejected, &message, 0), true);
            }
        };
        let sequence = batch.sequence;
        if batch.token.is_some() {
            let message = "a batch that carries a token must carry nothing else";
            return now(ack(sequence, Status::Rejected, message, 0), true);
        }
        if batch.client_id.len() > MAX_CLIENT_ID {
            let message = format!("client_id is longer than {MAX_CLIENT_ID} bytes");
            return now(ack(sequence, Status::Rejected, &message, 0), true);
        }
        let r = &self.telemetry.replication;
        let Some(publisher) = link.publisher() else {
            let why = link.not_ready().unwrap_or_default();
            let message = format!("the replication stream is not usable yet ({why}); retry later");
            r.publish_failed(&message);
            return now(ack(sequence, Status::Overloaded, &message, 0), true);
        };
        let started = Instant::now();
        let bytes = bytes::Bytes::copy_from_slice(raw);
        let sent = tokio::time::timeout(timeout, publisher.send(bytes, batch.client_id, sequence));
        let answer = match sent.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                let e = crate::replication::publish::explain(&e);
                let message = format!("the stream did not take it: {e}; retry later");
                r.publish_failed(&message);
                return now(ack(sequence, Status::Overloaded, &message, 0), true);
            }
            Err(_) => {
                let message = format!("the stream did not take it within {timeout:?}; retry later");
                r.publish_failed(&message);
                return now(ack(sequence, Status::Overloaded, &message, 0), true);
            }
        };
        let telemetry = Arc::clone(&self.telemetry);
        let answered = async move {
            let r = &telemetry.replication;
            let a = match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(p)) => {
                    telemetry
                        .latency
                        .replication_publish
                        .record(started.elapsed());
                    if p.duplicate {
                        r.published[DUPLICATE].fetch_add(1, Relaxed);
                        ack(sequence, Status::Duplicate, "already stored", 0)
                    } else {
                        r.published[STORED].fetch_add(1, Relaxed);
                        ack(sequence, Status::Ok, "", 0)
                    }
                }
                Ok(Err(e)) => {
                    let e = crate::replication::publish::explain(&e);
                    let message = format!("the stream did not store it: {e}; retry later");
                    r.publish_failed(&message);
                    ack(sequence, Status::Overloaded, &message, 0)
                }
                Err(_) => {
                    let message =
                        format!("the stream did not answer within {timeout:?}; retry later");
                    r.publish_failed(&message);
                    ack(sequence, Status::Overloaded, &message, 0)
                }
            };
            count(&telemetry, &a);
            a
        };
        (Answer::Stream(Box::pin(answered)), 0, false)
    }
}
