//! A configuration reload (SIGHUP): what applies live, and what needs a
//! restart.

use super::*;

impl Running {
    /// Applies a new configuration without losing pending data: limits,
    /// flush interval and max depth, ClickHouse URL, credentials and
    /// timeouts, key budgets, tag dialects and mapping rules (from the
    /// next interval; their file is written first, see [`super::keying`]),
    /// the listeners' TLS certificates and the ingest tokens, and the
    /// shutdown timeout. What needs a restart (listeners, the data
    /// dir, the WAL geometry, TCP limits) is logged, not applied.
    pub async fn reload(&mut self, mut new: Config) {
        if new.keying != self.config.keying {
            let (fs, dir, keying) = (
                Arc::clone(&self.fs),
                self.config.data_dir.clone(),
                Arc::clone(&new.keying),
            );
            let saved = super::blocking(move || super::keying::save(&*fs, &dir, &keying))
                .await
                .and_then(|r| r);
            if let Err(error) = saved {
                tracing::error!(%error, "cannot record the new tag dialects and mapping rules in the data dir; the ones in force stay");
                new.keying = Arc::clone(&self.config.keying);
            }
        }
        let old = &self.config;
        let restart: Vec<&str> = [
            ("statsd.udp", old.statsd_udp != new.statsd_udp),
            ("statsd.tcp", old.statsd_tcp != new.statsd_tcp),
            ("admin", old.admin != new.admin),
            ("admin_token", old.admin_token != new.admin_token),
            ("tls.listeners", old.auth.tls_on != new.auth.tls_on),
            ("forward", old.forward != new.forward),
            ("proto", old.proto != new.proto),
            ("data_dir", old.data_dir != new.data_dir),
            ("wal", old.wal != new.wal),
            ("host_id", old.host_id != new.host_id),
            ("statsd.udp_workers", old.udp_workers != new.udp_workers),
            (
                "statsd.udp_recv_buffer",
                old.udp_recv_buffer != new.udp_recv_buffer,
            ),
            ("statsd.tcp_max_line", old.tcp_max_line != new.tcp_max_line),
            (
                "statsd.tcp_max_connections",
                old.tcp_max_connections != new.tcp_max_connections,
            ),
            ("aggregate.flush_queue", old.flush_queue != new.flush_queue),
            (
                "spool",
                old.spool_max_size != new.spool_max_size
                    || old.spool_hard_limit != new.spool_hard_limit
                    || old.spool_drain_batch != new.spool_drain_batch
                    || old.spool_coarsen != new.spool_coarsen,
            ),
            (
                "statsd.dogstatsd_socket",
                old.dogstatsd_socket != new.dogstatsd_socket
                    || old.dogstatsd_stream_socket != new.dogstatsd_stream_socket
                    || old.dogstatsd_socket_mode != new.dogstatsd_socket_mode,
            ),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect();
        if !restart.is_empty() {
            tracing::warn!(fields = ?restart, "these settings changed but apply only after a restart");
        }
        // Certificates for the connections accepted from now on (those
        // open keep theirs), tokens for every request from now on.
        let mut auth = new.auth.clone();
        auth.tls_on.clone_from(&old.auth.tls_on);
        if let Err(error) = self.guard.reload(auth.tls.as_ref(), auth.tokens.clone()) {
            tracing::error!(%error, "cannot take the new TLS certificates; the ones in force stay");
            auth = old.auth.clone();
        }
        self.aggregator.set_limits(new.aggregate, new.parse_limits);
        self.aggregator.set_budgets(Arc::clone(&new.budgets));
        self.aggregator.set_keying(Arc::clone(&new.keying));
        self.interval.send_replace(new.flush_interval);
        self.sink_config.send_replace(new.sink.clone());
        let applied = Config {
            auth,
            aggregate: new.aggregate,
            parse_limits: new.parse_limits,
            budgets: new.budgets,
            keying: new.keying,
            flush_interval: new.flush_interval,
            sink: new.sink,
            shutdown_timeout: new.shutdown_timeout,
            log_level: new.log_level,
            ..self.config.clone()
        };
        self.config = applied;
        tracing::info!(
            flush_interval = ?self.config.flush_interval,
            max_depth = self.config.aggregate.max_depth,
            max_keys = self.config.aggregate.max_keys,
            clickhouse = %self.config.sink.url,
            tls = ?self.config.auth.tls_on.iter().map(|l| l.name()).collect::<Vec<_>>(),
            tokens = self.config.auth.tokens.as_ref().map_or(0, |t| t.len()),
            "configuration reloaded (the listeners' certificates and the tokens too)"
        );
    }
}
