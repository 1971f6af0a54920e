//! The fleet tier's figures: an edge's forwarding, per upstream, and the
//! edges an aggregator hears from, with how far behind each is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use super::{Metrics, Sample};

/// Edges named one by one in `/metrics` (the laggiest; the others count
/// in the totals only), so that a large fleet keeps `/metrics` small.
const NAMED_EDGES: usize = 10;
/// Edges tracked at most (a client id each).
const MAX_EDGES: usize = 100_000;
/// An edge not heard from for this long is no longer counted as seen.
const SEEN_FOR_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Default)]
pub struct Fleet {
    /// An edge's forwarding (see [`crate::forward`]): batches and rows
    /// taken by upstreams (rows first sent, and re-sent from the spool
    /// after a restart), attempts retried, parts answered `DUPLICATE`,
    /// and rows an upstream refused by its limits.
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub rows_resent: AtomicU64,
    pub retries: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    /// Flushes waiting for a down upstream their plan names.
    pub waiting: AtomicU64,
    /// `forward.max_lag` in seconds: past it `/health` is degraded (0: not
    /// an edge).
    pub max_lag_secs: AtomicU64,
    /// Per upstream, in `forward.upstreams` order.
    pub upstreams: Mutex<Vec<UpstreamStats>>,
    /// An aggregator's edges, by client id.
    edges: Mutex<HashMap<String, EdgeSeen>>,
}

/// One upstream of an edge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamStats {
    pub name: String,
    pub up: bool,
    /// Rows it took.
    pub rows: u64,
    /// Flushes waiting for it.
    pub waiting: u64,
}

/// When an aggregator last heard from an edge, and the newest interval it
/// has of it.
#[derive(Debug, Clone, Copy)]
struct EdgeSeen {
    at_ms: u64,
    newest: u64,
}

impl Fleet {
    /// An aggregator took a batch of forwarded state from `client` (an
    /// edge's client id) whose newest interval starts at `newest` (Unix
    /// seconds), at `now_ms`.
    pub fn heard(&self, client: &str, newest: u64, now_ms: u64) {
        let mut edges = crate::lock(&self.edges);
        if let Some(e) = edges.get_mut(client) {
            e.at_ms = now_ms;
            e.newest = e.newest.max(newest);
            return;
        }
        // Bounded: past MAX_EDGES the silent ones go, and a new edge is
        // not listed while every listed one is still heard from.
        if edges.len() >= MAX_EDGES {
            edges.retain(|_, e| now_ms.saturating_sub(e.at_ms) < SEEN_FOR_MS);
            if edges.len() >= MAX_EDGES {
                return;
            }
        }
        edges.insert(
            client.to_owned(),
            EdgeSeen {
                at_ms: now_ms,
                newest,
            },
        );
    }

    /// The edges heard from lately, each with its lag in seconds (now
    /// against its newest interval), laggiest first.
    pub fn edges(&self, now_ms: u64) -> Vec<(String, u64)> {
        let edges = crate::lock(&self.edges);
        let mut seen: Vec<(String, u64)> = edges
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.at_ms) < SEEN_FOR_MS)
            .map(|(id, e)| (id.clone(), (now_ms / 1000).saturating_sub(e.newest)))
            .collect();
        seen.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        seen
    }

    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        for (name, help, c) in [
            (
                "tallyd_forward_batches_total",
                "Batches of forwarded state the upstream aggregators took (OK or DUPLICATE).",
                &self.batches,
            ),
            (
                "tallyd_forward_rows_total",
                "Rows (one key over one interval) forwarded to upstream aggregators.",
                &self.rows,
            ),
            (
                "tallyd_forward_rows_resent_total",
                "Rows forwarded again from the spool after a restart.",
                &self.rows_resent,
            ),
            (
                "tallyd_forward_retries_total",
                "Forwarding attempts that failed and were retried.",
                &self.retries,
            ),
            (
                "tallyd_forward_duplicates_total",
                "Forwarded batches an upstream had taken before (a lost ack, or a restart).",
                &self.duplicates,
            ),
            (
                "tallyd_forward_rejected_rows_total",
                "Forwarded rows an upstream refused by its own limits.",
                &self.rejected,
            ),
        ] {
            m.counter(name, help, "", c);
        }
        m.gauge(
            "tallyd_forward_waiting",
            "Flushes waiting for a down upstream their plan names (newer ones go to the live upstreams).",
            "",
            &self.waiting,
        );
        for u in crate::lock(&self.upstreams).iter() {
            let lab = format!("upstream=\"{}\"", u.name.replace(['"', '\\'], "_"));
            m.gauge("tallyd_forward_upstream_up", "1 while the upstream takes forwarded flushes; 0 while it is down (tried again with backoff).", &lab, &Value(u64::from(u.up)));
            m.counter(
                "tallyd_forward_upstream_rows_total",
                "Rows the upstream took.",
                &lab,
                &Value(u.rows),
            );
            m.gauge(
                "tallyd_forward_upstream_waiting",
                "Flushes waiting for the upstream.",
                &lab,
                &Value(u.waiting),
            );
        }
        let now = crate::clock::wall_clock().as_millis() as u64;
        let edges = self.edges(now);
        if !edges.is_empty() {
            m.gauge(
                "tallyd_edges_seen",
                "Edges that forwarded state in the last 5 minutes.",
                "",
                &Value(edges.len() as u64),
            );
            m.gauge("tallyd_edges_lagging", "Of those, edges whose newest interval here is over a minute old (a backlog, a partition, a stopped edge).", "", &Value(edges.iter().filter(|e| e.1 > 60).count() as u64));
            for (id, lag) in edges.iter().take(NAMED_EDGES) {
                let lab = format!("edge=\"{}\"", id.replace(['"', '\\'], "_"));
                m.gauge("tallyd_edge_lag_seconds", "The laggiest edges (10 at most): seconds since the start of the newest interval this aggregator has of each.", &lab, &Value(*lag));
            }
        }
    }
}

/// A number to print.
struct Value(u64);

impl Sample for Value {
    fn text(&self) -> String {
        self.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_are_listed_laggiest_first_and_forgotten_when_silent() {
        let f = Fleet::default();
        let now = 1_000_000_000;
        f.heard("a", 999_990, now);
        f.heard("b", 999_000, now);
        f.heard("c", 999_999, now - SEEN_FOR_MS - 1);
        assert_eq!(
            f.edges(now),
            [("b".to_string(), 1000), ("a".to_string(), 10)]
        );
    }
}
