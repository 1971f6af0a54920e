//! Opening the ledger at start: the instance identity, the spool's files
//! (each read, a damaged one quarantined), the dedup state and the gauge
//! memory, each damaged state file moved aside and counted, never a
//! refused start.

use std::io;
use std::path::Path;

use super::*;

impl Ledger {
    /// Opens the ledger in `data_dir`: identity, dedup state, spool, gauges.
    /// Spooled flushes come back parked.
    /// `dedup_window` is in flushes (see [`dedup`]).
    pub fn open(
        data_dir: &Path,
        dedup_window: u64,
        max_clients: usize,
        budget: u64,
        fs: Arc<dyn Fs>,
    ) -> io::Result<(Ledger, Recovered)> {
        std::fs::create_dir_all(data_dir)?;
        let lock_path = data_dir.join("lock");
        let dir_lock = std::fs::File::create(&lock_path)?;
        if dir_lock.try_lock().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is used by another tallyd (lock held)",
                    data_dir.display()
                ),
            ));
        }
        let spool_dir = spool::dir(data_dir);
        std::fs::create_dir_all(&spool_dir)?;
        let machine = identity::machine_id();
        // A damaged state or spool file is quarantined (see
        // `crate::fs::quarantine`) and the start goes on without it.
        let scanned = spool::scan(fs.as_ref(), &spool_dir)?;
        let (flushes, mut quarantined) = (scanned.entries, scanned.quarantined);
        let mut identity = open_or_quarantine(
            fs.as_ref(),
            &data_dir.join("instance"),
            &mut quarantined,
            "a new instance id is drawn",
            || Identity::open(data_dir, &machine),
        )?;
        if let Some(last) = flushes.iter().map(|f| f.flush_id).max() {
            identity.last = identity.last.max(last);
        }
        identity.save(fs.as_ref())?;
        let gauges_path = data_dir.join("gauges");
        let (legacy_as_of, mut gauges) = open_or_quarantine(
            fs.as_ref(),
            &gauges_path,
            &mut quarantined,
            "gauge deltas resolve against the log's and the spooled flushes' values, or 0",
            || read_gauges(&gauges_path),
        )?;
        let log_path = data_dir.join(GAUGES_LOG);
        let log = open_or_quarantine(
            fs.as_ref(),
            &log_path,
            &mut quarantined,
            "gauge deltas resolve against the spooled flushes' values, or 0",
            || read_gauges_log(&log_path),
        )?;
        // The legacy file goes at the first rewrite of the log: until then
        // the log's length is not trusted.
        let gauges_log_bytes = (!gauges_path.exists() && log.good_len > 0).then_some(log.good_len);
        let as_of = legacy_as_of.max(log.as_of);
        gauges.extend(log.values);
        for f in flushes.iter().filter(|f| f.flush_id > as_of) {
            gauges.extend(f.gauges.iter().cloned());
        }
        let dedup = open_or_quarantine(
            fs.as_ref(),
            &data_dir.join("dedup"),
            &mut quarantined,
            "protobuf clients start over: a batch retried from before the start counts again",
            || Dedup::open(data_dir, dedup_window, Arc::clone(&fs)),
        )?;
        let dedup = Arc::new(dedup.with_max_clients(max_clients));
        let started = crate::clock::wall_clock().as_nanos();
        let started = u64::try_from(started).unwrap_or(u64::MAX);
        let temporality = open_or_quarantine(
            fs.as_ref(),
            &data_dir.join(temporality::FILE),
            &mut quarantined,
            "OTLP series start over: each cumulative series' next point is its reference",
            || temporality::Temporality::open(data_dir, started, Arc::clone(&fs)),
        )?;
        let mut state = State::default();
        for f in &flushes {
            let p = Pending {
                ts: f.ts,
                bytes: f.bytes,
                rows: f.rows,
                host: f.host.as_str().into(),
            };
            state.flushes.insert(f.flush_id, p);
            if f.sent {
                state.earlier.insert(f.flush_id);
                state.marked.insert(f.flush_id);
            }
            state.recovered.push(f.flush_id);
            state.bytes += f.bytes;
        }
        let ledger = Ledger {
            opened_last: identity.last,
            data_dir: data_dir.to_owned(),
            spool_dir,
            fs,
            identity: Mutex::new(identity),
            dedup,
            temporality: Arc::new(temporality),
            wal: None,
            state: Mutex::new(state),
            parked_ready: tokio::sync::Notify::new(),
            budget,
            drain_batch: DEFAULT_DRAIN_BATCH,
            hard_limit: u64::MAX,
            _lock: dir_lock,
            quarantined: Mutex::new(quarantined),
            gauges_failed: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((
            ledger,
            Recovered {
                flushes,
                gauges,
                gauges_log_bytes,
            },
        ))
    }
}

/// Opens a state file with `open`; if it is damaged (`InvalidData`), moves
/// it aside ([`crate::fs::quarantine`]), notes it in `quarantined` with
/// `consequence`, and opens again without it.
fn open_or_quarantine<T>(
    fs: &dyn Fs,
    path: &Path,
    quarantined: &mut Vec<String>,
    consequence: &str,
    open: impl Fn() -> io::Result<T>,
) -> io::Result<T> {
    match open() {
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let to = crate::fs::quarantine(fs, path)?;
            tracing::error!(file = %path.display(), moved_to = %to.display(), error = %e, "a state file is damaged; moved aside, the start goes on: {consequence}");
            quarantined.push(format!("{} ({e}; {consequence})", to.display()));
            open()
        }
        other => other,
    }
}

/// Reads `gauges.log` (none is empty), and cuts a torn last append off so
/// that the next append follows a whole record.
fn read_gauges_log(path: &Path) -> io::Result<crate::outbox::gauges::Log> {
    let Some(b) = read_optional(path)? else {
        return Ok(crate::outbox::gauges::Log {
            good_len: 0,
            ..Default::default()
        });
    };
    let log = crate::outbox::gauges::decode_log(&b).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    if log.good_len < b.len() as u64 {
        tracing::warn!(file = %path.display(), cut = b.len() as u64 - log.good_len, "cutting a torn append off the gauges log");
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(log.good_len)?;
        f.sync_all()?;
    }
    Ok(log)
}

fn read_gauges(path: &Path) -> io::Result<(u64, crate::outbox::gauges::GaugeValues)> {
    let Some(b) = read_optional(path)? else {
        return Ok((0, Vec::new()));
    };
    crate::outbox::gauges::decode(&b).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: damaged; remove it to start (delta gauges then start from 0)",
                path.display()
            ),
        )
    })
}
