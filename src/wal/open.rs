//! Opening the WAL: its segments laid out (or found), recovered, and the
//! rings positioned after what they hold.

use super::*;

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
                let start = blocks
                    .iter()
                    .find(|(k, _)| *k == Kind::Start)
                    .and_then(|(_, b)| format::decode_start(b));
                blocks.retain(|(k, _)| *k != Kind::Start);
                Replayed {
                    generation,
                    intent: checkpoint.intents.get(&generation).copied(),
                    started: start.map(|(s, _)| s),
                    keying: start.and_then(|(_, k)| k),
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
}

impl Stream {
    pub(super) fn create(dir: &Path, id: u32, config: &WalConfig) -> Result<Stream, WalError> {
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
