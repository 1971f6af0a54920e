//! The backlog side of the ledger: recorded flushes parked on disk for the
//! sink, taken (and joined) oldest first, marked as sent, rewritten to
//! their pending tables, read back, and removed once confirmed.

use std::io;

use super::*;
use crate::outbox::flush::BodyRanges;
use crate::outbox::rowbinary::Bodies;

impl Ledger {
    /// Leaves a recorded flush on disk for the sink (the queue is full, or
    /// older flushes are parked).
    pub fn park(&self, flush_id: u64) {
        lock(&self.state).parked.insert(flush_id);
        self.parked_ready.notify_one();
    }

    /// Parks the flushes found in the spool at start, once the WAL records
    /// of their generations are released (so that sending and completing
    /// one can never leave its generation to be rebuilt).
    pub fn park_recovered(&self) {
        let mut st = lock(&self.state);
        let recovered = std::mem::take(&mut st.recovered);
        st.parked.extend(recovered);
        drop(st);
        self.parked_ready.notify_one();
    }

    /// Whether flushes are parked (new ones must queue behind them).
    pub fn has_parked(&self) -> bool {
        !lock(&self.state).parked.is_empty()
    }

    /// The oldest parked flush, taken for sending, and the parked flushes of
    /// this run after it while their files fit `spool.drain_batch` (they
    /// were never sent, so they may be joined; see [`Ledger::read_taken`]).
    pub fn take_parked(&self) -> Option<Taken> {
        let mut st = lock(&self.state);
        let first = st.parked.pop_first()?;
        if st.earlier.contains(&first) {
            return Some(Taken {
                ids: vec![first],
                earlier: true,
            });
        }
        let size = |st: &State, id| st.flushes.get(&id).map_or(0, |p| p.bytes);
        let host = |st: &State, id| st.flushes.get(&id).map(|p| Arc::clone(&p.host));
        let first_host = host(&st, first);
        let mut bytes = size(&st, first);
        let mut ids = vec![first];
        while let Some(&next) = st.parked.first() {
            bytes = bytes.saturating_add(size(&st, next));
            // One host per joined flush (a later merge folds by key only).
            if bytes > self.drain_batch
                || st.earlier.contains(&next)
                || host(&st, next) != first_host
            {
                break;
            }
            st.parked.remove(&next);
            ids.push(next);
        }
        Some(Taken {
            ids,
            earlier: false,
        })
    }

    /// Reads taken flushes back as one. Several are joined
    /// ([`Flush::concat`]) and recorded under the newest id, listing the
    /// others as absorbed, before their files are removed (as a merge in
    /// step 5), so every send of the joined flush carries the same bytes.
    /// If joining fails, the first is read alone and the rest parked
    /// again. Blocking.
    ///
    /// The flush comes back without its bodies, with their ranges in its
    /// spool file, to be sent from there ([`Ledger::open_body`]); a file
    /// of an earlier release comes back whole (`None`).
    pub fn read_taken(&self, taken: &Taken) -> io::Result<(Flush, Option<BodyRanges>)> {
        match taken.ids.split_first() {
            Some((_, rest)) if !rest.is_empty() => {}
            Some((first, _)) => return self.read_for_sending(*first),
            None => return Err(io::Error::other("nothing taken")),
        };
        match self.join(&taken.ids) {
            Ok(flush) => Ok((flush.without_bodies(), Some(flush.body_ranges()))),
            Err(e) => {
                tracing::warn!(error = %e, flushes = taken.ids.len(), "could not join parked flushes; sending them one by one");
                // Those still recorded: a damaged one was quarantined.
                let mut st = lock(&self.state);
                let alive: Vec<u64> = taken
                    .ids
                    .iter()
                    .copied()
                    .filter(|id| st.flushes.contains_key(id))
                    .collect();
                let Some((&first, rest)) = alive.split_first() else {
                    return Err(e);
                };
                st.parked.extend(rest);
                drop(st);
                self.read_for_sending(first)
            }
        }
    }

    /// Flush `flush_id` as [`Ledger::read_taken`] gives it.
    fn read_for_sending(&self, flush_id: u64) -> io::Result<(Flush, Option<BodyRanges>)> {
        match spool::read_head(&self.spool_dir, flush_id) {
            Ok((flush, ranges)) => Ok((flush, Some(ranges))),
            // An earlier version (or damage, which `read` quarantines).
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.read(flush_id).map(|f| (f, None))
            }
            Err(e) => Err(e),
        }
    }

    fn join(&self, ids: &[u64]) -> io::Result<Flush> {
        let parts = ids
            .iter()
            .map(|&id| self.read(id))
            .collect::<io::Result<_>>()?;
        let joined = Flush::concat(parts).ok_or_else(|| io::Error::other("nothing to join"))?;
        let written =
            self.write_spool_file(&spool::path(&self.spool_dir, joined.flush_id), &joined)?;
        crate::failpoint::hit("after_join_write");
        {
            let mut st = lock(&self.state);
            let p = Pending {
                ts: joined.ts,
                bytes: written,
                rows: joined.rows(),
                host: joined.host.as_str().into(),
            };
            st.bytes += p.bytes;
            if let Some(old) = st.flushes.insert(joined.flush_id, p) {
                st.bytes = st.bytes.saturating_sub(old.bytes);
            }
        }
        for &id in ids.iter().filter(|&&id| id != joined.flush_id) {
            if let Err(e) = self.forget(id) {
                tracing::error!(error = %e, flush_id = id, "could not remove a joined flush's file; the next start will");
            }
        }
        Ok(joined)
    }

    /// Resolves when a flush is parked.
    pub async fn parked(&self) {
        self.parked_ready.notified().await
    }

    /// Writes the sent marker of `flush_id` before its first INSERT (from
    /// then on it may have landed: never merged or joined, also after a
    /// restart). Errors leave it unsent. Blocking.
    pub fn sending(&self, flush_id: u64) -> io::Result<()> {
        self.sending_to(flush_id, b"")
    }

    /// [`Ledger::sending`] with the marker's contents (an edge's plan: see
    /// [`spool`]'s marker). A flush marked before keeps its marker, unless
    /// it is empty and a plan comes.
    pub fn sending_to(&self, flush_id: u64, plan: &[u8]) -> io::Result<()> {
        if plan.is_empty() && lock(&self.state).marked.contains(&flush_id) {
            return Ok(());
        }
        self.fs
            .write_atomic(&spool::sent_path(&self.spool_dir, flush_id), plan)?;
        crate::failpoint::hit("after_marker");
        let mut st = lock(&self.state);
        st.marked.insert(flush_id);
        st.earlier.insert(flush_id);
        Ok(())
    }

    /// The contents of flush `flush_id`'s sent marker (empty when it has
    /// none, or an empty one). Blocking.
    pub fn sent_plan(&self, flush_id: u64) -> io::Result<Vec<u8>> {
        match std::fs::read(spool::sent_path(&self.spool_dir, flush_id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            r => r,
        }
    }

    /// Rewrites flush `flush`'s spool file (it may have landed: it has its
    /// sent marker) with only the bodies of the tables in `pending` (bit
    /// `i`: table `i`), the others being in ClickHouse. Blocking.
    pub fn keep_pending(&self, flush: &Flush, pending: u8) -> io::Result<()> {
        let mut kept = flush.clone();
        for i in 0..kept.tables.bodies.len() {
            if pending & (1 << i) == 0 {
                kept.tables.bodies[i].clear();
                kept.tables.rows[i] = 0;
            }
        }
        let written = self.write_spool_file(&spool::path(&self.spool_dir, kept.flush_id), &kept)?;
        let mut st = lock(&self.state);
        if let Some(p) = st.flushes.get_mut(&kept.flush_id) {
            let (old, new) = (p.bytes, written);
            p.bytes = new;
            p.rows = kept.rows();
            st.bytes = st.bytes.saturating_sub(old).saturating_add(new);
        }
        Ok(())
    }

    /// Reads a parked flush back. One that does not decode is quarantined
    /// and forgotten (its rows are lost), and the error returned. Blocking.
    pub fn read(&self, flush_id: u64) -> io::Result<Flush> {
        let read = spool::read(&self.spool_dir, flush_id);
        self.quarantine_damaged(flush_id, read)
    }

    /// Opens table `range`'s body (see [`spool::open_body`]) of recorded
    /// flush `flush`, whose bodies are not in memory, to be sent a chunk
    /// at a time. A file that does not check is quarantined and forgotten
    /// as in [`Ledger::read`]. Blocking.
    pub fn open_body(&self, flush: &Flush, range: (u64, u64)) -> io::Result<spool::BodyReader> {
        let opened = spool::open_body(&self.spool_dir, flush.flush_id, flush.instance, range);
        self.quarantine_damaged(flush.flush_id, opened)
    }

    /// The next chunk of a body opened with [`Ledger::open_body`]
    /// ([`spool::BodyReader::next_chunk`]): a file that cannot be read
    /// now, though it checked, is damaged too, and quarantined the same
    /// way. Blocking.
    pub fn next_chunk(
        &self,
        flush_id: u64,
        reader: &mut spool::BodyReader,
    ) -> io::Result<Option<Vec<u8>>> {
        let chunk = reader.next_chunk();
        self.quarantine_damaged(flush_id, chunk)
    }

    /// Every body of recorded flush `flush` read back whole from its spool
    /// file at `ranges` (damaged files are quarantined as in
    /// [`Ledger::open_body`]). Blocking.
    pub fn read_bodies(&self, flush: &Flush, ranges: &BodyRanges) -> io::Result<Bodies> {
        let mut bodies = Bodies {
            rows: flush.tables.rows,
            ..Bodies::default()
        };
        for (body, &range) in bodies.bodies.iter_mut().zip(ranges) {
            if range.1 == 0 {
                continue;
            }
            let mut reader = self.open_body(flush, range)?;
            while let Some(chunk) = self.next_chunk(flush.flush_id, &mut reader)? {
                body.extend_from_slice(&chunk);
            }
        }
        Ok(bodies)
    }

    /// A spool file that does not decode (`InvalidData`) is moved aside and
    /// forgotten (its rows are lost); `result` is returned as it is.
    fn quarantine_damaged<T>(&self, flush_id: u64, result: io::Result<T>) -> io::Result<T> {
        let Err(error) = &result else { return result };
        if error.kind() != io::ErrorKind::InvalidData {
            return result;
        }
        let path = spool::path(&self.spool_dir, flush_id);
        match crate::fs::quarantine(self.fs.as_ref(), &path) {
            Ok(to) => {
                tracing::error!(flush_id, moved_to = %to.display(), %error, "a spool file is damaged; moved aside, its rows are lost");
                lock(&self.quarantined).push(format!("{} ({error})", to.display()));
                let _ = self.forget(flush_id);
            }
            Err(q) => {
                tracing::error!(flush_id, error = %q, "could not move a damaged spool file aside");
            }
        }
        result
    }

    /// Damaged files moved aside since the start, each with the reason.
    pub fn quarantined(&self) -> Vec<String> {
        lock(&self.quarantined).clone()
    }

    /// Step 7: `flush_id` is in ClickHouse; its spool file goes. Blocking.
    pub fn complete(&self, flush_id: u64) -> io::Result<()> {
        self.forget(flush_id)?;
        self.fs.sync_dir(&self.spool_dir)
    }

    /// Interval start of the oldest flush not yet complete other than
    /// `flush_id` (which is being completed): every closed interval that
    /// starts before it is in ClickHouse once `flush_id` is.
    pub fn settled_after(&self, flush_id: u64) -> Option<u32> {
        lock(&self.state)
            .flushes
            .iter()
            .filter(|&(&id, _)| id != flush_id)
            .map(|(_, p)| p.ts)
            .min()
    }

    /// Interval start of the oldest flush not yet complete.
    pub fn oldest_pending_ts(&self) -> Option<u32> {
        lock(&self.state).flushes.values().map(|p| p.ts).min()
    }

    /// (flushes, rows, bytes) in the spool, parked or queued.
    pub fn backlog(&self) -> (u64, u64, u64) {
        let st = lock(&self.state);
        let rows = st.flushes.values().map(|p| p.rows).sum();
        (st.flushes.len() as u64, rows, st.bytes)
    }

    /// The start of the oldest interval recorded and not yet complete
    /// (Unix seconds), if any.
    pub fn oldest(&self) -> Option<u32> {
        lock(&self.state).flushes.values().map(|p| p.ts).min()
    }
}

/// Stores the ledger's backlog in the telemetry gauges.
pub fn publish_backlog(ledger: &Ledger, t: &crate::telemetry::Telemetry) {
    use std::sync::atomic::Ordering::Relaxed;
    let (flushes, rows, bytes) = ledger.backlog();
    t.backlog_batches.store(flushes, Relaxed);
    let oldest = ledger.oldest().map_or(0, u64::from);
    t.backlog_oldest.store(oldest, Relaxed);
    t.backlog_rows.store(rows, Relaxed);
    t.spool_bytes.store(bytes, Relaxed);
}
