//! The spool: one file per flush recorded but not yet confirmed by
//! ClickHouse, `<data_dir>/spool/<flush_id as 20 digits>.flush`, holding a
//! [`Flush`] in its persisted form (see [`crate::outbox::flush`]).
//!
//! # The sent marker, `<data_dir>/spool/<flush_id as 20 digits>.sent`
//!
//! Written durably before the flush's first INSERT (and when a flush is
//! recorded under an id from before this start): empty, or, on an edge,
//! the upstreams the flush's keys were spread over, one `host:port` per
//! line (see [`crate::forward`]), so that every re-send goes where the
//! first send went. A flush
//! with a marker, or in a version 1 file (that release wrote no markers),
//! may have landed: after a restart it is re-sent as it is,
//! alone, and never merged or joined. A flush without one was never sent,
//! so a later run may merge or join it like its own. The marker goes after
//! the flush file when the flush is complete; a marker without a flush file
//! is removed at start.
//!
//! Files are written with [`Fs::write_atomic`](crate::fs::Fs::write_atomic),
//! so a file is whole or absent; the CRC catches damage at rest.

use std::io;
use std::path::{Path, PathBuf};

use crate::fs::Fs;
use crate::outbox::flush::{BodyRanges, Flush};

/// The spool directory and its file names.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

pub fn path(dir: &Path, flush_id: u64) -> PathBuf {
    dir.join(format!("{flush_id:020}.flush"))
}

/// The sent marker of flush `flush_id`.
pub fn sent_path(dir: &Path, flush_id: u64) -> PathBuf {
    dir.join(format!("{flush_id:020}.sent"))
}

/// What start-up needs of a spooled flush (its bodies stay on disk).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub flush_id: u64,
    pub generation: u64,
    pub ts: u32,
    pub host: String,
    pub rows: u64,
    /// Size of the file.
    pub bytes: u64,
    pub gauges: Vec<(Box<[u8]>, f64)>,
    /// It has a sent marker: it may have landed.
    pub sent: bool,
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Scanned {
    /// Spooled flushes in flush-id order.
    pub entries: Vec<Entry>,
    /// Files that did not decode, moved aside ([`crate::fs::quarantine`]),
    /// each with the reason.
    pub quarantined: Vec<String>,
}

/// Reads every spooled flush in `dir` once (one at a time, bodies
/// dropped), removes the files of flushes another one absorbed and the
/// `*.tmp` files a crash left mid-write (never renamed, so never sent),
/// quarantines files that do not decode, and returns the rest in flush-id
/// order.
pub fn scan(fs: &dyn Fs, dir: &Path) -> io::Result<Scanned> {
    let mut out = Scanned::default();
    let mut absorbed = std::collections::BTreeSet::new();
    let files = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut markers = std::collections::BTreeSet::new();
    for file in files {
        let path = file?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if ext == Some("sent") {
            markers.insert(path);
            continue;
        }
        if ext == Some("tmp") {
            fs.remove(&path)?;
            continue;
        }
        if ext != Some("flush") {
            continue; // a quarantined `*.damaged`, or not tallyd's
        }
        let bytes = std::fs::read(&path)?;
        let flush = match Flush::decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                let to = crate::fs::quarantine(fs, &path)?;
                tracing::error!(file = %path.display(), moved_to = %to.display(), error = %e, "a spool file is damaged; moved aside, its rows are lost");
                out.quarantined.push(format!("{} ({e})", to.display()));
                continue;
            }
        };
        absorbed.extend(flush.absorbed.iter().copied());
        out.entries.push(Entry {
            flush_id: flush.flush_id,
            generation: flush.generation,
            ts: flush.ts,
            rows: flush.rows(),
            host: flush.host,
            bytes: bytes.len() as u64,
            gauges: flush.gauges,
            // The release that wrote version 1 files wrote no markers: any
            // of them may have been sent.
            sent: markers.remove(&sent_path(dir, flush.flush_id))
                || bytes.get(8..12) == Some(&1u32.to_le_bytes()[..]),
        });
    }
    // Complete flushes whose marker a crash left behind (the file is gone,
    // so the marker is found after it).
    for e in &mut out.entries {
        e.sent |= markers.remove(&sent_path(dir, e.flush_id));
    }
    for stale in markers {
        let _ = std::fs::remove_file(stale);
    }
    out.entries.retain(|e| {
        if !absorbed.contains(&e.flush_id) {
            return true;
        }
        // Merged into a later flush just before a crash.
        let _ = std::fs::remove_file(path(dir, e.flush_id));
        false
    });
    out.entries.sort_by_key(|e| e.flush_id);
    Ok(out)
}

/// Reads spooled flush `flush_id`.
pub fn read(dir: &Path, flush_id: u64) -> io::Result<Flush> {
    let path = path(dir, flush_id);
    let bytes = std::fs::read(&path)?;
    Flush::decode(&bytes).map_err(|e| damaged(&path, &e))
}

/// Reads what names spooled flush `flush_id` and where its bodies lie
/// ([`Flush::decode_head`]), without reading the bodies. A file of an
/// earlier version, or one that does not decode, is `InvalidData`.
pub fn read_head(dir: &Path, flush_id: u64) -> io::Result<(Flush, BodyRanges)> {
    use std::os::unix::fs::FileExt;
    let path = path(dir, flush_id);
    let file = std::fs::File::open(&path)?;
    let len = file.metadata()?.len();
    Flush::decode_head(len, &mut |at, buf| file.read_exact_at(buf, at))
        .map_err(|e| damaged(&path, &e))
}

/// One table's body of a spooled flush, read from its file a chunk at a
/// time ([`open_body`]), so that sending it holds one chunk in memory, not
/// the body.
#[derive(Debug)]
pub struct BodyReader {
    file: std::fs::File,
    path: PathBuf,
    at: u64,
    end: u64,
}

/// Bytes a [`BodyReader`] reads at a time.
const CHUNK: u64 = 1 << 20;

/// Opens the body at `range` (offset, length: [`Flush::body_ranges`]) of
/// spooled flush `flush_id` of `instance`, once the whole file has been
/// read through and its CRC checks: a file that does not (damaged at
/// rest, another flush's, too short, or a read that fails: an unreadable
/// file is damaged too, not retried for ever) is `InvalidData`, so no
/// byte of it is sent. Blocking.
pub fn open_body(
    dir: &Path,
    flush_id: u64,
    instance: u64,
    range: (u64, u64),
) -> io::Result<BodyReader> {
    use std::os::unix::fs::FileExt;
    let path = path(dir, flush_id);
    let file = std::fs::File::open(&path)?;
    let len = file.metadata()?.len();
    let mut head = [0u8; crate::outbox::flush::HEAD];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| damaged(&path, &e.to_string()))?;
    let (crc, file_instance, file_id) = Flush::head(&head).map_err(|e| damaged(&path, &e))?;
    if (file_instance, file_id) != (instance, flush_id) {
        return Err(damaged(&path, "the file names another flush"));
    }
    let end = range.0.saturating_add(range.1);
    if end > len {
        return Err(damaged(&path, "shorter than its body"));
    }
    let mut sum = crc32c::crc32c(&head[16..]);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = head.len() as u64;
    while at < len {
        let n = (len - at).min(CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| damaged(&path, &e.to_string()))?;
        sum = crc32c::crc32c_append(sum, &buf[..n]);
        at += n as u64;
    }
    if sum != crc {
        return Err(damaged(&path, "checksum mismatch"));
    }
    Ok(BodyReader {
        file,
        path,
        at: range.0,
        end,
    })
}

impl BodyReader {
    /// The next chunk of the body (at most 1 MiB), `None` at its end. A
    /// read that fails is `InvalidData`, as in [`open_body`]. Blocking.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        if self.at >= self.end {
            return Ok(None);
        }
        let n = (self.end - self.at).min(CHUNK) as usize;
        let mut chunk = vec![0u8; n];
        self.file
            .read_exact_at(&mut chunk, self.at)
            .map_err(|e| damaged(&self.path, &e.to_string()))?;
        self.at += n as u64;
        Ok(Some(chunk))
    }
}

fn damaged(path: &Path, e: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::flush::tests::{sample, version_1};
    use crate::outbox::rowbinary::Bodies;

    #[test]
    fn a_version_1_file_counts_as_sent_and_a_stale_marker_goes() {
        let dir = crate::ledger::test_dir("spool-v1");
        let mut f = sample();
        f.gauges.clear();
        f.absorbed.clear();
        f.tables = Bodies::default();
        std::fs::write(path(&dir, f.flush_id), version_1(&f, &[])).expect("write");
        std::fs::write(sent_path(&dir, 77), b"").expect("stale marker");
        let entries = scan(&crate::fs::RealFs, &dir).expect("scan").entries;
        assert_eq!(entries.len(), 1);
        assert!(
            entries[0].sent,
            "the release that wrote it wrote no markers"
        );
        assert!(
            !sent_path(&dir, 77).exists(),
            "a marker without its flush goes"
        );
    }

    #[test]
    fn a_damaged_file_is_quarantined_and_a_torn_temp_file_removed() {
        let dir = crate::ledger::test_dir("spool-damaged");
        let good = sample();
        std::fs::write(path(&dir, good.flush_id), good.encode()).expect("write");
        let mut bad = sample();
        bad.flush_id = 43;
        let mut bytes = bad.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(path(&dir, 43), &bytes).expect("write");
        std::fs::write(dir.join("00000000000000000044.tmp"), b"torn").expect("write");
        let scanned = scan(&crate::fs::RealFs, &dir).expect("a damaged file does not stop a scan");
        assert_eq!(scanned.entries.len(), 1);
        assert_eq!(scanned.entries[0].flush_id, 42);
        assert_eq!(scanned.quarantined.len(), 1);
        assert!(
            scanned.quarantined[0].contains("checksum mismatch"),
            "{:?}",
            scanned.quarantined
        );
        assert!(!path(&dir, 43).exists());
        assert_eq!(
            std::fs::read(dir.join("00000000000000000043.flush.damaged")).expect("kept"),
            bytes
        );
        assert!(!dir.join("00000000000000000044.tmp").exists());
    }
}
