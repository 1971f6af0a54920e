//! The write-ahead log: every block tallyd accepts is recorded here before it
//! touches an accumulator, so a crash loses nothing that was received.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/wal/
//!   meta                      geometry: streams, segments per stream, segment size
//!   checkpoint                done generations (text, atomic rename)
//!   stream-<s>/seg-<i>.wal    preallocated segment files, written through mmap
//! ```
//!
//! Each ingest worker appends to its own *stream* (a UDP socket thread owns
//! one; TCP connections share a few), so appends from several threads never
//! wait on one global lock. A stream is a ring of fixed-size segments.
//!
//! A segment file:
//!
//! ```text
//! 0   8  magic "TALLYWAL"
//! 8   4  format version (1)
//! 12  4  stream
//! 16  8  sequence: this stream's segment-use counter, +1 each time a file is (re)started
//! 24  4  reserved (0)
//! 28  4  CRC32C of bytes 0..28
//! 32  …  records, each at a multiple of 8 bytes
//! ```
//!
//! A record:
//!
//! ```text
//! 0   4  payload length (> 0)
//! 4   4  CRC32C, seeded with the segment signature, over bytes 0..4 and 8..24+len
//! 8   8  LSN (per stream, +1 per record)
//! 16  7  generation (the aggregation interval the block was applied to)
//! 23  1  kind (1 = StatsD block, 2 = protobuf Batch, 3 = generation start)
//! 24  …  payload, zero-padded to a multiple of 8
//! ```
//!
//! The segment signature is the CRC32C of (stream, sequence). A file reused
//! on a later lap gets a new sequence, so a stale record of an earlier lap
//! can never verify as a new one. Eight zero bytes (length 0, CRC 0) mark
//! the end of the records in a segment.
//!
//! # Generations and checkpoints
//!
//! A record carries the id of the generation (interval) its block was applied
//! to. When a generation's rows are recorded in the spool (step 4 of the
//! durable order in [`crate::ledger`]), the generation is *done*; the
//! `checkpoint` file (see `checkpoint.rs`) keeps the highest generation below
//! which everything is done. A segment is reused only when every record in
//! it belongs to a done generation: the ring never overwrites a record whose
//! rows are not yet in the spool. When the next segment is not free, the
//! ring is full and appends fail with [`AppendError::Full`]: UDP drops the
//! datagram and counts it, TCP stops reading until there is room.
//!
//! # Recovery
//!
//! At start, every segment is scanned in sequence order and each record is
//! verified (`recovery.rs`). Records of generations that are not done are
//! returned by generation; the ledger rebuilds each one (or, if its spool
//! file exists, only re-observes its protobuf batches). A torn tail (the
//! last record of the newest segment) is truncated with a warning. So is a
//! torn tail of an older segment under `never` or `interval` sync, where a
//! power loss may leave one (counted in `torn_tails`: a loss within the
//! policy); under `always` it is corruption, as below. A record
//! that fails its check but is followed by a valid record is corruption: by
//! default recovery stops with an error naming the segment and offset;
//! `wal.skip_corrupt = true` skips it and goes on.
//!
//! # Durability
//!
//! - `never`: rely on the page cache. A killed process loses nothing (the
//!   pages belong to the kernel); a power loss loses what the kernel had not
//!   written back.
//! - `interval` (default, every `wal.sync_interval`, 100 ms): a power loss
//!   loses at most that interval. An acknowledgement that waits for
//!   durability asks for a sync at once (group commit: every ack waiting
//!   then shares it).
//! - `always`: fdatasync after every append; a power loss loses nothing that
//!   was appended.
//!
//! A failed sync is fatal to durability claims (raft-engine's rule): no
//! acknowledgement is released until a *full* sync (every page of every
//! segment with unfinished records dirtied again and synced) succeeds;
//! `/health` reports the WAL as failing meanwhile.
//!
//! Files: `format` (the record and segment layout, pure), `segment` (the
//! mmap), `open` and `recovery` (start), this file (appends), `durability`
//! (syncs and confirmations), `checkpoint`, `inspect` (`tallyd wal`).

mod checkpoint;
mod durability;
pub mod format;
pub mod inspect;
mod open;
mod recovery;
mod segment;

use crate::lock;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fs::{Fs, RealFs};
use checkpoint::Checkpoint;
pub use checkpoint::Intent;
use format::{Kind, SEGMENT_HEADER, record_len};
pub use recovery::{End, Walk, walk};
use recovery::{Scan, move_streams, previous_dirs, read_checkpoint, remove_streams, scan_dir};
use segment::Segment;

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Never,
    Interval,
    Always,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WalConfig {
    pub dir: PathBuf,
    pub streams: u32,
    pub segments_per_stream: u32,
    pub segment_size: u64,
    pub sync: SyncMode,
    pub sync_interval: Duration,
    pub skip_corrupt: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0} is used by another tallyd (lock held)")]
    Locked(String),
    #[error(
        "corrupt record in {segment} at offset {offset}; set wal.skip_corrupt = true to skip it"
    )]
    Corrupt { segment: String, offset: usize },
    #[error("bad checkpoint file {path}: {reason}")]
    Checkpoint { path: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the WAL ring is full (unflushed records fill every segment)")]
    Full,
    #[error("record larger than a WAL segment")]
    TooLarge,
}

/// WAL counters for `/metrics`.
#[derive(Debug, Default)]
pub struct WalStats {
    /// How long each sync took.
    pub sync_latency: crate::latency::Latency,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub full: AtomicU64,
    pub sync_errors: AtomicU64,
    pub replayed_records: AtomicU64,
    pub replayed_bytes: AtomicU64,
    pub replay_micros: AtomicU64,
    pub torn_tails: AtomicU64,
    pub corrupt_skipped: AtomicU64,
}

struct Stream {
    id: u32,
    segments: Vec<Segment>,
    current: usize,
    offset: usize,
    next_lsn: u64,
    next_sequence: u64,
    /// Start of the bytes of the current segment not yet synced.
    synced_to: usize,
    /// Segments left since the last interval sync.
    unsynced: Vec<(PathBuf, Arc<File>)>,
    /// The current segment's pages before this are unmapped (see
    /// [`Segment::release_written`]); a multiple of [`RELEASE_ALIGN`].
    released_to: usize,
}

/// Written pages behind a stream's appends are unmapped once this many
/// bytes of them have gathered (see [`Segment::release_written`]).
const RELEASE_CHUNK: usize = 256 * 1024;
/// What [`Stream::released_to`] is a multiple of: a page of every size
/// Linux uses (4, 16 or 64 KiB) starts on it.
const RELEASE_ALIGN: usize = 64 * 1024;

/// A generation rebuilt from the log at start.
#[derive(Debug)]
pub struct Replayed {
    pub generation: u64,
    pub intent: Option<Intent>,
    /// When the generation started live (its [`Kind::Start`] record), if
    /// the WAL has it.
    pub started: Option<Duration>,
    /// The digest of its keying (dialects and mapping rules), if its start
    /// record has one.
    pub keying: Option<u64>,
    /// (kind, payload) of its StatsD and protobuf records, in log order,
    /// stream by stream.
    pub blocks: Vec<(Kind, Vec<u8>)>,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub generations: Vec<Replayed>,
    /// The next generation id to use.
    pub next_generation: u64,
    pub records: u64,
    pub bytes: u64,
}

pub struct Wal {
    config: WalConfig,
    /// Sync epoch: a record appended in epoch `e` is durable once
    /// `synced` is above `e`.
    epoch: AtomicU64,
    synced: tokio::sync::watch::Sender<u64>,
    sync_wanted: tokio::sync::Notify,
    streams: Vec<Mutex<Stream>>,
    checkpoint: Mutex<Checkpoint>,
    confirmed: AtomicU64,
    /// Streams of an older geometry (see `Wal::open`), each with the newest
    /// generation it holds: removed once that generation is done.
    previous: Mutex<Vec<(PathBuf, u64)>>,
    /// A sync failed and no full sync has succeeded since: nothing appended
    /// may be called durable (no ack is sent) until one does.
    poisoned: AtomicBool,
    /// Held for the whole of a sync.
    sync_lock: Mutex<()>,
    /// Set at shutdown: acknowledgements still waiting give up.
    acks_closed: AtomicBool,
    fs: Arc<dyn Fs>,
    pub stats: WalStats,
    _lock: File,
}

impl Wal {
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// The largest payload one record can hold (a larger one is
    /// [`AppendError::TooLarge`]).
    pub fn max_payload(&self) -> usize {
        let room = (self.config.segment_size as usize).saturating_sub(SEGMENT_HEADER + 8);
        (room / format::ALIGN * format::ALIGN).saturating_sub(format::RECORD_HEADER)
    }

    /// Appends one block to `stream` for `generation`.
    pub fn append(
        &self,
        stream: usize,
        generation: u64,
        kind: Kind,
        payload: &[u8],
    ) -> Result<u64, AppendError> {
        let mut s = lock(&self.streams[stream % self.streams.len()]);
        let need = record_len(payload.len());
        let size = self.config.segment_size as usize;
        if need + 8 > size - SEGMENT_HEADER {
            return Err(AppendError::TooLarge);
        }
        if s.offset + need + 8 > size {
            self.advance(&mut s).inspect_err(|_| {
                self.stats.full.fetch_add(1, Relaxed);
            })?;
        }
        let lsn = s.next_lsn;
        let (current, offset) = (s.current, s.offset);
        let seg = &mut s.segments[current];
        let sig = seg.header.signature();
        format::encode_record(
            &mut seg.bytes_mut()[offset..],
            sig,
            lsn,
            generation,
            kind,
            payload,
        );
        // The end marker after the record (the next record overwrites it).
        seg.bytes_mut()[offset + need..offset + need + 8].fill(0);
        seg.max_generation = seg.max_generation.max(generation);
        s.offset += need;
        s.next_lsn += 1;
        // With `never`, only the kernel's flusher writes pages back (after
        // about 30 s): a page still mapped writable when the ring comes
        // round to it again is written without a fault, so the pages stay
        // mapped until their segment is confirmed (releasing them cost
        // `benches/wal.rs` 25-50 % per append).
        let written = s.offset - s.offset % RELEASE_ALIGN;
        if self.config.sync != SyncMode::Never && written >= s.released_to + RELEASE_CHUNK {
            let from = s.released_to;
            s.released_to = written;
            if let Err(e) = s.segments[current].release_written(from, written - from) {
                tracing::warn!(error = %e, "could not unmap written WAL pages");
            }
        }
        // Read under the stream lock: a sync that has not yet looked at this
        // stream will see the record, and will publish an epoch above this.
        let ticket = self.epoch.load(Relaxed);
        drop(s);
        if self.config.sync == SyncMode::Always {
            // UDP threads sync their own stream at once ([`Wal::settle`]);
            // for a tokio task (TCP), the sync task does it.
            self.sync_wanted.notify_one();
        }
        self.stats.records.fetch_add(1, Relaxed);
        self.stats.bytes.fetch_add(need as u64, Relaxed);
        Ok(ticket)
    }

    /// Waits until the record that got `ticket` is durable under the sync
    /// policy: at once for `never`, after the next sync of the sync task
    /// for `interval` and `always` (which the waiter asks for at once). While a failed sync has
    /// not been followed by a successful full sync, nothing is durable: this
    /// waits. Returns false if acknowledgements were closed (shutdown)
    /// before the record became durable.
    pub async fn wait_durable(&self, ticket: u64) -> bool {
        if self.config.sync == SyncMode::Never {
            return true;
        }
        let mut synced = self.synced.subscribe();
        loop {
            if *synced.borrow_and_update() > ticket && !self.poisoned() {
                return true;
            }
            if self.acks_closed.load(Relaxed) {
                return false;
            }
            // Someone waits: the sync task syncs now instead of at its next
            // tick, and every waiter of this epoch shares that one sync.
            self.sync_wanted.notify_one();
            // The sender lives as long as the WAL: an error cannot happen here.
            if synced.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Wakes every acknowledgement still waiting for durability and makes
    /// it give up (shutdown, past its deadline).
    pub fn close_acks(&self) {
        self.acks_closed.store(true, Relaxed);
        self.synced.send_modify(|_| {});
    }

    /// A sync failed and no full sync has succeeded since.
    pub fn poisoned(&self) -> bool {
        self.poisoned.load(Relaxed)
    }

    /// Resolves when an acknowledgement waits for a sync.
    pub async fn sync_wanted(&self) {
        self.sync_wanted.notified().await
    }

    /// A ticket for "everything appended so far" (for a duplicate that must
    /// not be acknowledged before its original is durable).
    pub fn ticket(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    /// Moves `s` to its next segment if every record there is confirmed.
    fn advance(&self, s: &mut Stream) -> Result<(), AppendError> {
        let next = (s.current + 1) % s.segments.len();
        if s.segments[next].max_generation > self.confirmed.load(Relaxed) {
            return Err(AppendError::Full);
        }
        if self.config.sync != SyncMode::Never {
            // The next sync writes the segment being left back too.
            let seg = &s.segments[s.current];
            let left = (seg.path.clone(), seg.file());
            s.unsynced.push(left);
        }
        let header = format::SegmentHeader {
            stream: s.id,
            sequence: s.next_sequence,
        };
        s.segments[next].restart(header);
        s.next_sequence += 1;
        s.current = next;
        s.offset = SEGMENT_HEADER;
        s.synced_to = 0;
        s.released_to = 0;
        Ok(())
    }

    /// (bytes in use, bytes free) over every segment.
    pub fn usage(&self) -> (u64, u64) {
        self.usage_by_stream()
            .into_iter()
            .fold((0, 0), |(u, f), (used, free)| (u + used, f + free))
    }

    /// `(used, free)` bytes of each stream's ring, in stream order: a
    /// stream is one ingest worker's, so one full stream refuses that
    /// worker's blocks while the others still take theirs.
    pub fn usage_by_stream(&self) -> Vec<(u64, u64)> {
        let confirmed = self.confirmed();
        let size = self.config.segment_size;
        self.streams
            .iter()
            .map(|stream| {
                let s = lock(stream);
                let mut used = 0;
                for (i, seg) in s.segments.iter().enumerate() {
                    if i == s.current {
                        used += s.offset as u64;
                    } else if seg.max_generation > confirmed {
                        used += size;
                    }
                }
                let total = size * s.segments.len() as u64;
                (used, total - used)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
