//! systemd integration over `NOTIFY_SOCKET` (the sd-notify crate; without
//! systemd every call is a no-op): `READY=1` once the WAL is replayed and
//! the listeners are bound, a short `STATUS=` every few seconds,
//! `STOPPING=1` when the shutdown begins, and `WATCHDOG=1` pings while the
//! flush loop and the UDP receive threads show signs of life. If either is
//! stuck the pings stop, and systemd restarts tallyd after `WatchdogSec`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::aggregate::Aggregator;
use crate::clock::wall_clock;
use crate::telemetry::Telemetry;

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Milliseconds since the Unix epoch, for heartbeats.
pub fn now_ms() -> u64 {
    wall_clock().as_millis() as u64
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining and flushing"),
    ]);
}

/// Whether the loops that must make progress did so recently.
pub fn alive(t: &Telemetry, flush_interval: Duration, udp: bool) -> bool {
    let now = now_ms();
    let flush_limit = (3 * flush_interval)
        .max(Duration::from_secs(10))
        .as_millis() as u64;
    let flush_ok = now.saturating_sub(t.flush_heartbeat_ms.load(Relaxed)) < flush_limit;
    let udp_ok = !udp || now.saturating_sub(t.udp_heartbeat_ms.load(Relaxed)) < 10_000;
    flush_ok && udp_ok
}

/// Status lines and watchdog pings until `stop` turns true.
pub fn spawn(
    telemetry: Arc<Telemetry>,
    aggregator: Arc<Aggregator>,
    flush_interval: Duration,
    udp: bool,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    tokio::spawn(async move {
        let mut since_status = Duration::ZERO;
        let mut stuck_reported = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            if watchdog.is_some() {
                if alive(&telemetry, flush_interval, udp) {
                    send(&[NotifyState::Watchdog]);
                    stuck_reported = false;
                } else if !stuck_reported {
                    tracing::error!(
                        "the flush loop or the UDP threads are stuck: no more watchdog pings"
                    );
                    stuck_reported = true;
                }
            }
            since_status += tick;
            if since_status >= STATUS_EVERY {
                since_status = Duration::ZERO;
                let keys = aggregator.current().keys();
                let backlog = telemetry.backlog_rows.load(Relaxed);
                send(&[NotifyState::Status(&format!(
                    "running: {keys} live keys, {backlog} rows waiting for ClickHouse"
                ))]);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_heartbeats_are_not_alive() {
        let t = Telemetry::default();
        t.flush_heartbeat_ms.store(now_ms(), Relaxed);
        t.udp_heartbeat_ms.store(now_ms(), Relaxed);
        assert!(alive(&t, Duration::from_secs(1), true));
        t.udp_heartbeat_ms.store(now_ms() - 60_000, Relaxed);
        assert!(!alive(&t, Duration::from_secs(1), true));
        assert!(
            alive(&t, Duration::from_secs(1), false),
            "UDP off: its heartbeat does not matter"
        );
        t.flush_heartbeat_ms.store(now_ms() - 60_000, Relaxed);
        assert!(!alive(&t, Duration::from_secs(1), false));
    }
}
