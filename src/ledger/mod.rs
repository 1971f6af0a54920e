//! The ledger: one room for exactly-once. It owns the instance identity and
//! flush ids ([`identity`]), the protobuf deduplication state ([`dedup`]),
//! the spool of flushes recorded but not yet in ClickHouse ([`spool`]), the
//! last value of each gauge, and what start-up recovers. Every durable step
//! goes through the filesystem seam ([`crate::fs`]).
//!
//! # The durable order
//!
//! What is written, when, and what a crash (kill -9, power loss) after each
//! step leaves:
//!
//! 1. **Receive.** A StatsD block, protobuf batch or converted OTLP
//!    request is appended to the WAL (its generation id in the record),
//!    then applied to the open generation. A protobuf batch's
//!    `(client_id, sequence)` is marked in the client's window in memory,
//!    under the client's lock; an OTLP request's series marks are applied
//!    to the series state, under its lock.
//!    *Crash:* the record is in the page cache (kill -9) or lost up to the
//!    sync policy (power loss); replay rebuilds the generation from it.
//! 2. **Acknowledge.** A protobuf `OK` is sent only once the WAL has synced
//!    past the batch's record (`wal.sync`), and never while a sync has
//!    failed and no full sync has succeeded since (see [`crate::wal`]).
//!    With the WAL off, `OK` means "applied in memory": a crash loses it.
//! 3. **Close.** The interval closes; its rows are built (delta gauges
//!    resolved against the last flushed values), given a new flush id, and
//!    encoded to RowBinary once: these bytes are what ClickHouse gets, on
//!    every send. *Crash:* nothing was written; replay rebuilds it.
//! 4. **Record.** The `instance` file is saved with the last flush id
//!    issued (no file is ever written under an id a restart could draw
//!    again); then the flush is written to `spool/<flush_id>.flush`
//!    (atomically: temp file, fsync, rename, fsync dir), with the instance
//!    id, the host it was built for and the gauge values after it; then,
//!    if the flush has gauges, a record of their values is appended to
//!    `gauges.log` (see [`crate::outbox::gauges`]; a failed append is
//!    logged, and the next write rewrites the log whole). If the spool
//!    write fails (ENOSPC, EIO) the flush is **not sent**: it
//!    is held and recorded again at the next tick, the open interval keeps
//!    aggregating meanwhile. *Crash before the rename:* as 3. *After:* the
//!    spool file is found at start and (re-)sent as is; its generation,
//!    still in the WAL, is not rebuilt (the ledger matches them by id).
//! 5. **Release.** The protobuf dedup state is saved (`dedup`), and the
//!    OTLP series moved since the last release (`otlp-series`, see
//!    [`temporality`]), then the WAL checkpoint marks the generation done,
//!    so its raw records can be overwritten: the spool holds the compacted
//!    rows from now on. *Crash before the checkpoint:* the generation's
//!    protobuf batches are re-observed from the WAL into the dedup state,
//!    and its OTLP records' marks into the series state, then released.
//!    The flush then goes to the sink's bounded queue *without its
//!    bodies* (they are in the spool file, and memory holds only the flush
//!    being built), or, when the queue is full (ClickHouse down or slow)
//!    or older flushes wait on disk, it stays *parked* in the spool, and
//!    the sink takes it back when it gets there. While the spool is over `spool.max_size`, a new flush is
//!    *merged* into the newest parked flush of this run (coarser `ts`, the
//!    same totals, [`crate::outbox::merge`]): the merged file is
//!    written under the new flush's id and lists the flush it absorbed,
//!    then the absorbed file is removed. *Crash between the two:* at start
//!    the absorbed file is removed unread. A flush that may have landed
//!    (its sent marker is on disk, see step 6, or it was recorded under an
//!    id from before this start) is never merged or joined; one recovered
//!    without a marker was never sent and is merged and joined like this
//!    run's, so restarts during an outage do not push the spool past its
//!    budget.
//!    When the sink drains parked flushes that were never sent, it
//!    takes several at once, up to `spool.drain_batch`, and *joins* them
//!    for one INSERT per table: the bodies are concatenated, each row
//!    keeping its own `ts` and flush id. The joined file is written under
//!    the newest id and lists the others as absorbed, then their files are
//!    removed; a crash between is handled as for a merge.
//! 6. **Send.** The sink writes the flush's sent marker
//!    (`spool/<flush_id>.sent`, durably), then sends each table's body,
//!    read back from the spool file a chunk at a time once the whole file
//!    has checked against its CRC (a file that does not is quarantined, as
//!    under *Damage*, and not a byte of it is sent), with
//!    `insert_deduplication_token = tallyd-<instance>-<host hash>-<flush_id>-<table>`
//!    (22.2+). Retries and re-sends after a restart carry identical bytes,
//!    so the ReplacingMergeTree (18.16: under `FINAL` or after a merge) or
//!    the token (insert time) collapses them. A table whose answer says the
//!    rows do not fit it (schema drift) blocks: retried, never confirmed.
//!    *Crash:* the spool file is re-sent at start.
//! 7. **Complete.** When every table of the flush is in ClickHouse, its
//!    spool file is removed. *Crash before:* re-sent once more (identical,
//!    collapsed as in 6).
//!
//! Every state file has a version and is written only with
//! [`crate::fs::Fs::write_atomic`], so a reader sees the old or the new version.
//!
//! # Damage
//!
//! One policy for every file the ledger reads, at start or at runtime: a
//! file that does not decode is moved aside ([`crate::fs::quarantine`]),
//! listed in [`Ledger::quarantined`] (`/health` degraded, and
//! `tallyd_files_quarantined`), and tallyd goes on without its contents:
//! - `instance`: a new instance id (flush ids still grow past the spool's);
//! - `gauges`: gauge deltas resolve against the spooled flushes' values,
//!   else 0;
//! - `dedup`: protobuf clients start over (a batch retried from before
//!   the start counts again);
//! - a spool file: its rows are lost. A damaged newest parked flush met by
//!   a merge is quarantined and the new flush recorded alone, so a damaged
//!   file never holds the flush loop.

pub mod dedup;
pub mod identity;
mod open;
mod parked;
pub mod spool;
pub mod temporality;

pub use parked::publish_backlog;

use crate::lock;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fs::{Fs, read_optional};
use crate::outbox::flush::Flush;
use crate::outbox::gauges::GaugesWrite;

/// The gauge memory's change log (see [`crate::outbox::gauges`]).
const GAUGES_LOG: &str = "gauges.log";
use dedup::Dedup;
use identity::Identity;

use crate::wal::Wal;

/// `spool.drain_batch` unless configured: 32 MiB of spool files per INSERT.
pub const DEFAULT_DRAIN_BATCH: u64 = 32 << 20;

/// Parked flushes taken for sending, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub ids: Vec<u64>,
    /// It may have landed (sent before): one flush, re-sent alone.
    pub earlier: bool,
}

/// What the ledger found at start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Spooled flushes, oldest first: parked, to be sent again as they are.
    pub flushes: Vec<spool::Entry>,
    /// Last values of gauges: the `gauges` file of an earlier release,
    /// `gauges.log`, then each spooled flush's.
    pub gauges: Vec<(Box<[u8]>, f64)>,
    /// Bytes of `gauges.log` that check (`None`: rewrite it first).
    pub gauges_log_bytes: Option<u64>,
}

/// A flush in the spool.
#[derive(Debug, Clone)]
struct Pending {
    ts: u32,
    bytes: u64,
    rows: u64,
    /// The host it was built for (only flushes of one host are merged).
    host: Arc<str>,
}

#[derive(Debug, Default)]
struct State {
    /// Every recorded flush not yet complete.
    flushes: BTreeMap<u64, Pending>,
    /// Parked: recorded, waiting on disk for the sink.
    parked: BTreeSet<u64>,
    /// May have landed: sent at least once (a sent marker is on disk), or
    /// recorded under an id from before this start. Re-sent as they are,
    /// alone; never merged or joined.
    earlier: BTreeSet<u64>,
    /// Those whose sent marker is on disk.
    marked: BTreeSet<u64>,
    /// Found in the spool at start, to be parked once released.
    recovered: Vec<u64>,
    /// Bytes of every spool file.
    bytes: u64,
}

pub struct Ledger {
    data_dir: PathBuf,
    spool_dir: PathBuf,
    fs: Arc<dyn Fs>,
    identity: Mutex<Identity>,
    pub dedup: Arc<Dedup>,
    /// OTLP series' last points (cumulative to delta, retries).
    pub temporality: Arc<temporality::Temporality>,
    wal: Option<Arc<Wal>>,
    state: Mutex<State>,
    parked_ready: tokio::sync::Notify,
    /// `spool.max_size`: past it, new flushes are merged.
    budget: u64,
    /// `spool.drain_batch`: parked flushes sent in one INSERT, in bytes.
    drain_batch: u64,
    /// `spool.hard_limit`: at it, no interval is closed.
    hard_limit: u64,
    /// `<data_dir>/lock`: one tallyd per data dir.
    _lock: std::fs::File,
    /// The last flush id issued before this start: ids up to it are older
    /// flushes' (re-sent under them, never merged).
    opened_last: u64,
    /// Damaged files moved aside since the start, with the reason.
    quarantined: Mutex<Vec<String>>,
    /// A gauge write failed (see [`Ledger::take_gauges_failed`]).
    gauges_failed: std::sync::atomic::AtomicBool,
}

impl Ledger {
    /// The data dir.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The filesystem seam the ledger writes through.
    pub fn fs(&self) -> Arc<dyn Fs> {
        Arc::clone(&self.fs)
    }

    /// The WAL whose generations this ledger releases.
    pub fn with_wal(mut self, wal: Option<Arc<Wal>>) -> Ledger {
        self.wal = wal;
        self
    }

    /// Sends parked flushes of this run together, up to `bytes` of spool
    /// files per INSERT (at least one flush each time).
    /// The WAL whose records a recorded flush releases.
    pub fn wal(&self) -> Option<Arc<Wal>> {
        self.wal.clone()
    }

    pub fn with_drain_batch(mut self, bytes: u64) -> Ledger {
        self.drain_batch = bytes;
        self
    }

    /// Stops closing intervals while the spool holds `bytes` or more.
    pub fn with_hard_limit(mut self, bytes: u64) -> Ledger {
        self.hard_limit = bytes;
        self
    }

    /// Whether the spool is at its hard limit (no interval may close).
    pub fn spool_full(&self) -> bool {
        lock(&self.state).bytes >= self.hard_limit
    }

    pub fn instance(&self) -> u64 {
        lock(&self.identity).instance
    }

    /// A new flush id (step 3; saved with the flush in step 4).
    pub fn next_flush_id(&self, now: Duration) -> u64 {
        lock(&self.identity).next(now)
    }

    /// Step 4: records `flush` durably, then the gauge memory's write
    /// (`gauges`) when the flush changed it. Over the spool budget, merges
    /// it into the newest parked flush of this run first; returns the flush
    /// recorded and whether it is a merge (then it must be parked). A gauge
    /// write that fails is logged and reported by [`Ledger::take_gauges_failed`].
    /// Blocking file work: call it from a blocking thread.
    pub fn record(
        &self,
        flush: Arc<Flush>,
        gauges: Option<&GaugesWrite>,
    ) -> io::Result<(Arc<Flush>, bool)> {
        // The id first: nothing is written under an id a restart could draw
        // again (the file reserves a block of ids; saved when past it).
        let wanted = {
            let i = lock(&self.identity);
            i.wanted().map(|r| (i.clone(), r))
        };
        if let Some((mut identity, reserved)) = wanted {
            identity.save_reserved(self.fs.as_ref(), reserved)?;
            lock(&self.identity).save_reserved_in_memory(reserved);
        }
        crate::failpoint::hit("after_identity");
        // An id from before this start (an interval the previous release had
        // sent) may have landed: it is never merged, nor merged into.
        let earlier = flush.flush_id <= self.opened_last;
        let tail = if earlier {
            None
        } else {
            self.claim_tail(flush.body_len(), &flush.host)
        };
        let (flush, absorbed) = match tail {
            None => (flush, None),
            Some(id) => match self.merge(id, &flush) {
                Ok(m) => (Arc::new(m), Some(id)),
                // The tail did not decode: it is quarantined (see `read`),
                // and the new flush is recorded alone.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => (flush, None),
                Err(e) => {
                    lock(&self.state).parked.insert(id);
                    return Err(e);
                }
            },
        };
        let path = spool::path(&self.spool_dir, flush.flush_id);
        let written = match self.write_spool_file(&path, &flush) {
            Ok(len) => len,
            Err(e) => {
                if let Some(id) = absorbed {
                    lock(&self.state).parked.insert(id);
                }
                return Err(e);
            }
        };
        if absorbed.is_some() {
            crate::failpoint::hit("after_merge_write");
        }
        // Recorded: from here on nothing may make the caller record it again.
        {
            let mut st = lock(&self.state);
            let p = Pending {
                ts: flush.ts,
                bytes: written,
                rows: flush.rows(),
                host: flush.host.as_str().into(),
            };
            st.bytes += p.bytes;
            if let Some(old) = st.flushes.insert(flush.flush_id, p) {
                st.bytes = st.bytes.saturating_sub(old.bytes);
            }
            if earlier {
                st.earlier.insert(flush.flush_id);
            }
        }
        // An interval the previous release had sent may have landed: its
        // marker now, so that no later start merges it (else the first
        // INSERT writes it, see `sending`).
        if earlier && let Err(e) = self.sending(flush.flush_id) {
            tracing::warn!(error = %e, flush_id = flush.flush_id, "could not mark a re-recorded flush as sent yet; it is marked before it is sent");
        }
        if let Some(id) = absorbed
            && let Err(e) = self.forget(id)
        {
            // The merged file lists it as absorbed: a start removes it unread.
            tracing::error!(error = %e, flush_id = id, "could not remove a merged flush's file; the next start will");
        }
        // After the spool file: a gauges file must never hold values of an
        // interval that a crash could still rebuild from the WAL.
        if let Some(g) = gauges
            && let Err(e) = self.write_gauges(g)
        {
            self.gauges_failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %e, "could not save the last gauge values; a restart resolves delta gauges against the older ones while this flush's file is gone");
        }
        Ok((flush, absorbed.is_some()))
    }

    /// Appends a record to `gauges.log` and syncs it, or rewrites the log
    /// (then the legacy `gauges` file, superseded, goes).
    fn write_gauges(&self, write: &GaugesWrite) -> io::Result<()> {
        let path = self.data_dir.join(GAUGES_LOG);
        match write {
            GaugesWrite::Append(record) => {
                let f = self.fs.append(&path, record)?;
                self.fs.sync(&path, &f)
            }
            GaugesWrite::Rewrite(all) => {
                self.fs.write_atomic(&path, all)?;
                self.fs.remove(&self.data_dir.join("gauges"))
            }
        }
    }

    /// Whether a gauge write failed since the last call (the next one must
    /// rewrite the log: a failed append may have left a torn record).
    pub fn take_gauges_failed(&self) -> bool {
        self.gauges_failed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes a spool file atomically. Once the rename is done the file is
    /// in place (a start finds it, with whatever it absorbs), so a failure
    /// after it (the directory sync) is logged, not returned: the caller
    /// must not act as if the old files were still the record.
    fn write_spool_file(&self, path: &Path, flush: &Flush) -> io::Result<u64> {
        let parts = flush.encoded_parts();
        let parts: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        match self.fs.write_atomic_parts(path, &parts) {
            Ok(()) => Ok(len),
            Err(e) if std::fs::read(path).is_ok_and(|b| b == parts.concat()) => {
                tracing::warn!(error = %e, file = %path.display(), "a spool file is in place but its directory could not be synced; a power loss could still undo it");
                Ok(len)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the spool is past `spool.max_size` (a new flush would be
    /// merged into the newest parked one).
    pub fn over_budget(&self) -> bool {
        lock(&self.state).bytes > self.budget
    }

    /// Over the budget with `extra` more bytes: takes the newest parked
    /// flush out of the parked set (so the sink cannot take it), if it was
    /// never sent and is for the same `host`.
    fn claim_tail(&self, extra: u64, host: &str) -> Option<u64> {
        let mut st = lock(&self.state);
        if st.bytes.saturating_add(extra) <= self.budget {
            return None;
        }
        let tail = st.parked.iter().next_back().copied()?;
        let same_host = st.flushes.get(&tail).is_some_and(|p| &*p.host == host);
        if st.earlier.contains(&tail) || !same_host {
            return None;
        }
        st.parked.remove(&tail);
        Some(tail)
    }

    fn merge(&self, tail: u64, newer: &Flush) -> io::Result<Flush> {
        let older = self.read(tail)?;
        older
            .merge(newer.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Removes a flush's spool file (then its sent marker) and its
    /// bookkeeping.
    fn forget(&self, flush_id: u64) -> io::Result<()> {
        let removed = self
            .fs
            .remove(&spool::path(&self.spool_dir, flush_id))
            .and_then(|()| self.fs.remove(&spool::sent_path(&self.spool_dir, flush_id)));
        let mut st = lock(&self.state);
        if let Some(p) = st.flushes.remove(&flush_id) {
            st.bytes = st.bytes.saturating_sub(p.bytes);
        }
        st.parked.remove(&flush_id);
        st.earlier.remove(&flush_id);
        st.marked.remove(&flush_id);
        removed
    }

    /// Step 5: saves the dedup and OTLP series state, then lets the WAL overwrite
    /// `generation`'s records. The state is taken first and the WAL synced
    /// before it is written, so it never names a batch whose record a power
    /// loss could still take (a retry of that batch must not be called a
    /// duplicate). Errors, leaving the records, while the WAL is not
    /// durable. Blocking.
    pub fn release(&self, generation: u64) -> io::Result<()> {
        let snapshot = self.dedup.snapshot();
        let series = self.temporality.snapshot();
        if let Some(wal) = &self.wal
            && let Err(e) = wal.sync_checked()
        {
            self.dedup.write_failed();
            self.temporality.write_failed();
            return Err(e);
        }
        if let Err(e) = self.dedup.write(&snapshot) {
            // Its series go into the next write, a rewrite, as the dedup's.
            self.temporality.write_failed();
            return Err(e);
        }
        self.temporality.write(&series)?;
        crate::failpoint::hit("after_dedup");
        if let Some(wal) = &self.wal {
            wal.confirm(generation).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Step 5 for a generation with no rows: nothing to save, nothing
    /// written (see [`Wal::confirm_in_memory`]).
    pub fn release_empty(&self, generation: u64) {
        if let Some(wal) = &self.wal {
            wal.confirm_in_memory(generation);
        }
    }
}

#[cfg(test)]
pub(crate) use crate::test_dir::test_dir;

#[cfg(test)]
mod tests;
