//! A flush on its way to the sink (or an edge's forwarder), where each of
//! its bodies is sent from (memory, or a range of its spool file), and the
//! parked flushes taken back from the spool.

use std::sync::Arc;

use crate::ledger::Ledger;
use crate::outbox::flush::{BodyRanges, Flush};

/// A flush on its way to ClickHouse.
#[derive(Debug, Clone)]
pub struct Queued {
    pub flush: Arc<Flush>,
    /// Sent again from the spool after a restart: its rows count in
    /// `tallyd_rows_resent_total`, not `tallyd_rows_written_total`.
    pub resent: bool,
    /// `Some`: the flush's bodies are not in memory but in its spool file,
    /// at these (offset, length) byte ranges, one per table
    /// ([`Flush::body_ranges`]); each is read back a chunk at a time when
    /// it is sent ([`crate::ledger::Ledger::open_body`]). At 1M keys a body is tens of
    /// megabytes: held while ClickHouse takes it, it would double the
    /// memory of the flush being built meanwhile.
    pub spooled: Option<BodyRanges>,
}

impl Queued {
    /// `flush`, just recorded in the spool, queued without its bodies.
    pub fn recorded(flush: &Flush) -> Queued {
        Queued {
            flush: Arc::new(flush.without_bodies()),
            resent: false,
            spooled: Some(flush.body_ranges()),
        }
    }

    /// A flush whose bodies are in memory.
    pub fn in_memory(flush: Flush, resent: bool) -> Queued {
        Queued {
            flush: Arc::new(flush),
            resent,
            spooled: None,
        }
    }

    /// Bytes of table `table`'s body.
    pub fn body_len(&self, table: usize) -> u64 {
        match &self.spooled {
            Some(ranges) => ranges[table].1,
            None => self.flush.tables.bodies[table].len() as u64,
        }
    }
}

/// Table `.1`'s RowBinary body of flush `.0`, for a request body that
/// shares the flush's bytes.
pub(super) struct Shared(pub(super) Arc<Flush>, pub(super) usize);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0.tables.bodies[self.1]
    }
}

/// Where a table's body is sent from.
pub(super) enum Body {
    Memory(bytes::Bytes),
    /// A range of the flush's spool file (see [`Queued::spooled`]).
    Spooled((u64, u64)),
}

/// The oldest parked flushes, read back from the spool (several joined
/// into one, see [`Ledger::read_taken`]). One that does not decode is
/// quarantined by the ledger; one that cannot be read for another reason
/// is left on disk for the next start (and logged).
pub async fn next_parked(ledger: &Arc<Ledger>) -> Option<Queued> {
    loop {
        let taken = ledger.take_parked()?;
        let (l, t) = (Arc::clone(ledger), taken.clone());
        let read = tokio::task::spawn_blocking(move || l.read_taken(&t))
            .await
            .map_err(std::io::Error::other);
        match read {
            Ok(Ok((flush, spooled))) => {
                return Some(Queued {
                    flush: Arc::new(flush),
                    resent: taken.earlier,
                    spooled,
                });
            }
            Ok(Err(e)) | Err(e) => {
                tracing::error!(error = %e, flush_ids = ?taken.ids, "cannot read a parked flush back; skipped (a damaged one is moved aside, see /health)")
            }
        }
    }
}
