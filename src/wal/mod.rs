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

mod checkpoint;
pub mod format;
pub mod inspect;
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
    /// Opens (or creates) the WAL and recovers what it holds.
    pub fn open(config: WalConfig) -> Result<(Wal, Recovery), WalError> {
        Wal::open_with(config, Arc::new(RealFs))
    }

    /// [`Wal::open`], with every sync and state file going through `fs`.
    pub fn open_with(config: WalConfig, fs: Arc<dyn Fs>) -> Result<(Wal, Recovery), WalError> {
        let started = std::time::Instant::now();
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(WalError::Locked(dir.display().to_string()));
        }
        let checkpoint = read_checkpoint(&dir)?;
        let geometry = format!(
            "streams={} segments_per_stream={} segment_size={}",
            config.streams, config.segments_per_stream, config.segment_size
        );
        let meta_path = dir.join("meta");
        let old_geometry = std::fs::read_to_string(&meta_path)
            .ok()
            .map(|s| s.trim().to_owned());

        let mut scan = Scan::default();
        if old_geometry.as_deref().is_some_and(|g| g != geometry) {
            // The old layout is kept aside, read only, while it holds
            // records not yet done; the new one starts empty.
            let mut old = Scan::default();
            scan_dir(&dir, &checkpoint, &config, &mut old, true)?;
            if old.by_generation.is_empty() {
                remove_streams(&dir)?;
            } else {
                let aside = previous_dirs(&dir)?
                    .iter()
                    .filter_map(|p| {
                        p.file_name()?
                            .to_str()?
                            .strip_prefix("previous-")?
                            .parse::<u64>()
                            .ok()
                    })
                    .max()
                    .map_or(0, |n| n + 1);
                let to = dir.join(format!("previous-{aside}"));
                move_streams(&dir, &to)?;
                tracing::warn!(old = old_geometry.as_deref().unwrap_or(""), new = %geometry, kept = %to.display(), "the WAL geometry changed; the old streams are replayed read-only");
            }
        }
        let streams = scan_dir(&dir, &checkpoint, &config, &mut scan, false)?;
        let mut previous = Vec::new();
        for p in previous_dirs(&dir)? {
            let mut old = Scan::default();
            scan_dir(&p, &checkpoint, &config, &mut old, true)?;
            match old.by_generation.keys().next_back().copied() {
                None => std::fs::remove_dir_all(&p).map_err(io_err(&p))?,
                Some(newest) => previous.push((p, newest)),
            }
            scan.absorb(old);
        }
        let recovery_blocks = std::mem::take(&mut scan.by_generation);
        let mut wal_streams = streams;
        if wal_streams.is_empty() {
            for s in 0..config.streams {
                wal_streams.push(Stream::create(&dir, s, &config)?);
            }
        }
        fs.write_atomic(&meta_path, format!("{geometry}\n").as_bytes())
            .map_err(io_err(&meta_path))?;

        let mut checkpoint = checkpoint;
        let max_seen = recovery_blocks
            .keys()
            .copied()
            .chain(checkpoint.intents.keys().copied())
            .chain(checkpoint.done.last().copied())
            .chain([checkpoint.confirmed, scan.max_generation])
            .max()
            .unwrap_or(0);
        // Generations between the checkpoint and the newest seen that left no
        // record were empty: nothing to flush for them.
        for g in checkpoint.confirmed + 1..=max_seen {
            if !recovery_blocks.contains_key(&g) {
                checkpoint.confirm(g);
            }
        }
        let generations: Vec<Replayed> = recovery_blocks
            .into_iter()
            .map(|(generation, mut blocks)| {
                let started = blocks
                    .iter()
                    .find(|(k, _)| *k == Kind::Start)
                    .and_then(|(_, b)| format::decode_start(b));
                blocks.retain(|(k, _)| *k != Kind::Start);
                Replayed {
                    generation,
                    intent: checkpoint.intents.get(&generation).copied(),
                    started,
                    blocks,
                }
            })
            .collect();
        let recovery = Recovery {
            generations,
            next_generation: max_seen + 1,
            records: scan.records,
            bytes: scan.bytes,
        };
        let wal = Wal {
            epoch: AtomicU64::new(0),
            synced: tokio::sync::watch::Sender::new(0),
            sync_wanted: tokio::sync::Notify::new(),
            confirmed: AtomicU64::new(checkpoint.confirmed),
            previous: Mutex::new(previous),
            poisoned: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
            acks_closed: AtomicBool::new(false),
            fs,
            checkpoint: Mutex::new(checkpoint),
            streams: wal_streams.into_iter().map(Mutex::new).collect(),
            config,
            stats: WalStats::default(),
            _lock: lock,
        };
        wal.persist_checkpoint()?;
        let s = &wal.stats;
        s.replayed_records.store(recovery.records, Relaxed);
        s.replayed_bytes.store(recovery.bytes, Relaxed);
        s.replay_micros
            .store(started.elapsed().as_micros() as u64, Relaxed);
        s.torn_tails.store(scan.torn, Relaxed);
        s.corrupt_skipped.store(scan.skipped, Relaxed);
        Ok((wal, recovery))
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
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

    /// With `always`, syncs what this blocking thread (a UDP worker)
    /// appended to `stream`, outside every other lock. Does nothing in the
    /// other modes or on a tokio thread (the sync task syncs those).
    pub fn settle(&self, stream: usize) {
        if self.config.sync != SyncMode::Always || tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        let _one = lock(&self.sync_lock);
        let files = {
            let mut s = lock(&self.streams[stream % self.streams.len()]);
            let mut files = std::mem::take(&mut s.unsynced);
            if s.offset > s.synced_to {
                s.synced_to = s.offset;
                let seg = &s.segments[s.current];
                files.push((seg.path.clone(), seg.file()));
            }
            files
        };
        for (path, f) in files {
            if let Err(e) = self.fs.sync(&path, &f) {
                self.sync_failed(&e);
            }
        }
    }

    fn sync_failed(&self, e: &io::Error) {
        self.stats.sync_errors.fetch_add(1, Relaxed);
        if !self.poisoned.swap(true, Relaxed) {
            tracing::error!(error = %e, "WAL sync failed: no acknowledgement is sent until a full sync succeeds");
        }
    }

    /// Forces every stream's new records to disk (the sync task runs it
    /// every `sync_interval` and whenever an ack or an `always` append on
    /// a tokio thread asks). The files are
    /// synced after the stream locks are released, so appends go on while
    /// the kernel writes. After a failed sync, the next one is *full*: the
    /// pages of every segment that holds records not yet done are dirtied
    /// again (Linux may have marked them clean after the failed writeback,
    /// and a plain retry would write nothing) and synced; only when that
    /// succeeds are acks released again.
    pub fn sync(&self) {
        if self.config.sync == SyncMode::Never {
            return;
        }
        // One sync at a time: a second one must not publish an epoch while
        // the first still writes the records it marked as synced.
        let _one = lock(&self.sync_lock);
        let full = self.poisoned();
        let errors = self.stats.sync_errors.load(Relaxed);
        let epoch = self.epoch.fetch_add(1, Relaxed);
        let confirmed = self.confirmed();
        let mut files = Vec::new();
        for stream in &self.streams {
            let mut s = lock(stream);
            files.append(&mut s.unsynced);
            let current = s.current;
            if full {
                for (i, seg) in s.segments.iter_mut().enumerate() {
                    if i == current || seg.max_generation > confirmed {
                        seg.redirty();
                        files.push((seg.path.clone(), seg.file()));
                    }
                }
                s.synced_to = s.offset;
                // The current segment is mapped again from its start.
                s.released_to = 0;
            } else if s.offset > s.synced_to {
                s.synced_to = s.offset;
                let seg = &s.segments[current];
                files.push((seg.path.clone(), seg.file()));
            }
        }
        let mut ok = true;
        for (path, f) in files {
            if let Err(e) = self.fs.sync(&path, &f) {
                ok = false;
                self.sync_failed(&e);
            }
        }
        // Records appended before this sync began are durable now. A failed
        // sync publishes nothing: acks wait for a full sync that works.
        // A sync that failed elsewhere meanwhile (a UDP worker's) keeps the
        // poison: the next full sync must cover it.
        if ok && self.stats.sync_errors.load(Relaxed) == errors {
            if full {
                self.poisoned.store(false, Relaxed);
                tracing::info!("WAL full sync succeeded: acknowledgements resume");
            }
            self.synced.send_replace(epoch + 1);
        }
    }

    /// [`Wal::sync`], then an error if the WAL is not durable (a sync
    /// failed and no full sync has succeeded since).
    pub fn sync_checked(&self) -> io::Result<()> {
        self.sync();
        if self.poisoned() {
            return Err(io::Error::other(
                "a WAL sync failed; nothing is durable until a full sync succeeds",
            ));
        }
        Ok(())
    }

    pub fn sync_mode(&self) -> (SyncMode, Duration) {
        (self.config.sync, self.config.sync_interval)
    }

    /// [`Wal::confirm`] for a generation that had no rows, without writing
    /// the checkpoint: the next confirm writes it, and a restart before
    /// that finds nothing of the generation to rebuild (its records, if
    /// any, hold only lines that counted nothing). An idle interval writes
    /// nothing.
    pub fn confirm_in_memory(&self, generation: u64) {
        let confirmed = {
            let mut c = lock(&self.checkpoint);
            c.confirm(generation);
            c.confirmed
        };
        self.confirmed.store(confirmed, Relaxed);
    }

    /// `generation` is done (its rows are in the spool, see
    /// [`crate::ledger`]): its records may be overwritten.
    pub fn confirm(&self, generation: u64) -> Result<(), WalError> {
        let confirmed = {
            let mut c = lock(&self.checkpoint);
            c.confirm(generation);
            c.confirmed
        };
        self.confirmed.store(confirmed, Relaxed);
        self.persist_checkpoint()?;
        self.release_confirmed_pages(confirmed);
        let done: Vec<PathBuf> = {
            let mut previous = lock(&self.previous);
            let (done, kept) = std::mem::take(&mut *previous)
                .into_iter()
                .partition(|(_, newest)| *newest <= confirmed);
            *previous = kept;
            done.into_iter().map(|(p, _)| p).collect()
        };
        for p in done {
            std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
            tracing::info!(dir = %p.display(), "the streams of the old WAL geometry are drained and removed");
        }
        Ok(())
    }

    /// Unmaps the pages of every segment that is not being written and
    /// holds only confirmed records (see [`Segment::release_pages`]); a
    /// failure costs memory only, so it is logged.
    fn release_confirmed_pages(&self, confirmed: u64) {
        for stream in &self.streams {
            let mut s = lock(stream);
            let current = s.current;
            for (i, seg) in s.segments.iter_mut().enumerate() {
                if i != current
                    && seg.max_generation <= confirmed
                    && let Err(e) = seg.release_pages()
                {
                    tracing::warn!(segment = %seg.path.display(), error = %e, "could not give a confirmed WAL segment's pages back");
                }
            }
        }
    }

    /// The generation up to which everything is confirmed.
    /// Marks every generation up to `generation` done. For start-up only,
    /// once replay has released every generation this WAL holds records of:
    /// the generations up to the first open one that it holds no record of
    /// (its `wal/` was lost, or the WAL newly turned on, while the spool ran
    /// ahead) were never appended here. Without this the checkpoint would
    /// wait for them for ever, and the ring, once lapped, refuse every
    /// record.
    pub fn confirm_through(&self, generation: u64) -> Result<(), WalError> {
        let confirmed = {
            let mut c = lock(&self.checkpoint);
            if generation <= c.confirmed {
                return Ok(());
            }
            tracing::info!(
                from = c.confirmed,
                to = generation,
                "the WAL holds no record of the generations before the first open one; marked done"
            );
            c.confirm_through(generation);
            c.confirmed
        };
        self.confirmed.store(confirmed, Relaxed);
        self.persist_checkpoint()?;
        self.release_confirmed_pages(confirmed);
        Ok(())
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Relaxed)
    }

    fn persist_checkpoint(&self) -> Result<(), WalError> {
        let text = lock(&self.checkpoint).encode();
        let path = self.config.dir.join("checkpoint");
        self.fs
            .write_atomic(&path, text.as_bytes())
            .map_err(io_err(&path))
    }

    /// (bytes in use, bytes free) over every segment.
    pub fn usage(&self) -> (u64, u64) {
        let confirmed = self.confirmed();
        let size = self.config.segment_size;
        let mut used = 0;
        let mut total = 0;
        for stream in &self.streams {
            let s = lock(stream);
            for (i, seg) in s.segments.iter().enumerate() {
                total += size;
                if i == s.current {
                    used += s.offset as u64;
                } else if seg.max_generation > confirmed {
                    used += size;
                }
            }
        }
        (used, total - used)
    }
}

impl Stream {
    fn create(dir: &Path, id: u32, config: &WalConfig) -> Result<Stream, WalError> {
        let sdir = dir.join(format!("stream-{id}"));
        std::fs::create_dir_all(&sdir).map_err(io_err(&sdir))?;
        let mut segments = Vec::new();
        for i in 0..config.segments_per_stream {
            let path = sdir.join(format!("seg-{i}.wal"));
            let header = (i == 0).then_some(format::SegmentHeader {
                stream: id,
                sequence: 0,
            });
            segments.push(Segment::create(&path, config.segment_size, header)?);
        }
        Ok(Stream {
            id,
            segments,
            current: 0,
            offset: SEGMENT_HEADER,
            next_lsn: 1,
            next_sequence: 1,
            synced_to: 0,
            unsynced: Vec::new(),
            released_to: 0,
        })
    }
}

#[cfg(test)]
mod tests;
