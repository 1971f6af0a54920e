//! The ClickHouse servers the sink writes to: `url`, then each replica,
//! with the clients of each (one in the database, one for schema work).

use super::*;

/// Clients of one ClickHouse endpoint.
#[derive(Clone)]
pub(super) struct Endpoint {
    pub(super) url: String,
    pub(super) client: Client,
    pub(super) admin: Client,
}

/// Clients built from one set of settings: `url`, then each of `replicas`.
#[derive(Clone)]
pub(super) struct Current {
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) config: SinkConfig,
}

impl Current {
    pub(super) fn new(config: SinkConfig) -> Current {
        let endpoints = std::iter::once(&config.url)
            .chain(&config.replicas)
            .map(|url| {
                let base = if url.starts_with("https://") {
                    tls::client(&config.tls).unwrap_or_else(|e| {
                        tracing::error!(url = %url, error = %e, "cannot set up TLS for ClickHouse");
                        Client::default()
                    })
                } else {
                    Client::default()
                };
                let admin = base
                    .with_url(url)
                    .with_user(&config.user)
                    .with_password(&config.password)
                    .with_validation(false);
                let client = admin.clone().with_database(&config.database);
                Endpoint {
                    url: url.clone(),
                    client,
                    admin,
                }
            })
            .collect();
        Current { endpoints, config }
    }

    /// Endpoint `active` (wrapping).
    pub(super) fn at(&self, active: usize) -> &Endpoint {
        &self.endpoints[active % self.endpoints.len()]
    }
}
