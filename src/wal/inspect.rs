//! `tallyd wal inspect` / `tallyd wal verify`: a read-only report of what a
//! WAL directory holds. Safe to run next to a live tallyd (files are read,
//! never mapped for writing or locked).

use std::fmt;
use std::path::{Path, PathBuf};

use super::format::{HeaderError, SegmentHeader};
use super::recovery::{read_checkpoint, stream_ids};
use super::{End, WalError, io_err, walk};

#[derive(Debug)]
pub struct SegmentReport {
    pub path: PathBuf,
    /// `None`: never used (no header yet).
    pub header: Option<SegmentHeader>,
    pub header_error: Option<HeaderError>,
    pub records: u64,
    pub lsns: Option<(u64, u64)>,
    pub generations: Option<(u64, u64)>,
    pub used_bytes: usize,
    pub end: End,
    pub skipped: Vec<usize>,
    pub newest: bool,
}

#[derive(Debug)]
pub struct Report {
    pub dir: PathBuf,
    pub confirmed: u64,
    pub intents: usize,
    pub segments: Vec<SegmentReport>,
}

impl Report {
    /// Problems that mean data is damaged (a torn tail of the newest
    /// segment is not one: it is what a crash mid-write leaves).
    pub fn corruption(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.segments {
            let name = s.path.display();
            if let Some(e) = s.header_error.filter(|e| *e != HeaderError::Magic) {
                out.push(format!("{name}: {e}"));
            }
            for offset in &s.skipped {
                out.push(format!("{name}: corrupt record at offset {offset}"));
            }
            match s.end {
                End::Corrupt(o) => out.push(format!("{name}: corrupt record at offset {o}")),
                End::Torn(o) if !s.newest => out.push(format!(
                    "{name}: invalid bytes at offset {o} in a segment that is not the newest"
                )),
                _ => {}
            }
        }
        out
    }
}

/// Reads every segment of `dir` (the WAL directory).
pub fn inspect(dir: &Path) -> Result<Report, WalError> {
    let checkpoint = read_checkpoint(dir)?;
    let mut segments = Vec::new();
    for id in stream_ids(dir)? {
        let sdir = dir.join(format!("stream-{id}"));
        let mut stream: Vec<SegmentReport> = Vec::new();
        for i in 0.. {
            let path = sdir.join(format!("seg-{i}.wal"));
            if !path.exists() {
                break;
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let (header, header_error) = match SegmentHeader::decode(&bytes) {
                Ok(h) => (Some(h), None),
                Err(e) => (None, Some(e)),
            };
            let mut r = SegmentReport {
                path,
                header,
                header_error,
                records: 0,
                lsns: None,
                generations: None,
                used_bytes: 0,
                end: End::Clean,
                skipped: Vec::new(),
                newest: false,
            };
            if let Some(h) = header {
                let (mut records, mut lsns, mut gens) =
                    (0u64, None::<(u64, u64)>, None::<(u64, u64)>);
                let w = walk(&bytes, h.signature(), true, |rec| {
                    records += 1;
                    lsns = Some(lsns.map_or((rec.lsn, rec.lsn), |(a, b)| {
                        (a.min(rec.lsn), b.max(rec.lsn))
                    }));
                    gens = Some(gens.map_or((rec.generation, rec.generation), |(a, b)| {
                        (a.min(rec.generation), b.max(rec.generation))
                    }));
                });
                r.records = records;
                r.lsns = lsns;
                r.generations = gens;
                r.used_bytes = w.end_offset;
                r.end = w.end;
                r.skipped = w.skipped;
            }
            stream.push(r);
        }
        if let Some(newest) = stream
            .iter_mut()
            .filter(|s| s.header.is_some())
            .max_by_key(|s| s.header.map_or(0, |h| h.sequence))
        {
            newest.newest = true;
        }
        segments.extend(stream);
    }
    Ok(Report {
        dir: dir.to_owned(),
        confirmed: checkpoint.confirmed,
        intents: checkpoint.intents.len(),
        segments,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "WAL {}", self.dir.display())?;
        writeln!(
            f,
            "checkpoint: generations up to {} confirmed; {} flush intents pending",
            self.confirmed, self.intents
        )?;
        for s in &self.segments {
            let Some(h) = s.header else {
                writeln!(f, "{}: unused", s.path.display())?;
                continue;
            };
            let range =
                |r: Option<(u64, u64)>| r.map_or("-".to_owned(), |(a, b)| format!("{a}..={b}"));
            let end = match s.end {
                End::Clean => "clean end".to_owned(),
                End::Torn(o) if s.newest => format!("torn tail at {o}"),
                End::Torn(o) => format!("INVALID BYTES at {o}"),
                End::Corrupt(o) => format!("CORRUPT at {o}"),
            };
            writeln!(
                f,
                "{}: stream {} sequence {}{}: {} records, LSN {}, generations {}, {} bytes used, {end}{}",
                s.path.display(),
                h.stream,
                h.sequence,
                if s.newest { " (newest)" } else { "" },
                s.records,
                range(s.lsns),
                range(s.generations),
                s.used_bytes,
                if s.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", CORRUPT records at {:?}", s.skipped)
                },
            )?;
        }
        let problems = self.corruption();
        if problems.is_empty() {
            writeln!(f, "no corruption found")
        } else {
            writeln!(f, "{} problem(s):", problems.len())?;
            problems.iter().try_for_each(|p| writeln!(f, "  {p}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::Kind;
    use crate::wal::{SyncMode, Wal, WalConfig};
    use std::time::Duration;

    fn wal_dir() -> crate::test_dir::TestDir {
        let dir = crate::test_dir::test_dir("inspect");
        let config = WalConfig {
            dir: dir.to_path_buf(),
            streams: 1,
            segments_per_stream: 2,
            segment_size: 4096,
            sync: SyncMode::Never,
            sync_interval: Duration::from_millis(100),
            skip_corrupt: false,
        };
        let (wal, _) = Wal::open(config).expect("open");
        for name in ["a", "b", "c"] {
            wal.append(0, 1, Kind::Statsd, format!("{name}:1|c").as_bytes())
                .expect("append");
        }
        dir
    }

    #[test]
    fn a_healthy_wal_reports_its_records() {
        let dir = wal_dir();
        let report = inspect(&dir).expect("inspect");
        assert!(report.corruption().is_empty());
        let seg = &report.segments[0];
        assert_eq!(
            (seg.records, seg.lsns, seg.generations),
            (3, Some((1, 3)), Some((1, 1)))
        );
        assert!(report.to_string().contains("no corruption found"));
    }

    #[test]
    fn a_flipped_bit_is_reported_as_corruption() {
        let dir = wal_dir();
        let path = dir.join("stream-0").join("seg-0.wal");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[32 + 24] ^= 0x10;
        std::fs::write(&path, bytes).expect("write");
        let report = inspect(&dir).expect("inspect");
        assert_eq!(report.corruption().len(), 1, "{report}");
        assert_eq!(report.segments[0].records, 2);
    }
}
