//! The filesystem seam: every durable step of the ledger and every WAL sync
//! goes through an [`Fs`], so tests can fail a sync, fill the disk or tear a
//! write at a chosen file (as raft-engine's `tests/failpoints` do).
//!
//! [`Fs::write_atomic`] is the one way a small state file is written: a temp
//! file beside it, written and fsynced, renamed over the old one, then the
//! directory fsynced. A reader sees the old version or the new one, never a
//! mix; a crash can leave a stray `*.tmp`, which readers ignore.

use crate::lock;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

/// File operations the ledger and the WAL need to be durable.
pub trait Fs: Send + Sync + 'static {
    /// Creates (truncates) `path` and writes `bytes` to it, without syncing.
    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<File> {
        let mut f = File::create(path)?;
        f.write_all(bytes)?;
        Ok(f)
    }

    /// Appends `bytes` to `path` (created if missing), without syncing.
    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<File> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(bytes)?;
        Ok(f)
    }

    /// `fdatasync` on `file` (named `path` for fault matching and errors).
    fn sync(&self, _path: &Path, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    /// fsync of a directory, so a rename or a removal in it is durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Creates (truncates) `path` and writes `parts` one after the other,
    /// without syncing (a file written from pieces it is not copied into).
    fn write_parts(&self, path: &Path, parts: &[&[u8]]) -> io::Result<File> {
        let mut f = io::BufWriter::with_capacity(1 << 16, File::create(path)?);
        for p in parts {
            f.write_all(p)?;
        }
        f.into_inner().map_err(|e| e.into_error())
    }

    /// [`Fs::write_atomic`] of the concatenation of `parts`.
    fn write_atomic_parts(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let f = self.write_parts(&tmp, parts)?;
        self.sync(&tmp, &f)?;
        drop(f);
        self.rename(&tmp, path)?;
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => self.sync_dir(dir),
            _ => Ok(()),
        }
    }

    /// Writes a small file durably: temp file, fsync, rename, fsync the dir.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.write_atomic_parts(path, &[bytes])
    }
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl Fs for RealFs {}

/// The real filesystem, counting what durability costs: fsyncs (of files
/// and of directories) and bytes written (tests hold these to their
/// bounds).
#[derive(Debug, Default)]
pub struct CountingFs {
    pub syncs: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

impl CountingFs {
    /// (fsyncs, bytes written) so far.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.syncs.load(Relaxed), self.bytes.load(Relaxed))
    }
}

impl Fs for CountingFs {
    fn write_parts(&self, path: &Path, parts: &[&[u8]]) -> io::Result<File> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        self.bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        RealFs.write_parts(path, parts)
    }

    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<File> {
        self.bytes
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        RealFs.append(path, bytes)
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<File> {
        self.bytes
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        RealFs.write(path, bytes)
    }

    fn sync(&self, _path: &Path, file: &File) -> io::Result<()> {
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        file.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RealFs.sync_dir(dir)
    }
}

/// A fault a [`FaultyFs`] injects into operations on files whose path
/// contains a given string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `sync` fails with EIO.
    SyncFails,
    /// `write` fails with ENOSPC.
    NoSpace,
    /// `write` keeps only the first `n` bytes, then the "power" fails: the
    /// call reports an error and the torn file stays (as after a crash).
    TornWrite(usize),
}

/// The real filesystem with faults armed by tests.
#[derive(Debug, Default)]
pub struct FaultyFs {
    faults: Mutex<Vec<(String, Fault)>>,
}

impl FaultyFs {
    /// Arms `fault` for every file whose path contains `matching`.
    pub fn arm(&self, matching: &str, fault: Fault) {
        lock(&self.faults).push((matching.to_owned(), fault));
    }

    /// Disarms every fault.
    pub fn heal(&self) {
        lock(&self.faults).clear();
    }

    fn fault(&self, path: &Path) -> Option<Fault> {
        let p = path.to_string_lossy();
        lock(&self.faults)
            .iter()
            .find(|(m, _)| p.contains(m.as_str()))
            .map(|(_, f)| f.clone())
    }
}

impl Fs for FaultyFs {
    fn write_parts(&self, path: &Path, parts: &[&[u8]]) -> io::Result<File> {
        self.write(path, &parts.concat())
    }

    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<File> {
        match self.fault(path) {
            Some(Fault::NoSpace) => Err(io::Error::from_raw_os_error(28)),
            Some(Fault::TornWrite(n)) => {
                RealFs.append(path, &bytes[..n.min(bytes.len())])?;
                Err(io::Error::other("torn write (injected power loss)"))
            }
            _ => RealFs.append(path, bytes),
        }
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<File> {
        match self.fault(path) {
            Some(Fault::NoSpace) => Err(io::Error::from_raw_os_error(28)),
            Some(Fault::TornWrite(n)) => {
                let mut f = File::create(path)?;
                f.write_all(&bytes[..n.min(bytes.len())])?;
                Err(io::Error::other("torn write (injected power loss)"))
            }
            _ => RealFs.write(path, bytes),
        }
    }

    fn sync(&self, path: &Path, file: &File) -> io::Result<()> {
        match self.fault(path) {
            Some(Fault::SyncFails) => Err(io::Error::from_raw_os_error(5)),
            _ => file.sync_data(),
        }
    }
}

/// The one recovery policy for a file that does not decode (a bad magic,
/// version or checksum, a torn or truncated body): it is renamed to
/// `<name>.damaged` (`<name>.damaged.1`, … when taken), beside where it was,
/// so it is never read again and stays for an operator to inspect; the
/// caller counts it, says so in `/health`, and goes on without its
/// contents. Never a refused start, never a restart loop (raft-engine's
/// recovery modes are the model: here every file tolerates corruption).
/// Returns the new path.
pub fn quarantine(fs: &dyn Fs, path: &Path) -> io::Result<std::path::PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut to = path.with_file_name(format!("{name}.damaged"));
    let mut n = 0u32;
    while to.exists() && n < 1000 {
        n += 1;
        to = path.with_file_name(format!("{name}.damaged.{n}"));
    }
    fs.rename(path, &to)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs.sync_dir(dir)?;
    }
    Ok(to)
}

/// Writes a change log's next part durably: with `rewrite`, `bytes` are the
/// whole file, replaced atomically; else they are appended and synced.
/// `len` is the log's length as known (`None`: unknown, so the caller's
/// next write must be a rewrite), kept here: grown, set, or forgotten when
/// the write fails. The dedup and OTLP series files are such logs.
pub fn write_log(
    fs: &dyn Fs,
    path: &Path,
    bytes: &[u8],
    rewrite: bool,
    len: &Mutex<Option<u64>>,
) -> io::Result<()> {
    let written = if rewrite {
        fs.write_atomic(path, bytes)
    } else {
        fs.append(path, bytes).and_then(|f| fs.sync(path, &f))
    };
    let mut len = lock(len);
    *len = match (&written, rewrite) {
        (Ok(()), true) => Some(bytes.len() as u64),
        (Ok(()), false) => len.map(|b| b + bytes.len() as u64),
        (Err(_), _) => None,
    };
    written
}

/// Reads a state file; `None` if it does not exist.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> crate::test_dir::TestDir {
        crate::ledger::test_dir("fs")
    }

    #[test]
    fn a_damaged_file_is_moved_aside_and_a_second_one_does_not_overwrite_the_first() {
        let dir = temp_dir();
        let path = dir.join("gauges");
        std::fs::write(&path, b"one").expect("write");
        let first = quarantine(&RealFs, &path).expect("quarantine");
        assert_eq!(first, dir.join("gauges.damaged"));
        std::fs::write(&path, b"two").expect("write");
        let second = quarantine(&RealFs, &path).expect("quarantine");
        assert_eq!(second, dir.join("gauges.damaged.1"));
        assert!(!path.exists());
        assert_eq!(std::fs::read(first).expect("kept"), b"one");
        assert_eq!(std::fs::read(second).expect("kept"), b"two");
    }

    #[test]
    fn atomic_write_replaces_the_whole_file() {
        let dir = temp_dir();
        let path = dir.join("state");
        RealFs.write_atomic(&path, b"one").expect("write");
        RealFs.write_atomic(&path, b"two!").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two!");
        assert!(!dir.join("state.tmp").exists());
    }

    #[test]
    fn a_torn_atomic_write_leaves_the_old_version() {
        let dir = temp_dir();
        let path = dir.join("state");
        let fs = FaultyFs::default();
        fs.write_atomic(&path, b"old").expect("write");
        fs.arm("state", Fault::TornWrite(2));
        assert!(fs.write_atomic(&path, b"new version").is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        fs.arm("other", Fault::NoSpace);
        fs.heal();
        fs.write_atomic(&path, b"new").expect("healed");
        assert_eq!(read_optional(&path).expect("read"), Some(b"new".to_vec()));
    }

    #[test]
    fn injected_faults_match_by_path() {
        let dir = temp_dir();
        let fs = FaultyFs::default();
        fs.arm("intent", Fault::NoSpace);
        let err = fs
            .write_atomic(&dir.join("intent-1"), b"x")
            .expect_err("ENOSPC");
        assert_eq!(err.raw_os_error(), Some(28));
        fs.write_atomic(&dir.join("other"), b"x")
            .expect("others work");
        fs.arm("seg", Fault::SyncFails);
        let f = File::create(dir.join("seg-0")).expect("create");
        assert_eq!(
            fs.sync(&dir.join("seg-0"), &f)
                .expect_err("EIO")
                .raw_os_error(),
            Some(5)
        );
    }
}
