//! The WAL checkpoint: which generations are done (recorded in the spool,
//! see [`crate::ledger`]), so that their records may be overwritten.
//!
//! # The `checkpoint` file, version 1 (text, written atomically)
//!
//! ```text
//! tallyd-checkpoint 1
//! confirmed <G>      every generation up to G is done
//! done <g>           one line per done generation above G (a gap waits below it)
//! intent <g> <flush id> <ts>   (read only) written by tallyd before the spool
//!                    existed: generation g was sent with this flush id and
//!                    interval start; replay re-sends it under them
//! ```
//!
//! A file without the first line is version 0 (the release before the
//! ledger): the same lines, `intent` lines included.

use std::collections::{BTreeMap, BTreeSet};

/// A flush written down before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    pub flush_id: u64,
    pub ts: u32,
}

/// What the checkpoint file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Checkpoint {
    /// Every generation up to this one is confirmed.
    pub confirmed: u64,
    /// Confirmed generations above `confirmed` (waiting for a gap to close).
    pub done: BTreeSet<u64>,
    pub intents: BTreeMap<u64, Intent>,
}

impl Checkpoint {
    pub fn encode(&self) -> String {
        let mut s = format!("tallyd-checkpoint 1\nconfirmed {}\n", self.confirmed);
        for g in &self.done {
            s.push_str(&format!("done {g}\n"));
        }
        for (g, i) in &self.intents {
            s.push_str(&format!("intent {g} {} {}\n", i.flush_id, i.ts));
        }
        s
    }

    pub fn decode(text: &str) -> Result<Checkpoint, String> {
        let mut c = Checkpoint::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| -> Result<u64, String> {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("bad line {line:?}"))
            };
            match f.first() {
                Some(&"tallyd-checkpoint") if f.get(1) == Some(&"1") => {}
                Some(&"tallyd-checkpoint") => {
                    return Err(format!(
                        "unknown version in {line:?}; a newer tallyd wrote it"
                    ));
                }
                Some(&"confirmed") => c.confirmed = num(1)?,
                Some(&"done") => {
                    c.done.insert(num(1)?);
                }
                Some(&"intent") => {
                    let ts = u32::try_from(num(3)?).map_err(|_| format!("bad ts in {line:?}"))?;
                    c.intents.insert(
                        num(1)?,
                        Intent {
                            flush_id: num(2)?,
                            ts,
                        },
                    );
                }
                None => {}
                Some(_) => return Err(format!("bad line {line:?}")),
            }
        }
        Ok(c)
    }

    /// Marks every generation up to `generation` done.
    pub fn confirm_through(&mut self, generation: u64) {
        self.confirmed = self.confirmed.max(generation);
        self.done.retain(|&g| g > generation);
        self.confirm(generation);
    }

    pub fn confirm(&mut self, generation: u64) {
        if generation > self.confirmed {
            self.done.insert(generation);
        }
        while self.done.remove(&(self.confirmed + 1)) {
            self.confirmed += 1;
        }
        let confirmed = self.confirmed;
        self.intents.retain(|g, _| *g > confirmed);
    }
}
