//! Replicated ingest's figures (docs/replication.md): publishes by the
//! stream's answer, and per shard whether this tallyd holds its lease and
//! how far its reading is behind the stream; what the consumer applied,
//! cut and was fenced from. `/health` reads [`Replication::problems`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Metrics, Text};

/// How long a failed publish keeps `/health` degraded.
pub const FAILED_RECENTLY_MS: u64 = 30_000;

#[derive(Debug, Default)]
pub struct Replication {
    /// Publishes answered: stored, duplicate, failed (refused or no
    /// answer in time: the client was told `OVERLOADED`).
    pub published: [AtomicU64; 3],
    /// When a publish last failed (Unix ms; 0: never), and why.
    pub failed_at_ms: AtomicU64,
    pub failed_error: Mutex<String>,
    /// Batches read from the stream: applied, duplicate, too old (below
    /// the client's window), not a batch of format 1.
    pub read: [AtomicU64; 4],
    /// When the consumer's work on a shard last stopped on an error (Unix
    /// ms; 0: never), and why.
    pub consume_failed_ms: AtomicU64,
    pub consume_error: Mutex<String>,
    /// Cuts written, and cuts refused because another tallyd wrote first.
    pub cuts: AtomicU64,
    pub fenced: AtomicU64,
    /// Messages behind the stream a shard may be before `/health` says so.
    pub max_lag: AtomicU64,
    /// Why the stream is not usable yet (at a start before it was).
    pub unusable: Mutex<Option<String>>,
    /// Per shard: (lease held here, messages stored and not yet confirmed
    /// in ClickHouse).
    pub shards: Mutex<Vec<(bool, u64)>>,
}

/// Indexes of [`Replication::published`].
pub const STORED: usize = 0;
pub const DUPLICATE: usize = 1;
pub const FAILED: usize = 2;
/// Indexes of [`Replication::read`].
pub const APPLIED: usize = 0;
pub const READ_DUPLICATE: usize = 1;
pub const TOO_OLD: usize = 2;
pub const UNREADABLE: usize = 3;

impl Replication {
    /// Sizes the per-shard figures (at start, with replication on).
    pub fn start(&self, shards: u32, max_lag: u64) {
        *crate::lock(&self.shards) = vec![(false, 0); shards as usize];
        self.max_lag.store(max_lag, Relaxed);
    }

    pub fn publish_failed(&self, error: &str) {
        self.published[FAILED].fetch_add(1, Relaxed);
        self.failed_at_ms.store(super::unix_ms(), Relaxed);
        *crate::lock(&self.failed_error) = error.to_owned();
    }

    /// The consumer stopped on `error` (it stands by and tries again).
    pub fn consume_failed(&self, error: &str) {
        self.consume_failed_ms.store(super::unix_ms(), Relaxed);
        *crate::lock(&self.consume_error) = error.to_owned();
    }

    pub fn set_lease(&self, shard: u32, held: bool) {
        if let Some(s) = crate::lock(&self.shards).get_mut(shard as usize) {
            s.0 = held;
        }
    }

    pub fn set_lag(&self, shard: u32, lag: u64) {
        if let Some(s) = crate::lock(&self.shards).get_mut(shard as usize) {
            s.1 = lag;
        }
    }

    /// What makes `/health` degraded, one phrase each.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(why) = crate::lock(&self.unusable).as_ref() {
            p.push(format!(
                "the replication stream is not usable yet, so protobuf batches are answered OVERLOADED: {why}"
            ));
        }
        let failed = self.failed_at_ms.load(Relaxed);
        if failed != 0 && super::unix_ms().saturating_sub(failed) < FAILED_RECENTLY_MS {
            p.push(format!(
                "the replication stream refused or did not answer a publish in the last {} s, so protobuf batches were answered OVERLOADED: {}",
                FAILED_RECENTLY_MS / 1000,
                crate::lock(&self.failed_error)
            ));
        }
        let failed = self.consume_failed_ms.load(Relaxed);
        if failed != 0 && super::unix_ms().saturating_sub(failed) < FAILED_RECENTLY_MS {
            p.push(format!(
                "aggregating the replication stream failed in the last {} s (it is tried again): {}",
                FAILED_RECENTLY_MS / 1000,
                crate::lock(&self.consume_error)
            ));
        }
        let max = self.max_lag.load(Relaxed);
        for (shard, &(_, lag)) in crate::lock(&self.shards).iter().enumerate() {
            if max > 0 && lag > max {
                p.push(format!(
                    "replication shard {shard} holds {lag} messages not yet in ClickHouse (replication.max_lag: {max}): ClickHouse may be slow or down, or no tallyd aggregates the shard"
                ));
            }
        }
        p
    }

    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        let shards = crate::lock(&self.shards).clone();
        if shards.is_empty() {
            return;
        }
        for (answer, c) in ["stored", "duplicate", "failed"]
            .iter()
            .zip(&self.published)
        {
            m.counter(
                "tallyd_replication_published_total",
                "Protobuf batches published to the replication stream, by its answer (failed: refused or not answered in replication.publish_timeout; the client was told OVERLOADED).",
                &format!("answer=\"{answer}\""),
                c,
            );
        }
        for (outcome, c) in ["applied", "duplicate", "too_old", "unreadable"]
            .iter()
            .zip(&self.read)
        {
            m.counter(
                "tallyd_replication_read_total",
                "Batches this tallyd read from the stream's shards it holds, by outcome.",
                &format!("outcome=\"{outcome}\""),
                c,
            );
        }
        m.counter(
            "tallyd_replication_cuts_total",
            "Intervals this tallyd cut from the stream (each one flush).",
            "",
            &self.cuts,
        );
        m.counter(
            "tallyd_replication_fenced_total",
            "Cuts refused because another tallyd cut the shard first: this one stood down.",
            "",
            &self.fenced,
        );
        for (shard, (held, lag)) in shards.iter().enumerate() {
            let labels = format!("shard=\"{shard}\"");
            m.gauge(
                "tallyd_replication_lease",
                "1 while this tallyd holds the shard's lease and aggregates it.",
                &labels,
                &Text(u8::from(*held).to_string()),
            );
            m.gauge(
                "tallyd_replication_lag_messages",
                "Messages of the shard stored in the stream and not yet confirmed in ClickHouse, whoever aggregates it.",
                &labels,
                &Text(lag.to_string()),
            );
        }
    }
}
