//! Refused connections and requests, by listener and reason
//! (`tallyd_refused_total{listener,reason}`: 5 × 5 series at most), and
//! their log lines at a bounded rate: the first refusal in a
//! [`LOG_EVERY`] window is logged with its peer and rustls's or the
//! check's words; the others in that window are only counted, and the
//! next line says how many there were.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::Metrics;
use crate::auth::{Listener, Refusal};

/// At most one refusal log line per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Refused {
    counts: [[AtomicU64; Refusal::ALL.len()]; Listener::ALL.len()],
    /// When the last line was logged, and the refusals not logged since.
    log: Mutex<Option<(Instant, u64)>>,
}

impl Refused {
    /// Counts a refusal, and logs it unless one was logged in the last
    /// [`LOG_EVERY`].
    pub fn refuse(&self, listener: Listener, reason: Refusal, peer: &str, detail: &str) {
        self.counts[listener.index()][reason.index()].fetch_add(1, Relaxed);
        let now = Instant::now();
        let mut log = crate::lock(&self.log);
        let unlogged = match *log {
            Some((at, n)) if now.duration_since(at) < LOG_EVERY => {
                *log = Some((at, n + 1));
                return;
            }
            Some((_, n)) => n,
            None => 0,
        };
        *log = Some((now, 0));
        drop(log);
        tracing::warn!(
            listener = listener.name(),
            reason = reason.name(),
            %peer,
            detail,
            refused_unlogged = unlogged,
            "refused a connection or request (logged at most once per 10 s; tallyd_refused_total counts every one)"
        );
    }

    /// How many `listener` refused for `reason`.
    pub fn count(&self, listener: Listener, reason: Refusal) -> u64 {
        self.counts[listener.index()][reason.index()].load(Relaxed)
    }

    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        for l in Listener::ALL {
            for r in Refusal::ALL {
                m.counter(
                    "tallyd_refused_total",
                    "Connections and requests refused by TLS (handshake, client certificate) or by token, by listener and reason; their data is not applied.",
                    &format!("listener=\"{}\",reason=\"{}\"", l.name(), r.name()),
                    &self.counts[l.index()][r.index()],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_counted_by_listener_and_reason() {
        let r = Refused::default();
        for _ in 0..3 {
            r.refuse(Listener::ProtoTcp, Refusal::TokenWrong, "127.0.0.1:1", "x");
        }
        r.refuse(Listener::Admin, Refusal::TokenMissing, "127.0.0.1:2", "y");
        assert_eq!(r.count(Listener::ProtoTcp, Refusal::TokenWrong), 3);
        assert_eq!(r.count(Listener::Admin, Refusal::TokenMissing), 1);
        assert_eq!(r.count(Listener::Admin, Refusal::TokenWrong), 0);
        // The two after the first were in its window: not logged yet.
        assert_eq!(crate::lock(&r.log).map(|(_, n)| n), Some(3));
    }
}
