//! The one shutdown path, as a sequence (see the module doc of
//! [`crate::server`]).

use super::*;

/// How long the replication consumer gets to give its leases back.
const REPLICATION_GRACE: Duration = Duration::from_secs(2);

impl Running {
    /// The one shutdown path (see the module doc). Returns the rows that could
    /// not be written within `shutdown_timeout`.
    pub async fn shutdown(self) -> u64 {
        self.state.ready.store(false, Ordering::Relaxed);
        crate::notify::stopping();
        tracing::info!("stopping: draining listeners");
        // One deadline for the whole stop; the listeners get half of it.
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.shutdown_timeout;
        let listen_deadline = started + self.config.shutdown_timeout / 2;
        self.udp_stop.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        // Acks that still wait for durability then give up (a failing disk
        // must not hold the stop).
        let close_acks = self.wal.as_ref().map(|wal| {
            let wal = Arc::clone(wal);
            tokio::spawn(async move {
                tokio::time::sleep_until(listen_deadline).await;
                wal.close_acks();
            })
        });
        let threads = self.udp_threads;
        let uds_path = self.uds_path;
        let uds_stream_path = self.uds_stream_path;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            for path in [uds_path, uds_stream_path].into_iter().flatten() {
                let _ = std::fs::remove_file(path);
            }
        })
        .await;
        for mut task in [
            self.tcp,
            self.proto_tcp,
            self.otlp_http,
            self.otlp_grpc,
            self.uds_stream,
        ]
        .into_iter()
        .flatten()
        {
            if tokio::time::timeout_at(listen_deadline, &mut task)
                .await
                .is_err()
            {
                // A sender that never pauses, or a client that stopped
                // reading its acks: its connection is cut.
                task.abort();
                let _ = task.await;
                tracing::warn!("TCP connections did not drain in time; cut");
            }
        }
        // The last interval is recorded in the spool (parked if the queue is
        // full), so it does not wait for ClickHouse.
        let _ = self.flush_stop.send(true);
        let mut flush = self.flush;
        let unrecorded = match tokio::time::timeout_at(deadline, &mut flush).await {
            Ok(Ok(samples)) => samples,
            Ok(Err(_)) => 0,
            Err(_) => {
                flush.abort();
                // Wait for the cancelled task to be dropped (it holds the WAL).
                let _ = flush.await;
                self.aggregator.current().pending.load(Ordering::Relaxed)
            }
        };
        let lost = match (unrecorded, &self.wal) {
            (0, _) => 0,
            (samples, Some(_)) => {
                tracing::warn!(
                    samples,
                    "the last interval could not be recorded in time; it stays in the WAL for the next start"
                );
                0
            }
            (samples, None) => {
                self.telemetry
                    .rows_lost_at_shutdown
                    .fetch_add(samples, Ordering::Relaxed);
                tracing::error!(
                    samples,
                    "the last interval could not be recorded in time and the WAL is off; it is lost"
                );
                samples
            }
        };
        let mut sink = self.sink;
        if tokio::time::timeout_at(deadline, &mut sink).await.is_err() {
            sink.abort();
            let _ = sink.await;
            let rows = self.telemetry.backlog_rows.load(Ordering::Relaxed);
            tracing::warn!(rows, timeout = ?self.config.shutdown_timeout, "ClickHouse did not take the last rows in time; they stay in the spool for the next start");
        }
        // It gives its shards' leases back when it sees the stop; a
        // flush it was writing is written again by whoever takes them.
        if let Some(mut task) = self.replication
            && tokio::time::timeout(REPLICATION_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        // It holds the ledger (the data dir's lock).
        if let Some(task) = self.rollups {
            task.abort();
            let _ = task.await;
        }
        if let Some(task) = close_acks {
            task.abort();
            let _ = task.await; // it holds the WAL
        }
        let _ = self.wal_sync_stop.send(true);
        if let Some(task) = self.wal_sync {
            let _ = task.await;
        }
        if let Some(wal) = &self.wal {
            let wal = Arc::clone(wal);
            let _ = tokio::task::spawn_blocking(move || wal.sync()).await;
        }
        if let Some(admin) = self.admin {
            let _ = admin.await;
        }
        let _ = self.systemd.await;
        tracing::info!("stopped");
        lost
    }
}
