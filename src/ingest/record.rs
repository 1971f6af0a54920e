//! Record, then apply: the write-ahead order of every block, in one place.
//!
//! A block (a datagram, a TCP read of whole lines, a Unix stream frame, a
//! protobuf batch) is appended to its worker's WAL stream under the
//! current generation's id, and only then applied to that same generation
//! ([`crate::aggregate`] does no I/O). Before a generation's first block,
//! its start goes to the WAL too (a [`Kind::Start`] record), so that a
//! replay rebuilds it with the live start: the same `ts` and `|T` window.
//! A block the WAL refuses is not applied; the caller counts or retries it.

use std::ops::Range;
use std::sync::Arc;

use crate::aggregate::{Aggregator, Generation, Scratch};
use crate::protocol::batch::BatchView;
use crate::telemetry::BlockStats;
use crate::wal::format::Kind;
use crate::wal::{AppendError, Wal};

/// A protobuf batch in the WAL, not yet applied: its generation (held, so
/// its flush waits) and the WAL ticket its ack waits for.
pub struct Recorded {
    generation: Arc<Generation>,
    pub ticket: u64,
}

/// The aggregator, with the WAL its blocks are recorded in first (without
/// one, blocks are applied at once).
#[derive(Clone)]
pub struct Recorder {
    pub aggregator: Arc<Aggregator>,
    pub wal: Option<Arc<Wal>>,
}

impl Recorder {
    pub fn new(aggregator: Arc<Aggregator>, wal: Option<Arc<Wal>>) -> Recorder {
        Recorder { aggregator, wal }
    }

    /// Records `block` in the WAL (if there is one), then parses every line
    /// and applies the good ones (malformed lines are counted by reason in
    /// `stats` and skipped). When the WAL cannot take the block, nothing is
    /// applied and the error is returned.
    pub fn block(
        &self,
        block: &[u8],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> Result<(), AppendError> {
        let generation = self.aggregator.current();
        if let Some(wal) = &self.wal {
            record_start(wal, scratch.wal_stream, &generation)?;
            wal.append(scratch.wal_stream, generation.id, Kind::Statsd, block)?;
        }
        stats.blocks += 1;
        stats.bytes += block.len() as u64;
        self.aggregator
            .apply_block(&generation, block, scratch, stats);
        Ok(())
    }

    /// Records each datagram of a batch in the WAL (a record each, as
    /// [`Recorder::block`] would), then parses and applies the recorded
    /// ones together (see [`Aggregator::ingest_datagrams`] for `joined` and
    /// `datagrams`). A datagram the WAL refuses is not applied; its error
    /// goes to `refused`.
    pub fn datagrams(
        &self,
        joined: &[u8],
        datagrams: &[Range<usize>],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
        mut refused: impl FnMut(AppendError),
    ) {
        let generation = self.aggregator.current();
        // The start of the recorded datagrams not yet applied.
        let mut from = 0;
        for d in datagrams {
            let Some(datagram) = joined.get(d.clone()) else {
                continue;
            };
            if let Some(wal) = &self.wal
                && let Err(e) = record_start(wal, scratch.wal_stream, &generation).and_then(|()| {
                    wal.append(scratch.wal_stream, generation.id, Kind::Statsd, datagram)
                })
            {
                refused(e);
                let before = joined.get(from..d.start).unwrap_or_default();
                self.aggregator
                    .apply_block(&generation, before, scratch, stats);
                from = d.end;
                continue;
            }
            stats.blocks += 1;
            stats.bytes += datagram.len() as u64;
        }
        let rest = joined.get(from..).unwrap_or_default();
        self.aggregator
            .apply_block(&generation, rest, scratch, stats);
    }

    /// Records a protobuf batch (`raw`, its encoded bytes) in the WAL, then
    /// applies its valid events. Returns the WAL ticket (0 without a WAL)
    /// and how many events were invalid and skipped.
    pub fn batch(
        &self,
        raw: &[u8],
        batch: &BatchView<'_>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> Result<(u64, u32), AppendError> {
        let recorded = self.record_batch(raw, scratch)?;
        let rejected = self.apply_recorded(&recorded, batch, scratch, stats);
        Ok((recorded.ticket, rejected))
    }

    /// The first half of [`Recorder::batch`]: records `raw` in the WAL
    /// (if there is one), in the current generation, which the returned
    /// [`Recorded`] holds until it is applied.
    pub fn record_batch(&self, raw: &[u8], scratch: &Scratch) -> Result<Recorded, AppendError> {
        self.record(Kind::Proto, raw, scratch)
    }

    /// Records `payload` of `kind` in the WAL (if there is one), in the
    /// current generation, after its start record.
    fn record(
        &self,
        kind: Kind,
        payload: &[u8],
        scratch: &Scratch,
    ) -> Result<Recorded, AppendError> {
        let generation = self.aggregator.current();
        let ticket = match &self.wal {
            Some(wal) => {
                record_start(wal, scratch.wal_stream, &generation)?;
                wal.append(scratch.wal_stream, generation.id, kind, payload)?
            }
            None => 0,
        };
        Ok(Recorded { generation, ticket })
    }

    /// The second half: applies the batch recorded to its generation (the
    /// one its record names, even if the interval has closed since: the
    /// flush waits for it). Returns how many events were invalid.
    pub fn apply_recorded(
        &self,
        recorded: &Recorded,
        batch: &BatchView<'_>,
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> u32 {
        self.aggregator
            .apply_batch(&recorded.generation, batch, scratch, stats)
    }

    /// Records a converted OTLP request (`record`, a `Kind::Otlp` payload)
    /// in the WAL, then applies its `batches` (the encoded `Batch`es the
    /// record holds). Returns the WAL ticket (0 without a WAL) and how many
    /// events were refused by tallyd's limits.
    pub fn otlp(
        &self,
        record: &[u8],
        batches: &[Vec<u8>],
        scratch: &mut Scratch,
        stats: &mut BlockStats,
    ) -> Result<(u64, u32), AppendError> {
        let recorded = self.record(Kind::Otlp, record, scratch)?;
        let mut rejected = 0;
        for b in batches {
            if let Ok(batch) = BatchView::decode(b) {
                rejected += self.apply_recorded(&recorded, &batch, scratch, stats);
            }
        }
        Ok((recorded.ticket, rejected))
    }

    /// With `wal.sync = always`, syncs what this blocking thread appended to
    /// its WAL stream (see [`Wal::settle`]); call it outside other locks.
    pub fn settle(&self, wal_stream: usize) {
        if let Some(wal) = &self.wal {
            wal.settle(wal_stream);
        }
    }
}

/// Appends `generation`'s start to the WAL before its first block. Nothing
/// is written for a generation that gets no block. If the append fails,
/// the next block tries again.
fn record_start(wal: &Wal, stream: usize, generation: &Generation) -> Result<(), AppendError> {
    if !generation.claim_start_record() {
        return Ok(());
    }
    let payload = crate::wal::format::encode_start(generation.started, generation.keying.digest);
    wal.append(stream, generation.id, Kind::Start, &payload)
        .map(|_| ())
        .inspect_err(|_| generation.unclaim_start_record())
}

#[cfg(test)]
mod tests;
