//! Durability and release: syncs by the configured mode (and what a failed
//! sync does), and the confirmations that let a flushed generation's
//! records go, with the checkpoint that remembers them.

use super::*;

impl Wal {
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

    pub(super) fn sync_failed(&self, e: &io::Error) {
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
        let started = std::time::Instant::now();
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
        let synced = !files.is_empty();
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
        if synced {
            self.stats.sync_latency.record(started.elapsed());
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
    pub(super) fn release_confirmed_pages(&self, confirmed: u64) {
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

    pub(super) fn persist_checkpoint(&self) -> Result<(), WalError> {
        let text = lock(&self.checkpoint).encode();
        let path = self.config.dir.join("checkpoint");
        self.fs
            .write_atomic(&path, text.as_bytes())
            .map_err(io_err(&path))
    }
}
