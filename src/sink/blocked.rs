//! A table blocked by schema drift holds only itself: its bodies wait in
//! order, read back from the spool, and are retried with backoff, while the
//! other tables go on ([`super::Sink::run`]).

use super::*;

/// Tables blocked by schema drift in [`Sink::run`]: per table, the flushes
/// whose body for it waits, oldest first; per flush, the tables it still
/// needs (a bit each) and whether it is a re-send. Bounded by the spool:
/// each entry is a flush id whose file stays until every table has its rows.
#[derive(Debug, Default)]
pub(super) struct Blocked {
    pub(super) waiting: [std::collections::VecDeque<u64>; TABLES.len()],
    pub(super) left: std::collections::BTreeMap<u64, (u8, bool)>,
    /// When to try the blocked tables again.
    pub(super) retry_at: Option<tokio::time::Instant>,
    pub(super) attempt: u32,
}

impl Sink {
    /// Rewrites a flush's spool file with only the bodies of the tables in
    /// `pending` (a bit each): a restart then sends those, not the tables
    /// already in ClickHouse again. If it fails the file stays whole (a
    /// restart re-sends every table, which the token and `FINAL` collapse).
    pub(super) async fn keep_pending(&self, q: &Queued, pending: u8) {
        let Some(ledger) = &self.ledger else { return };
        let flush = &q.flush;
        let (l, f, spooled) = (Arc::clone(ledger), Arc::clone(flush), q.spooled.is_some());
        let kept = tokio::task::spawn_blocking(move || {
            if spooled {
                // Its bodies are in its file, not in `f`.
                l.keep_pending(&l.read(f.flush_id)?, pending)
            } else {
                l.keep_pending(&f, pending)
            }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        if let Err(e) = kept {
            tracing::warn!(error = %e, flush_id = flush.flush_id, "could not drop the written tables from a flush's spool file; a restart sends them again");
        }
    }

    /// When it is time, tries each blocked table's oldest waiting body once
    /// (read back from the spool), and on success the ones after it.
    pub(super) async fn retry_blocked(&self, blocked: &mut Blocked) {
        let Some(at) = blocked.retry_at else { return };
        if tokio::time::Instant::now() < at {
            return;
        }
        let Some(ledger) = &self.ledger else { return };
        let mut still = false;
        for (table, name) in TABLES.iter().enumerate() {
            while let Some(&id) = blocked.waiting[table].front() {
                let Some(&(mask, resent)) = blocked.left.get(&id) else {
                    blocked.waiting[table].pop_front();
                    continue;
                };
                let l = Arc::clone(ledger);
                let read = tokio::task::spawn_blocking(move || l.read(id))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
                let mut read_back = None;
                let written = match read {
                    Ok(flush) => {
                        self.checked[table].store(false, Relaxed);
                        let q = Queued::in_memory(flush, resent);
                        let written = self.write_table(table, &q, false).await;
                        read_back = Some(q);
                        written
                    }
                    // Quarantined (damaged) or gone: nothing left to write.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::InvalidData | std::io::ErrorKind::NotFound
                        ) =>
                    {
                        tracing::error!(error = %e, flush_id = id, table = name, "cannot read a flush back for its blocked table; its rows of that table are lost");
                        true
                    }
                    // Anything else may pass: tried again later.
                    Err(e) => {
                        tracing::warn!(error = %e, flush_id = id, table = name, "cannot read a flush back for its blocked table yet; trying again");
                        false
                    }
                };
                if !written {
                    still = true;
                    break;
                }
                blocked.waiting[table].pop_front();
                let mask = mask & !(1 << table);
                if mask == 0 {
                    blocked.left.remove(&id);
                    self.complete(read_back.as_ref().map(|q| &*q.flush), id)
                        .await;
                } else {
                    if let Some(q) = &read_back {
                        self.keep_pending(q, mask).await;
                    }
                    blocked.left.insert(id, (mask, resent));
                }
            }
        }
        blocked.retry_at = still.then(|| {
            let config = self.current().config;
            let delay = backoff(
                blocked.attempt,
                config.retry_initial,
                config.retry_max,
                jitter(),
            );
            blocked.attempt = blocked.attempt.saturating_add(1);
            tokio::time::Instant::now() + delay
        });
        if !still {
            blocked.attempt = 0;
        }
    }
}
