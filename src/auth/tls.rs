//! TLS for the stream listeners (StatsD TCP, protobuf TCP, OTLP/HTTP,
//! OTLP/gRPC, admin), on rustls with ring, as the ClickHouse client.
//!
//! - `tls.cert_file` and `tls.key_file` (PEM): the server's chain and key.
//! - `tls.client_ca_file` (PEM), optional: mTLS. Every client must then
//!   show a certificate signed by one of its CAs (RFC 5280 path checks by
//!   WebPKI, within its validity); one without, or with another, is
//!   refused in the handshake and counted by reason.
//! - The handshake runs in the connection's own task, within a timeout, so
//!   a client that stalls it holds only its own connection slot.
//! - [`ServerTls::replace`] swaps the certificates (a SIGHUP): connections
//!   accepted after it use the new ones; those already open keep theirs
//!   until they close.
//!
//! ALPN: the gRPC listener offers `h2` (gRPC clients require it), the
//! HTTP listeners `http/1.1`; the line and frame listeners offer none.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Refusal;

/// The bytes of a PEM file (certificates or a key); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(Vec<u8>);

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pem({} bytes)", self.0.len())
    }
}

impl Pem {
    /// Reads `path` (blocking) and checks that it holds at least one
    /// certificate (`key`: false) or a private key (`key`: true).
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

    /// PEM text already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Pem {
        Pem(bytes)
    }

    /// Its certificates, in order; an error when it holds none.
    pub fn certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(&self.0)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("no certificate in it".into());
        }
        Ok(certs)
    }

    /// Its (first) private key.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(&self.0).map_err(|e| format!("no PEM private key in it: {e}"))
    }
}

/// What a TLS listener shows and asks for: read with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The server's certificate chain (leaf first) and its key.
    pub cert: Pem,
    pub key: Pem,
    /// mTLS: the CAs a client's certificate must be signed by.
    pub client_ca: Option<Pem>,
}

/// What [`ServerTls::new`] says of a key that is not the certificate's.
pub const KEY_MISMATCH: &str =
    "the key is not the certificate's (tls.cert_file's first certificate)";

/// The protocol a listener names in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// StatsD lines and protobuf frames: no ALPN.
    None,
    Http1,
    H2,
}

/// The server configurations of the current certificates, one per ALPN.
struct Configs([Arc<ServerConfig>; 3]);

impl Configs {
    fn build(files: &ServerFiles) -> Result<Configs, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &files.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in ca.certs()? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("tls.client_ca_file: {e}"))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("tls.client_ca_file: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(files.cert.certs()?, files.key.key()?)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => KEY_MISMATCH.to_owned(),
                e => e.to_string(),
            })?;
        let with = |alpn: &[&[u8]]| {
            let mut c = config.clone();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(c)
        };
        Ok(Configs([with(&[]), with(&[b"http/1.1"]), with(&[b"h2"])]))
    }
}

/// The TLS side of the listeners: the current certificates, swapped on
/// reload.
pub struct ServerTls {
    current: RwLock<Configs>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

/// A handshake slower than this is refused (`tls_handshake`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ServerTls {
    /// The listeners' TLS with `files`; an error names what rustls refused
    /// (a key that does not match the certificate, a bad CA).
    pub fn new(files: &ServerFiles) -> Result<ServerTls, String> {
        Ok(ServerTls {
            current: RwLock::new(Configs::build(files)?),
        })
    }

    /// Takes new certificates for the connections accepted from now on;
    /// the old ones stay in use by the connections that hold them. On an
    /// error the current ones stay.
    pub fn replace(&self, files: &ServerFiles) -> Result<(), String> {
        let configs = Configs::build(files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = configs;
        Ok(())
    }

    fn config(&self, alpn: Alpn) -> Arc<ServerConfig> {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&c.0[alpn as usize])
    }

    /// The server side of a handshake on `stream`, within
    /// [`HANDSHAKE_TIMEOUT`]; a refusal says why, and rustls's words.
    pub async fn accept<S>(&self, stream: S, alpn: Alpn) -> Result<Stream<S>, (Refusal, String)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config(alpn));
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err((
                Refusal::TlsHandshake,
                format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            )),
        }
    }
}

/// A failed handshake's reason: the client's certificate, or the rest.
fn classify(e: &io::Error) -> (Refusal, String) {
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => Refusal::NoClientCertificate,
        Some(rustls::Error::InvalidCertificate(_)) => Refusal::BadClientCertificate,
        _ => Refusal::TlsHandshake,
    };
    (reason, e.to_string())
}

/// A connection's stream: as accepted (or connected), or TLS over it: the
/// server side by default, the client side for the forward link.
pub enum Stream<S, T = tokio_rustls::server::TlsStream<S>> {
    Plain(S),
    Tls(Box<T>),
}

impl<S> Stream<S> {
    /// The stream under the TLS.
    pub fn get_ref(&self) -> &S {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl Stream<tokio::net::TcpStream> {
    /// The peer's address, as a refusal's log line names it (`?` when the
    /// socket no longer knows).
    pub fn peer(&self) -> String {
        self.get_ref()
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string())
    }
}

impl<S, T> AsyncRead for Stream<S, T>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S, T> AsyncWrite for Stream<S, T>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
