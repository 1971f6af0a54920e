//! The way to the stream, made at start and kept: every server's `/varz`
//! checked ([`super::check`]), then the client connected and the stream
//! made or checked ([`super::publish::Publisher`]).
//!
//! A server that answers and cannot promise an fsync per write refuses the
//! start (a configuration error). One that cannot be reached yet, or a
//! stream without a leader yet (a cluster coming up at boot), does not:
//! tallyd starts, answers acknowledged batches `OVERLOADED`, says so on
//! `/health`, and tries again every [`RETRY`] until the stream is usable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::check::{self, Refused};
use super::publish::{Publisher, StreamSpec};
use crate::telemetry::Telemetry;

/// How often a stream not yet usable is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// What the link needs.
#[derive(Debug, Clone)]
pub struct Target {
    pub servers: Vec<String>,
    pub auth: super::publish::NatsAuth,
    pub monitor_urls: Vec<String>,
    pub spec: StreamSpec,
    pub timeout: Duration,
}

pub struct Link {
    publisher: watch::Sender<Option<Arc<Publisher>>>,
    /// Why it is not usable yet (empty once it is).
    why: Mutex<String>,
    telemetry: Arc<Telemetry>,
}

impl Link {
    /// The first attempt: `Err` for a server that is not fit (refuse the
    /// start); otherwise the link, usable or still being tried in the
    /// background until `stop`.
    pub async fn open(
        target: Target,
        telemetry: Arc<Telemetry>,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Link>, String> {
        let link = Arc::new(Link {
            publisher: watch::channel(None).0,
            why: Mutex::new(String::new()),
            telemetry,
        });
        match attempt(&target).await {
            Ok(p) => {
                link.publisher.send_replace(Some(Arc::new(p)));
                return Ok(link);
            }
            Err(Refused::Unfit(why)) => return Err(why),
            Err(Refused::Unreachable(why)) => {
                tracing::warn!(%why, "the replication stream is not usable yet; acknowledged batches are answered OVERLOADED until it is");
                link.unusable(why);
            }
        }
        let retrying = Arc::clone(&link);
        tokio::spawn(async move {
            let mut stop = stop;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.changed() => return,
                }
                match attempt(&target).await {
                    Ok(p) => {
                        tracing::info!("the replication stream is usable");
                        retrying.publisher.send_replace(Some(Arc::new(p)));
                        retrying.unusable(String::new());
                        return;
                    }
                    Err(e) => {
                        if let Refused::Unfit(why) = &e {
                            tracing::error!(%why, "a NATS server of replication.servers cannot hold what tallyd acknowledges");
                        }
                        retrying.unusable(super::publish::explain(&e.to_string()));
                    }
                }
            }
        });
        Ok(link)
    }

    /// Notes why the stream is not usable (empty: it is), for `/health`.
    fn unusable(&self, why: String) {
        let status = (!why.is_empty()).then(|| why.clone());
        *crate::lock(&self.telemetry.replication.unusable) = status;
        *crate::lock(&self.why) = why;
    }

    /// The publisher, once the stream is usable.
    pub fn publisher(&self) -> Option<Arc<Publisher>> {
        self.publisher.borrow().clone()
    }

    /// Waits until the stream is usable.
    pub async fn ready(&self) -> Arc<Publisher> {
        let mut rx = self.publisher.subscribe();
        loop {
            if let Some(p) = rx.borrow_and_update().clone() {
                return p;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Why the stream is not usable yet; `None` once it is.
    pub fn not_ready(&self) -> Option<String> {
        let why = crate::lock(&self.why).clone();
        (self.publisher().is_none()).then_some(why)
    }
}

/// Every server's `/varz`, then the connection and the stream.
async fn attempt(target: &Target) -> Result<Publisher, Refused> {
    let checked = check_all(target.monitor_urls.clone()).await?;
    let publisher = Publisher::connect(
        &target.servers,
        &target.auth,
        target.spec.clone(),
        target.timeout,
    )
    .await
    .map_err(|e| match e.strip_prefix(super::publish::UNFIT) {
        Some(why) => Refused::Unfit(why.to_owned()),
        None => Refused::Unreachable(e),
    })?;
    tracing::info!(servers = ?checked, "the replication stream is usable; its servers fsync every write");
    Ok(publisher)
}

/// Every server's `/varz` (on a blocking thread).
pub async fn check_all(urls: Vec<String>) -> Result<Vec<check::Fit>, Refused> {
    tokio::task::spawn_blocking(move || {
        urls.iter()
            .map(|u| check::server(u))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| Refused::Unreachable(e.to_string()))?
}
