//! The write-ahead log: every block tallyd accepts is recorded here before it
//! touches an accumulator, so a crash loses nothing that was received.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/wal/
//!   meta                      geometry: streams, segments per stream, segment size
//!   checkpoint                confirmed generations + flush intents (text, atomic rename)
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
//! 23  1  kind (1 = StatsD block, 2 = protobuf Batch)
//! 24  …  payload, zero-padded to a multiple of 8
//! ```
//!
//! The segment signature is the CRC32C of (stream, sequence). A file reused
//! on a later lap gets a new sequence, so a stale record of an earlier lap
//! can never verify as a new one. Eight zero bytes (length 0, CRC 0) mark
//! the end of the records in a segment.
//!
//! # Generations, flushes and checkpoints
//!
//! A record carries the id of the generation (interval) its block was applied
//! to. Before a flush is queued for ClickHouse, its *intent* (generation,
//! flush id, interval start) is written to `checkpoint`. When ClickHouse has
//! confirmed every table of that flush (or rejected rows as bad data), the
//! generation is *confirmed*; the checkpoint keeps the highest generation
//! below which everything is confirmed. A segment is reused only when every
//! record in it belongs to a confirmed generation: the ring never overwrites
//! a record that has not been flushed. When the next segment is not free,
//! the ring is full and appends fail with [`AppendError::Full`]: UDP drops
//! the datagram and counts it, TCP stops reading until there is room.
//!
//! # Recovery
//!
//! At start, every segment is scanned in sequence order and each record is
//! verified. Records of unconfirmed generations are replayed into one
//! generation per id. A generation with an intent is re-sent with the *same*
//! flush id and interval start, so the ReplacingMergeTree tables collapse it
//! with the copy that may have landed before the crash: nothing is counted
//! twice. A torn tail (the last record of the newest segment) is truncated
//! with a warning. A record that fails its check but is followed by a valid
//! record is corruption: by default recovery stops with an error naming the
//! segment and offset; `wal.skip_corrupt = true` skips it and goes on.
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
//! - `always`: msync after every append; a power loss loses nothing that was
//!   appended.

pub mod format;
pub mod inspect;
mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use format::{Decoded, Kind, SEGMENT_HEADER, record_len};
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
        "the WAL in {dir} was written with {old}; it holds unflushed records from generation {from} on. Start with the old settings to drain it, or remove {dir} to discard them"
    )]
    Geometry { dir: String, old: String, from: u64 },
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

/// A flush written down before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    pub flush_id: u64,
    pub ts: u32,
}

/// What the checkpoint file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Checkpoint {
    /// Every generation up to this one is confirmed.
    confirmed: u64,
    /// Confirmed generations above `confirmed` (waiting for a gap to close).
    done: BTreeSet<u64>,
    intents: BTreeMap<u64, Intent>,
}

impl Checkpoint {
    fn encode(&self) -> String {
        let mut s = format!("confirmed {}\n", self.confirmed);
        for g in &self.done {
            s.push_str(&format!("done {g}\n"));
        }
        for (g, i) in &self.intents {
            s.push_str(&format!("intent {g} {} {}\n", i.flush_id, i.ts));
        }
        s
    }

    fn decode(text: &str) -> Result<Checkpoint, String> {
        let mut c = Checkpoint::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| -> Result<u64, String> {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("bad line {line:?}"))
            };
            match f.first() {
                Some(&"confirmed") => c.confirmed = num(1)?,
                Some(&"done") => {
                    c.done.insert(num(1)?);
                }
                Some(&"intent") => {
                    let ts = u32::try_from(num(3)?).map_err(|_| format!("bad ts in {line:?}"))?;
                    c.intents.insert(
                        num(1)?,
                        Intent {
                            flush_id: num(2)?,
                            ts,
                        },
                    );
                }
                None => {}
                Some(_) => return Err(format!("bad line {line:?}")),
            }
        }
        Ok(c)
    }

    fn confirm(&mut self, generation: u64) {
        if generation > self.confirmed {
            self.done.insert(generation);
        }
        while self.done.remove(&(self.confirmed + 1)) {
            self.confirmed += 1;
        }
        let confirmed = self.confirmed;
        self.intents.retain(|g, _| *g > confirmed);
    }
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
    unsynced: Vec<Arc<File>>,
}

/// A generation rebuilt from the log at start.
#[derive(Debug)]
pub struct Replayed {
    pub generation: u64,
    pub intent: Option<Intent>,
    /// (kind, payload) in log order, stream by stream.
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
    pub stats: WalStats,
    _lock: File,
}

impl Wal {
    /// Opens (or creates) the WAL and recovers what it holds.
    pub fn open(config: WalConfig) -> Result<(Wal, Recovery), WalError> {
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
        let (streams, recovery_blocks) = if old_geometry.as_deref().is_some_and(|g| g != geometry) {
            // Read the old layout: refuse if it holds anything unflushed.
            scan_dir(&dir, &checkpoint, &config, &mut scan, true)?;
            if let Some(&from) = scan.by_generation.keys().next() {
                return Err(WalError::Geometry {
                    dir: dir.display().to_string(),
                    old: old_geometry.unwrap_or_default(),
                    from,
                });
            }
            remove_streams(&dir)?;
            (Vec::new(), BTreeMap::new())
        } else {
            let streams = scan_dir(&dir, &checkpoint, &config, &mut scan, false)?;
            (streams, std::mem::take(&mut scan.by_generation))
        };
        let mut wal_streams = streams;
        if wal_streams.is_empty() {
            for s in 0..config.streams {
                wal_streams.push(Stream::create(&dir, s, &config)?);
            }
        }
        write_atomic(&meta_path, &format!("{geometry}\n"))?;

        let mut checkpoint = checkpoint;
        let max_seen = recovery_blocks
            .keys()
            .copied()
            .chain(checkpoint.intents.keys().copied())
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
            .map(|(generation, blocks)| Replayed {
                generation,
                intent: checkpoint.intents.get(&generation).copied(),
                blocks,
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
        if self.config.sync == SyncMode::Always {
            self.sync_stream(&mut s);
        }
        // Read under the stream lock: a sync that has not yet looked at this
        // stream will see the record, and will publish an epoch above this.
        let ticket = self.epoch.load(Relaxed);
        drop(s);
        self.stats.records.fetch_add(1, Relaxed);
        self.stats.bytes.fetch_add(need as u64, Relaxed);
        Ok(ticket)
    }

    /// Waits until the record that got `ticket` is durable under the sync
    /// policy: at once for `never` and `always`, after the next interval
    /// sync for `interval`.
    pub async fn wait_durable(&self, ticket: u64) {
        if self.config.sync != SyncMode::Interval {
            return;
        }
        let mut synced = self.synced.subscribe();
        if *synced.borrow() > ticket {
            return;
        }
        // Someone waits: the sync task syncs now instead of at its next
        // tick, and every waiter of this epoch shares that one sync.
        self.sync_wanted.notify_one();
        // The sender lives as long as the WAL: an error cannot happen here.
        let _ = synced.wait_for(|&epoch| epoch > ticket).await;
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
        match self.config.sync {
            SyncMode::Always => self.sync_stream(s),
            // The next interval sync writes the segment being left back too.
            SyncMode::Interval => s.unsynced.push(s.segments[s.current].file()),
            SyncMode::Never => {}
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
        Ok(())
    }

    fn sync_stream(&self, s: &mut Stream) {
        let (from, to) = (s.synced_to, s.offset + 8);
        if to > from {
            if let Err(e) = s.segments[s.current].sync(from, to - from) {
                self.stats.sync_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "WAL msync failed");
                return;
            }
            s.synced_to = s.offset;
        }
    }

    /// Forces every stream's new records to disk (the `interval` policy).
    /// The files are synced after the stream locks are released, so
    /// appends go on while the kernel writes.
    pub fn sync(&self) {
        let epoch = self.epoch.fetch_add(1, Relaxed);
        let mut files = Vec::new();
        for stream in &self.streams {
            let mut s = lock(stream);
            files.append(&mut s.unsynced);
            if s.offset > s.synced_to {
                s.synced_to = s.offset;
                files.push(s.segments[s.current].file());
            }
        }
        let mut ok = true;
        for f in files {
            if let Err(e) = f.sync_data() {
                ok = false;
                self.stats.sync_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "WAL sync failed");
            }
        }
        // Records appended before this sync began are durable now (a failed
        // sync publishes nothing: their acks wait for a sync that works).
        if ok {
            self.synced.send_replace(epoch + 1);
        }
    }

    pub fn sync_mode(&self) -> (SyncMode, Duration) {
        (self.config.sync, self.config.sync_interval)
    }

    /// Writes down that `generation` is about to be sent as `intent`.
    pub fn record_intent(&self, generation: u64, intent: Intent) -> Result<(), WalError> {
        lock(&self.checkpoint).intents.insert(generation, intent);
        self.persist_checkpoint()
    }

    /// `generation` is in ClickHouse (or was rejected there as bad data):
    /// its records may be overwritten.
    pub fn confirm(&self, generation: u64) -> Result<(), WalError> {
        let confirmed = {
            let mut c = lock(&self.checkpoint);
            c.confirm(generation);
            c.confirmed
        };
        self.confirmed.store(confirmed, Relaxed);
        self.persist_checkpoint()
    }

    /// The generation up to which everything is confirmed.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Relaxed)
    }

    fn persist_checkpoint(&self) -> Result<(), WalError> {
        let c = lock(&self.checkpoint);
        write_atomic(&self.config.dir.join("checkpoint"), &c.encode())
    }

    /// Interval start of the oldest flush sent but not yet confirmed.
    pub fn oldest_intent_ts(&self) -> Option<u32> {
        lock(&self.checkpoint).intents.values().map(|i| i.ts).min()
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        })
    }
}

#[derive(Default)]
struct Scan {
    by_generation: BTreeMap<u64, Vec<(Kind, Vec<u8>)>>,
    max_generation: u64,
    records: u64,
    bytes: u64,
    torn: u64,
    skipped: u64,
}

/// Reads every stream directory. Unless `read_only`, returns the streams
/// positioned for appending (missing or mis-sized files are created).
fn scan_dir(
    dir: &Path,
    checkpoint: &Checkpoint,
    config: &WalConfig,
    scan: &mut Scan,
    read_only: bool,
) -> Result<Vec<Stream>, WalError> {
    let mut streams = Vec::new();
    let ids: Vec<u32> = if read_only {
        stream_ids(dir)?
    } else {
        (0..config.streams).collect()
    };
    for id in ids {
        let sdir = dir.join(format!("stream-{id}"));
        if !sdir.exists() {
            if read_only {
                continue;
            }
            streams.push(Stream::create(dir, id, config)?);
            continue;
        }
        let mut segments = Vec::new();
        let count = if read_only {
            count_segments(&sdir)
        } else {
            config.segments_per_stream
        };
        for i in 0..count {
            let path = sdir.join(format!("seg-{i}.wal"));
            let size = if read_only {
                std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
            } else {
                config.segment_size
            };
            segments.push(Segment::open_or_create(&path, size)?);
        }
        let stream = scan_stream(id, segments, checkpoint, config, scan)?;
        if !read_only {
            streams.push(stream);
        }
    }
    Ok(streams)
}

fn stream_ids(dir: &Path) -> Result<Vec<u32>, WalError> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("stream-")?.parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn count_segments(sdir: &Path) -> u32 {
    (0..)
        .take_while(|i| sdir.join(format!("seg-{i}.wal")).exists())
        .count() as u32
}

fn remove_streams(dir: &Path) -> Result<(), WalError> {
    for id in stream_ids(dir)? {
        let sdir = dir.join(format!("stream-{id}"));
        std::fs::remove_dir_all(&sdir).map_err(io_err(&sdir))?;
    }
    Ok(())
}

/// Reads a stream's segments in sequence order, collects the records of
/// unconfirmed generations, and positions the stream after its last record.
fn scan_stream(
    id: u32,
    mut segments: Vec<Segment>,
    checkpoint: &Checkpoint,
    config: &WalConfig,
    scan: &mut Scan,
) -> Result<Stream, WalError> {
    if !segments.iter().any(|s| s.used) {
        segments[0].restart(format::SegmentHeader {
            stream: id,
            sequence: 0,
        });
    }
    let mut order: Vec<usize> = (0..segments.len()).filter(|&i| segments[i].used).collect();
    order.sort_by_key(|&i| segments[i].header.sequence);
    let newest = order.last().copied().unwrap_or(0);
    let mut end_offset = SEGMENT_HEADER;
    let mut next_lsn = 1;
    for &i in &order {
        let seg = &mut segments[i];
        let name = seg.path.display().to_string();
        let mut max_generation = 0;
        let walk = walk(
            seg.bytes(),
            seg.header.signature(),
            config.skip_corrupt,
            |r| {
                max_generation = max_generation.max(r.generation);
                next_lsn = next_lsn.max(r.lsn + 1);
                if r.generation > checkpoint.confirmed && !checkpoint.done.contains(&r.generation) {
                    scan.records += 1;
                    scan.bytes += r.payload.len() as u64;
                    scan.by_generation
                        .entry(r.generation)
                        .or_default()
                        .push((r.kind, r.payload.to_vec()));
                }
            },
        );
        scan.max_generation = scan.max_generation.max(max_generation);
        for &offset in &walk.skipped {
            tracing::warn!(segment = %name, offset, "skipped a corrupt WAL record");
            scan.skipped += 1;
        }
        match walk.end {
            End::Clean => {}
            End::Torn(offset) if i == newest => {
                tracing::warn!(segment = %name, offset, "truncating a torn WAL tail");
                scan.torn += 1;
            }
            End::Torn(offset) | End::Corrupt(offset) => {
                return Err(WalError::Corrupt {
                    segment: name,
                    offset,
                });
            }
        }
        seg.max_generation = max_generation;
        if i == newest {
            end_offset = walk.end_offset;
        }
    }
    let next_sequence = segments
        .iter()
        .filter(|s| s.used)
        .map(|s| s.header.sequence)
        .max()
        .unwrap_or(0)
        + 1;
    // Cut a torn tail: the end marker goes where the next record will.
    if end_offset + 8 <= segments[newest].bytes().len() {
        segments[newest].bytes_mut()[end_offset..end_offset + 8].fill(0);
    }
    Ok(Stream {
        id,
        segments,
        current: newest,
        offset: end_offset,
        next_lsn,
        next_sequence,
        synced_to: 0,
        unsynced: Vec::new(),
    })
}

/// How the records of a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An end marker (or the end of the file).
    Clean,
    /// Invalid bytes with nothing valid after them: a torn last write (or,
    /// in a segment that is not the newest, lost data).
    Torn(usize),
    /// Invalid bytes followed by a valid record: corruption.
    Corrupt(usize),
}

/// A walk over one segment's records.
#[derive(Debug)]
pub struct Walk {
    /// Where the next record would go.
    pub end_offset: usize,
    pub end: End,
    /// Offsets of corrupt records that were skipped (only with `skip_corrupt`).
    pub skipped: Vec<usize>,
}

/// Calls `on_record` for each valid record of a segment, in order.
pub fn walk<'a>(
    bytes: &'a [u8],
    sig: u32,
    skip_corrupt: bool,
    mut on_record: impl FnMut(format::Record<'a>),
) -> Walk {
    let mut at = SEGMENT_HEADER;
    let mut skipped = Vec::new();
    let end = loop {
        match format::decode_record(bytes, at, sig) {
            Decoded::Record(r, next) => {
                on_record(r);
                at = next;
            }
            Decoded::End => break End::Clean,
            Decoded::Invalid(_) => {
                let next = next_valid(bytes, at, sig);
                if next >= bytes.len() {
                    break End::Torn(at);
                }
                if !skip_corrupt {
                    break End::Corrupt(at);
                }
                skipped.push(at);
                at = next;
            }
        }
    };
    Walk {
        end_offset: at,
        end,
        skipped,
    }
}

/// The offset of the next valid record after the invalid one at `at`, or
/// the segment's length if there is none.
fn next_valid(bytes: &[u8], at: usize, sig: u32) -> usize {
    let mut probe = at + format::ALIGN;
    while probe + format::RECORD_HEADER <= bytes.len() {
        if let Decoded::Record(..) = format::decode_record(bytes, probe, sig) {
            return probe;
        }
        probe += format::ALIGN;
    }
    bytes.len()
}

fn read_checkpoint(dir: &Path) -> Result<Checkpoint, WalError> {
    let path = dir.join("checkpoint");
    match std::fs::read_to_string(&path) {
        Ok(text) => Checkpoint::decode(&text).map_err(|reason| WalError::Checkpoint {
            path: path.display().to_string(),
            reason,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Checkpoint::default()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Writes a small file durably: temp file, fsync, rename, fsync the dir.
fn write_atomic(path: &Path, text: &str) -> Result<(), WalError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tallyd-wal-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn config(dir: &Path) -> WalConfig {
        WalConfig {
            dir: dir.to_owned(),
            streams: 2,
            segments_per_stream: 3,
            segment_size: 4096,
            sync: SyncMode::Interval,
            sync_interval: Duration::from_millis(100),
            skip_corrupt: false,
        }
    }

    fn payloads(r: &Recovery) -> Vec<(u64, Vec<String>)> {
        r.generations
            .iter()
            .map(|g| {
                (
                    g.generation,
                    g.blocks
                        .iter()
                        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn unconfirmed_records_are_recovered_by_generation() {
        let dir = temp_dir();
        {
            let (wal, rec) = Wal::open(config(&dir)).expect("open");
            assert_eq!(rec.next_generation, 1);
            wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
            wal.append(1, 1, Kind::Statsd, b"b:1|c").expect("append");
            wal.append(0, 2, Kind::Statsd, b"c:1|c").expect("append");
            wal.confirm(1).expect("confirm");
        }
        let (_, rec) = Wal::open(config(&dir)).expect("reopen");
        assert_eq!(payloads(&rec), vec![(2, vec!["c:1|c".to_string()])]);
        assert_eq!(rec.next_generation, 3);
        assert_eq!(rec.records, 1);
    }

    #[test]
    fn intents_come_back_with_their_generation() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
            wal.record_intent(
                1,
                Intent {
                    flush_id: 77,
                    ts: 1_700_000_000,
                },
            )
            .expect("intent");
        }
        let (_, rec) = Wal::open(config(&dir)).expect("reopen");
        assert_eq!(
            rec.generations[0].intent,
            Some(Intent {
                flush_id: 77,
                ts: 1_700_000_000
            })
        );
    }

    #[test]
    fn a_full_ring_refuses_until_flushes_are_confirmed() {
        let dir = temp_dir();
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        let block = [b'x'; 1000];
        let mut appended = 0;
        while wal.append(0, 1, Kind::Statsd, &block).is_ok() {
            appended += 1;
        }
        assert_eq!(
            wal.append(0, 1, Kind::Statsd, &block),
            Err(AppendError::Full)
        );
        assert_eq!(
            appended, 9,
            "3 segments of 4 KiB hold 3 records of ~1 KiB each"
        );
        assert_eq!(wal.stats.full.load(Relaxed), 2);
        // The other stream has its own ring.
        wal.append(1, 1, Kind::Statsd, &block)
            .expect("other stream");
        wal.confirm(1).expect("confirm");
        wal.append(0, 2, Kind::Statsd, &block)
            .expect("room after confirm");
    }

    #[test]
    fn wrap_around_recovers_only_the_newest_unconfirmed_records() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            for generation in 1..=20u64 {
                for i in 0..3 {
                    wal.append(
                        0,
                        generation,
                        Kind::Statsd,
                        format!("g{generation}.r{i}:1|c").repeat(20).as_bytes(),
                    )
                    .expect("append");
                }
                if generation < 20 {
                    wal.confirm(generation).expect("confirm");
                }
            }
        }
        let (_, rec) = Wal::open(config(&dir)).expect("reopen");
        let got = payloads(&rec);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 20);
        assert_eq!(got[0].1.len(), 3);
        assert!(got[0].1[2].starts_with("g20.r2:1|c"));
    }

    #[test]
    fn appends_go_on_after_reopen_without_losing_order() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            wal.append(0, 1, Kind::Statsd, b"first:1|c")
                .expect("append");
        }
        {
            let (wal, rec) = Wal::open(config(&dir)).expect("reopen");
            assert_eq!(rec.records, 1);
            wal.append(0, rec.next_generation, Kind::Statsd, b"second:1|c")
                .expect("append");
        }
        let (_, rec) = Wal::open(config(&dir)).expect("reopen again");
        assert_eq!(
            payloads(&rec),
            vec![
                (1, vec!["first:1|c".into()]),
                (2, vec!["second:1|c".into()])
            ]
        );
    }

    fn segment_path(dir: &Path) -> PathBuf {
        dir.join("stream-0").join("seg-0.wal")
    }

    #[test]
    fn torn_tail_is_truncated_and_earlier_records_kept() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            wal.append(0, 1, Kind::Statsd, b"kept:1|c").expect("append");
            wal.append(0, 1, Kind::Statsd, b"torn:1|c").expect("append");
        }
        // Tear the second record: keep its length, smash its payload.
        let mut bytes = std::fs::read(segment_path(&dir)).expect("read");
        let second = SEGMENT_HEADER + record_len(8);
        bytes[second + 24..second + 32].fill(0xAA);
        std::fs::write(segment_path(&dir), &bytes).expect("write");
        let (wal, rec) = Wal::open(config(&dir)).expect("reopen");
        assert_eq!(payloads(&rec), vec![(1, vec!["kept:1|c".into()])]);
        assert_eq!(wal.stats.torn_tails.load(Relaxed), 1);
        wal.append(0, 2, Kind::Statsd, b"next:1|c")
            .expect("append after truncation");
        drop(wal);
        let (_, rec) = Wal::open(config(&dir)).expect("reopen");
        assert_eq!(rec.records, 2);
    }

    #[test]
    fn corruption_in_the_middle_stops_recovery_unless_told_to_skip() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            for name in ["a", "b", "c"] {
                wal.append(0, 1, Kind::Statsd, format!("{name}:1|c").as_bytes())
                    .expect("append");
            }
        }
        let mut bytes = std::fs::read(segment_path(&dir)).expect("read");
        bytes[SEGMENT_HEADER + record_len(5) + 24] ^= 0x01; // flip a bit of "b"
        std::fs::write(segment_path(&dir), &bytes).expect("write");
        match Wal::open(config(&dir)) {
            Err(WalError::Corrupt { segment, offset }) => {
                assert!(segment.ends_with("seg-0.wal"));
                assert_eq!(offset, SEGMENT_HEADER + record_len(5));
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("corruption went unnoticed"),
        }
        let mut skip = config(&dir);
        skip.skip_corrupt = true;
        let (wal, rec) = Wal::open(skip).expect("open skipping");
        assert_eq!(
            payloads(&rec),
            vec![(1, vec!["a:1|c".into(), "c:1|c".into()])]
        );
        assert_eq!(wal.stats.corrupt_skipped.load(Relaxed), 1);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_wal() {
        let dir = temp_dir();
        let (_wal, _) = Wal::open(config(&dir)).expect("open");
        assert!(matches!(Wal::open(config(&dir)), Err(WalError::Locked(_))));
    }

    #[test]
    fn changed_geometry_is_refused_while_records_are_unflushed() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
        }
        let mut bigger = config(&dir);
        bigger.segment_size = 8192;
        assert!(matches!(
            Wal::open(bigger.clone()),
            Err(WalError::Geometry { from: 1, .. })
        ));
        {
            let (wal, rec) = Wal::open(config(&dir)).expect("old settings still open it");
            assert_eq!(rec.records, 1);
            wal.confirm(1).expect("confirm");
        }
        let (_, rec) = Wal::open(bigger).expect("drained: the new geometry applies");
        assert_eq!(rec.records, 0);
    }

    #[test]
    fn generations_without_records_are_confirmed_at_open() {
        let dir = temp_dir();
        {
            let (wal, _) = Wal::open(config(&dir)).expect("open");
            wal.append(0, 3, Kind::Statsd, b"a:1|c").expect("append");
            wal.confirm(3).expect("confirm 3 before 1 and 2");
            assert_eq!(wal.confirmed(), 0);
        }
        let (wal, rec) = Wal::open(config(&dir)).expect("reopen");
        assert_eq!(rec.records, 0);
        assert_eq!(wal.confirmed(), 3);
    }
}
