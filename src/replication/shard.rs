//! A shard's state between cuts (docs/replication.md): the per-client
//! deduplication windows and the gauge memory, with the last cut written.
//! It is made from, and turned into, [`super::state`]'s bytes; the
//! deduplication windows are opened from a file of their own
//! (`data_dir/replication/<stream>-<shard>/dedup`), as the ledger's are.

use std::path::PathBuf;
use std::sync::Arc;

use super::cut::Cut;
use crate::ledger::dedup::{Dedup, DedupWrite};
use crate::outbox::gauges::{GaugeMemory, GaugesWrite};

pub struct Shard {
    pub n: u32,
    pub dedup: Dedup,
    pub gauges: GaugeMemory,
    /// The last cut written (by anyone), and its revision.
    pub last: Option<(Cut, u64)>,
}

impl Shard {
    /// Shard `n`'s state from `state` (empty: a fresh one); its
    /// deduplication file is written under `dir` and opened (on a
    /// blocking thread).
    pub async fn load(
        n: u32,
        dir: PathBuf,
        dedup_window: u64,
        max_gauges: usize,
        state: Vec<u8>,
    ) -> Result<Shard, String> {
        let (dedup_text, gauge_log) = if state.is_empty() {
            (String::new(), Vec::new())
        } else {
            super::state::decode(&state).map_err(|e| format!("shard {n}'s state: {e}"))?
        };
        let dedup = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("dedup");
            if dedup_text.is_empty() {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            } else {
                std::fs::write(&path, dedup_text)?;
            }
            Dedup::open(&dir, dedup_window, Arc::new(crate::fs::RealFs))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("shard {n}'s deduplication state: {e}"))?;
        let mut gauges = GaugeMemory::new(max_gauges);
        if !gauge_log.is_empty() {
            let log = crate::outbox::gauges::decode_log(&gauge_log)
                .map_err(|e| format!("shard {n}'s gauge memory: {e}"))?;
            gauges.remember_saved(log.values);
        }
        Ok(Shard {
            n,
            dedup,
            gauges,
            last: None,
        })
    }

    /// The state now, whole ([`super::state`] bytes; each part a rewrite,
    /// not a change since the last).
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.dedup.write_failed();
        let dedup = match self.dedup.snapshot() {
            DedupWrite::Rewrite(all) | DedupWrite::Append(all) => all,
        };
        self.gauges.persist_failed();
        let gauges = match self.gauges.persist(0, &[]) {
            GaugesWrite::Rewrite(all) | GaugesWrite::Append(all) => all,
        };
        super::state::encode(&dedup, &gauges)
    }
}
