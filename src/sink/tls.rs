//! HTTPS to ClickHouse: the HTTP client the sink uses for an `https://` URL
//! (ClickHouse Cloud, a secured server), built on rustls (with ring).
//!
//! The server's certificate is checked against the operating system's
//! roots, or only against `clickhouse.ca_file` (PEM) when it is set, for a
//! private CA. `clickhouse.client_cert` and `clickhouse.client_key` (PEM)
//! add a client certificate. The files are read and parsed when the
//! configuration is validated ([`Pem::read`]), so a bad file is a config
//! error naming the field. Without a CA file, the system's roots are read
//! then too ([`SystemRoots`]), so building a client reads no file.
//!
//! **A self-signed server certificate is pinned.** `openssl req -x509` (as
//! ClickHouse's guide to HTTPS has it) makes a certificate with
//! `basicConstraints = CA:TRUE` on OpenSSL 3. WebPKI refuses a CA
//! certificate presented as a server's own (`CaUsedAsEndEntity`, RFC 5280
//! §4.2.1.9 read as the CA/Browser Forum does), where OpenSSL and curl
//! trust it when it is itself in the trust store. tallyd does as curl
//! does, with no setting to turn on: a server that presents, as its own,
//! a certificate byte for byte in `ca_file` is trusted ([`Pinned`]), with
//! its validity period (checked by WebPKI before it refuses a CA) and the
//! server's name still checked. Nothing else is loosened: a CA
//! certificate that `ca_file` does not hold is refused as before.
//!
//! A server that is not trusted fails every request; [`tls_reason`] finds
//! rustls's error in the chain and says it in words (unknown issuer, a CA
//! certificate not in `ca_file`, a name mismatch, expired), which the sink
//! logs with the URL and `/health` shows; the data waits in the spool
//! meanwhile.

use std::sync::Arc;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

pub use crate::auth::tls::Pem;

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

/// The rustls client side of `files`: WebPKI over its roots, with
/// `ca_file`'s self-signed certificates pinned, and its client
/// certificate. Also the forward link's (`forward.ca_file`).
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match verifier(files, provider)? {
        Some(v) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(v)),
        // No roots at all (a plain http:// URL without a CA file): every
        // https:// server would be refused.
        None => builder.with_root_certificates(RootCertStore::empty()),
    };
    match &files.client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs.certs()?, key.key()?)
            .map_err(|e| format!("client_cert/client_key: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The HTTP client for ClickHouse: plain HTTP, or HTTPS with `files`.
pub fn client(files: &TlsFiles) -> Result<clickhouse::Client, String> {
    let tls = client_config(files)?;
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

/// WebPKI over `files`' roots, with `ca_file`'s certificates pinned;
/// `None` without any root.
fn verifier(
    files: &TlsFiles,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Option<Pinned>, String> {
    let mut roots = RootCertStore::empty();
    let mut pinned = Vec::new();
    match &files.ca {
        Some(ca) => {
            for cert in ca.certs()? {
                roots
                    .add(cert.clone())
                    .map_err(|e| format!("ca_file: {e}"))?;
                pinned.push(cert);
            }
        }
        None => {
            roots.add_parsable_certificates(files.system.0.iter().cloned());
        }
    }
    if roots.is_empty() {
        return Ok(None);
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("ca_file: {e}"))?;
    Ok(Some(Pinned { webpki, pinned }))
}

/// WebPKI's verdict, except that a server presenting as its own a CA
/// certificate that `ca_file` holds byte for byte is trusted once its name
/// matches (see the module doc). WebPKI checks a certificate's validity
/// period before its basic constraints, so `CaUsedAsEndEntity` comes only
/// for a certificate within its period (an expired one is `Expired`;
/// tested).
#[derive(Debug)]
struct Pinned {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(e)
                if is_ca_used_as_end_entity(&e)
                    && self
                        .pinned
                        .iter()
                        .any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// rustls passes WebPKI's `CaUsedAsEndEntity` on as an opaque `Other`.
fn is_ca_used_as_end_entity(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::InvalidCertificate(CertificateError::Other(o))
        if o.to_string().contains("CaUsedAsEndEntity"))
}

/// How many of `ca`'s certificates are CA certificates a server may
/// present as its own (self-signed with `CA:TRUE`, within their period):
/// the ones tallyd pins, for `check-config` to say so.
pub fn pinned_self_signed(ca: &Pem) -> usize {
    let Ok(certs) = ca.certs() else {
        return 0;
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = TlsFiles {
        ca: Some(ca.clone()),
        ..TlsFiles::default()
    };
    let Ok(Some(v)) = verifier(&files, provider) else {
        return 0;
    };
    // WebPKI checks the chain before the name: any name will do.
    let name = ServerName::from(std::net::Ipv4Addr::LOCALHOST);
    certs
        .iter()
        .filter(|cert| {
            v.webpki
                .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
                .is_err_and(|e| is_ca_used_as_end_entity(&e))
        })
        .count()
}

/// Whether a received alert is about our certificate (RFC 8446 §6.2):
/// a refusal that a retry will not change.
pub fn is_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
    )
}

/// Whether `err`'s chain holds a certificate refusal, on either side (the
/// server's certificate not trusted, or ours refused).
pub fn is_certificate_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    match rustls_error(err) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => true,
        Some(rustls::Error::AlertReceived(a)) => is_certificate_alert(*a),
        _ => false,
    }
}

/// Why a request failed at TLS, in words, when it did: rustls's error
/// found in `err`'s chain (through the `io::Error` that carries it).
pub fn tls_reason(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    rustls_error(err).map(explain)
}

/// rustls's error in `err`'s chain, if any.
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // An `io::Error`'s `source()` skips the error it wraps (hyper-rustls
        // wraps tokio-rustls's, which wraps rustls's).
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => e.source(),
        };
    }
    None
}

fn explain(e: &rustls::Error) -> String {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown issuer: the server's certificate is not signed by a CA in the CA file (clickhouse.ca_file, forward.ca_file or tallyd send --ca-file; without one, the system's roots)".into(),
            C::NotValidForName => "name mismatch: the server's certificate is not for the URL's host".into(),
            C::NotValidForNameContext { expected, presented } => format!(
                "name mismatch: the server's certificate is for {}, not {expected:?}",
                presented.join(", ")
            ),
            C::Expired | C::ExpiredContext { .. } => format!("the server's certificate has expired ({c:?})"),
            C::NotValidYet | C::NotValidYetContext { .. } => format!("the server's certificate is not valid yet ({c:?})"),
            C::BadSignature => "bad signature: the server's certificate names an issuer that the CA file holds, but that key did not sign it (was the server's certificate made again, and the file holds the old one?)".into(),
            _ if is_ca_used_as_end_entity(e) => "CA used as end entity: the server presents a CA certificate (CA:TRUE) as its own; put exactly that certificate in the CA file to pin it".into(),
            other => format!("the server's certificate is refused: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) if is_certificate_alert(*alert) => {
            format!("the server refused the client certificate, or the lack of one ({alert:?}): it asks for one signed by its CA (client_cert, --client-cert)")
        }
        rustls::Error::AlertReceived(alert) => format!("the server ended the handshake ({alert:?})"),
        other => format!("TLS failed: {other}"),
    }
}

#[cfg(test)]
mod tests;
