//! The ledger: one room for exactly-once. It owns the instance identity and
//! flush ids ([`identity`]), the protobuf deduplication state ([`dedup`]),
//! the spool of flushes recorded but not yet in ClickHouse ([`spool`]), the
//! last value of each gauge, and what start-up recovers. Every durable step
//! goes through the filesystem seam ([`fs`]).
//!
//! # The durable order
//!
//! What is written, when, and what a crash (kill -9, power loss) after each
//! step leaves:
//!
//! 1. **Receive.** A StatsD block or protobuf batch is appended to the WAL
//!    (its generation id in the record), then applied to the open
//!    generation. A protobuf batch's `(client_id, sequence)` is marked in
//!    the client's window in memory, under the client's lock.
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
//! 4. **Record.** The flush is written to `spool/<flush_id>.flush`
//!    (atomically: temp file, fsync, rename, fsync dir), with the instance
//!    id, the host it was built for and the gauge values after it; then the
//!    `instance` file (last flush id), and the `gauges` file if the flush
//!    has gauges. If this fails (ENOSPC, EIO) the flush is **not sent**: it
//!    is held and recorded again at the next tick, the open interval keeps
//!    aggregating meanwhile. *Crash before the rename:* as 3. *After:* the
//!    spool file is found at start and (re-)sent as is; its generation,
//!    still in the WAL, is not rebuilt (the ledger matches them by id).
//! 5. **Release.** The protobuf dedup state is saved (`dedup`), then the
//!    WAL checkpoint marks the generation done, so its raw records can be
//!    overwritten: the spool holds the compacted rows from now on.
//!    *Crash before the checkpoint:* the generation's protobuf batches are
//!    re-observed from the WAL into the dedup state, then released.
//! 6. **Send.** The sink sends each table's body with
//!    `insert_deduplication_token = tallyd-<instance>-<flush_id>-<table>`
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
//! [`fs::Fs::write_atomic`], so a reader sees the old or the new version.

pub mod dedup;
pub mod fs;
pub mod identity;
pub mod spool;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dedup::Dedup;
use fs::{Fs, read_optional};
use identity::Identity;
use spool::Flush;

use crate::wal::Wal;

/// What the ledger found at start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Spooled flushes, oldest first: to be sent again as they are.
    pub flushes: Vec<Flush>,
    /// Last values of gauges: the `gauges` file, then each spooled flush's.
    pub gauges: Vec<(Box<[u8]>, f64)>,
}

pub struct Ledger {
    data_dir: PathBuf,
    spool_dir: PathBuf,
    fs: Arc<dyn Fs>,
    identity: Mutex<Identity>,
    pub dedup: Arc<Dedup>,
    wal: Option<Arc<Wal>>,
    /// Flushes recorded and not yet complete: flush id → interval start.
    pending: Mutex<BTreeMap<u64, u32>>,
}

impl Ledger {
    /// Opens the ledger in `data_dir`: identity, dedup state, spool, gauges.
    pub fn open(
        data_dir: &Path,
        dedup_window: Duration,
        fs: Arc<dyn Fs>,
    ) -> io::Result<(Ledger, Recovered)> {
        std::fs::create_dir_all(data_dir)?;
        let spool_dir = spool::dir(data_dir);
        std::fs::create_dir_all(&spool_dir)?;
        let mut identity = Identity::open(data_dir)?;
        let flushes = spool::load(&spool_dir)?;
        if let Some(last) = flushes.iter().map(|f| f.flush_id).max() {
            identity.last = identity.last.max(last);
        }
        identity.save(fs.as_ref())?;
        let mut gauges = read_gauges(&data_dir.join("gauges"))?;
        for f in &flushes {
            gauges.extend(f.gauges.iter().cloned());
        }
        let dedup = Arc::new(Dedup::open(data_dir, dedup_window, Arc::clone(&fs))?);
        let pending = flushes.iter().map(|f| (f.flush_id, f.ts)).collect();
        let ledger = Ledger {
            data_dir: data_dir.to_owned(),
            spool_dir,
            fs,
            identity: Mutex::new(identity),
            dedup,
            wal: None,
            pending: Mutex::new(pending),
        };
        Ok((ledger, Recovered { flushes, gauges }))
    }

    /// The WAL whose generations this ledger releases.
    pub fn with_wal(mut self, wal: Option<Arc<Wal>>) -> Ledger {
        self.wal = wal;
        self
    }

    pub fn instance(&self) -> u64 {
        lock(&self.identity).instance
    }

    /// A new flush id (step 3; saved with the flush in step 4).
    pub fn next_flush_id(&self, now: Duration) -> u64 {
        lock(&self.identity).next(now)
    }

    /// Step 4: records `flush` durably, with the gauge memory (`gauges`, the
    /// encoded `gauges` file) when the flush changed it. Blocking file work:
    /// call it from a blocking thread.
    pub fn record(&self, flush: &Flush, gauges: Option<&[u8]>) -> io::Result<()> {
        let path = spool::path(&self.spool_dir, flush.flush_id);
        self.fs.write_atomic(&path, &flush.encode())?;
        lock(&self.pending).insert(flush.flush_id, flush.ts);
        let identity = lock(&self.identity).clone();
        identity.save(self.fs.as_ref())?;
        if let Some(g) = gauges {
            self.fs.write_atomic(&self.data_dir.join("gauges"), g)?;
        }
        Ok(())
    }

    /// Step 5: saves the dedup state, then lets the WAL overwrite
    /// `generation`'s records. Blocking.
    pub fn release(&self, generation: u64) -> io::Result<()> {
        self.dedup.save()?;
        if let Some(wal) = &self.wal {
            wal.confirm(generation).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Step 7: `flush_id` is in ClickHouse; its spool file goes. Blocking.
    pub fn complete(&self, flush_id: u64) -> io::Result<()> {
        self.fs.remove(&spool::path(&self.spool_dir, flush_id))?;
        lock(&self.pending).remove(&flush_id);
        self.fs.sync_dir(&self.spool_dir)
    }

    /// Interval start of the oldest flush not yet complete.
    pub fn oldest_pending_ts(&self) -> Option<u32> {
        lock(&self.pending).values().min().copied()
    }

    /// Flushes recorded and not yet complete.
    pub fn pending(&self) -> usize {
        lock(&self.pending).len()
    }
}

/// A fresh directory for a unit test.
#[cfg(test)]
pub(crate) fn test_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tallyd-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// The `gauges` file, version 1:
//
//   0  8  magic "TALLYGAU"
//   8  4  version (1)
//   12 4  CRC32C of bytes 16..end
//   16 4  entry count N
//   20 …  N entries: 4 key length K, K key bytes, 8 value (f64)
const GAUGES_MAGIC: &[u8; 8] = b"TALLYGAU";

/// Encodes the last values of gauges (the `gauges` file).
pub fn encode_gauges<'a>(entries: impl ExactSizeIterator<Item = (&'a [u8], f64)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + entries.len() * 48);
    out.extend_from_slice(GAUGES_MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for (k, v) in entries {
        out.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out[16..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

fn read_gauges(path: &Path) -> io::Result<Vec<(Box<[u8]>, f64)>> {
    let Some(b) = read_optional(path)? else {
        return Ok(Vec::new());
    };
    decode_gauges(&b).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: damaged; remove it to start (delta gauges then start from 0)",
                path.display()
            ),
        )
    })
}

fn decode_gauges(b: &[u8]) -> Option<Vec<(Box<[u8]>, f64)>> {
    if b.get(..8)? != GAUGES_MAGIC || b.get(8..12)? != 1u32.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(b.get(12..16)?.try_into().ok()?);
    if crc32c::crc32c(b.get(16..)?) != crc {
        return None;
    }
    let n = u32::from_le_bytes(b.get(16..20)?.try_into().ok()?);
    let mut at = 20usize;
    let mut out = Vec::new();
    for _ in 0..n {
        let k = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        let key: Box<[u8]> = b.get(at..at.checked_add(k)?)?.into();
        at += k;
        let v = f64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?);
        at += 8;
        out.push((key, v));
    }
    (at == b.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauges_file_round_trips_and_damage_is_caught() {
        let entries: Vec<(&[u8], f64)> = vec![(b"\x02a", 1.5), (b"\x02bb", -3.0)];
        let mut b = encode_gauges(entries.iter().copied());
        let back = decode_gauges(&b).expect("decodes");
        assert_eq!(back.len(), 2);
        assert_eq!((&*back[1].0, back[1].1), (&b"\x02bb"[..], -3.0));
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(decode_gauges(&b).is_none());
    }
}
