//! WAL recovery: scanning every stream's segments in sequence order,
//! verifying each record, collecting the records of generations that are not
//! done, and positioning each stream after its last valid record (see the
//! module doc of [`crate::wal`] for the rules on torn tails and corruption).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::checkpoint::Checkpoint;
use super::format::{self, Decoded, Kind, SEGMENT_HEADER};
use super::segment::Segment;
use super::{Stream, WalConfig, WalError, io_err};

impl Scan {
    /// Adds what another scan found.
    pub(super) fn absorb(&mut self, other: Scan) {
        for (g, mut blocks) in other.by_generation {
            self.by_generation.entry(g).or_default().append(&mut blocks);
        }
        self.max_generation = self.max_generation.max(other.max_generation);
        self.records += other.records;
        self.bytes += other.bytes;
        self.torn += other.torn;
        self.skipped += other.skipped;
    }
}

#[derive(Default)]
pub(super) struct Scan {
    pub(super) by_generation: BTreeMap<u64, Vec<(Kind, Vec<u8>)>>,
    pub(super) max_generation: u64,
    pub(super) records: u64,
    pub(super) bytes: u64,
    pub(super) torn: u64,
    pub(super) skipped: u64,
}

/// Reads every stream directory. Unless `read_only`, returns the streams
/// positioned for appending (missing or mis-sized files are created).
pub(super) fn scan_dir(
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

pub(super) fn stream_ids(dir: &Path) -> Result<Vec<u32>, WalError> {
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

/// Moves every `stream-*` directory of `dir` into `to` (a rename each: the
/// segments are not copied).
pub(super) fn move_streams(dir: &Path, to: &Path) -> Result<(), WalError> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for id in stream_ids(dir)? {
        let (from, dest) = (
            dir.join(format!("stream-{id}")),
            to.join(format!("stream-{id}")),
        );
        std::fs::rename(&from, &dest).map_err(io_err(&from))?;
    }
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().map_err(io_err(dir))?;
    }
    Ok(())
}

/// The `previous-*` directories of `dir`: streams of older geometries.
pub(super) fn previous_dirs(dir: &Path) -> Result<Vec<std::path::PathBuf>, WalError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("previous-"))
        {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

pub(super) fn remove_streams(dir: &Path) -> Result<(), WalError> {
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
            // An older segment's tail that never reached the disk: a power
            // loss under `never` or `interval` may leave one (its pages were
            // not written back before the writer moved on), and losing it
            // is within that policy. Under `always` every append was
            // synced, so it is damage, skipped only if told to.
            End::Torn(offset) if config.sync != super::SyncMode::Always || config.skip_corrupt => {
                tracing::warn!(segment = %name, offset, sync = ?config.sync, "an older WAL segment ends in a torn record (a power loss within the sync policy); its records from there on are lost, the rest recovered");
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
        // Recovery read the records before `end_offset` through the map;
        // the first release gives those pages back too.
        released_to: 0,
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

pub(super) fn read_checkpoint(dir: &Path) -> Result<Checkpoint, WalError> {
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
