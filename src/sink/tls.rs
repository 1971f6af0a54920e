//! HTTPS to ClickHouse: the HTTP client the sink uses for an `https://` URL
//! (ClickHouse Cloud, a secured server), built on rustls (with ring).
//!
//! The server's certificate is checked against the operating system's
//! roots, or only against `clickhouse.ca_file` (PEM) when it is set, for a
//! private CA. `clickhouse.client_cert` and `clickhouse.client_key` (PEM)
//! add a client certificate. The files are read and parsed when the
//! configuration is validated ([`Pem::read`]), so a bad file is a config
//! error naming the field. Without a CA file, the system's roots are read
//! then too ([`SystemRoots`]), so building a client reads no file. A server
//! whose certificate is not trusted fails every request with rustls's
//! reason (e.g. `invalid peer certificate: UnknownIssuer`), which the sink
//! logs with the URL; the data waits in the spool meanwhile.

use std::sync::Arc;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The bytes of a PEM file (certificates or a key); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(Vec<u8>);

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pem({} bytes)", self.0.len())
    }
}

impl Pem {
    /// Reads `path` and checks that it holds at least one certificate
    /// (`key`: false) or a private key (`key`: true).
    pub fn read(path: &str, key: bool) -> Result<Pem, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let pem = Pem(bytes);
        if key {
            pem.key().map(drop).map_err(|e| format!("{path}: {e}"))?;
        } else {
            pem.certs().map(drop).map_err(|e| format!("{path}: {e}"))?;
        }
        Ok(pem)
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(&self.0)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("no certificate in it".into());
        }
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(&self.0).map_err(|e| format!("no PEM private key in it: {e}"))
    }
}

/// The operating system's trusted root certificates (DER), as
/// `rustls-native-certs` finds them (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else
/// the distribution's bundle). Read with the configuration, on a thread
/// that may block, so that building a client does no file I/O on an async
/// thread (a reload rebuilds clients there).
#[derive(Clone, PartialEq, Eq)]
pub struct SystemRoots(Arc<[CertificateDer<'static>]>);

impl Default for SystemRoots {
    fn default() -> Self {
        SystemRoots(Arc::new([]))
    }
}

impl std::fmt::Debug for SystemRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SystemRoots({} certificates)", self.0.len())
    }
}

impl SystemRoots {
    /// Reads the system's roots (blocking file I/O); unreadable ones are
    /// skipped.
    pub fn load() -> SystemRoots {
        SystemRoots(rustls_native_certs::load_native_certs().certs.into())
    }

    /// Whether none were found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the TLS client trusts and shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trusted roots instead of the system's.
    pub ca: Option<Pem>,
    /// The system's roots, trusted when `ca` is not set (loaded only when
    /// a URL is `https://`).
    pub system: SystemRoots,
    /// A client certificate chain and its key.
    pub client: Option<(Pem, Pem)>,
}

/// The HTTP client for ClickHouse: plain HTTP, or HTTPS with `files`.
pub fn client(files: &TlsFiles) -> Result<clickhouse::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            for cert in ca.certs()? {
                roots
                    .add(cert)
                    .map_err(|e| format!("clickhouse.ca_file: {e}"))?;
            }
        }
        None => {
            roots.add_parsable_certificates(files.system.0.iter().cloned());
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let tls = match &files.client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs.certs()?, key.key()?)
            .map_err(|e| format!("clickhouse.client_cert/client_key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    // ClickHouse closes idle connections after 3 s (10 s from 23.11).
    let hyper = HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .build(connector);
    Ok(clickhouse::Client::with_http_client(hyper))
}
