//! Who may talk to tallyd: TLS with optional client certificates on the
//! stream listeners ([`tls`]), and bearer tokens for the acknowledged
//! sources and the admin API ([`Tokens`]). Plain UDP takes what arrives,
//! as every StatsD server does (the README's "Security" says what to use
//! where the network is not trusted).
//!
//! Nothing here reads a file at run time: the files are read (by
//! [`tls::Pem::read`]) when the configuration is validated, on a thread
//! that may block. A refusal is one of [`Refusal`]'s reasons, counted per
//! [`Listener`] by telemetry.

pub mod tls;

use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;

/// The listeners that can speak TLS or ask for a token (`tls.listeners`,
/// and the `listener` label of `tallyd_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// StatsD (and DogStatsD) lines over TCP.
    StatsdTcp,
    /// Protobuf batches over TCP, acknowledged.
    ProtoTcp,
    OtlpHttp,
    OtlpGrpc,
    Admin,
}

impl Listener {
    pub const ALL: [Listener; 5] = [
        Listener::StatsdTcp,
        Listener::ProtoTcp,
        Listener::OtlpHttp,
        Listener::OtlpGrpc,
        Listener::Admin,
    ];

    /// Its name in the config and in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Listener::StatsdTcp => "statsd_tcp",
            Listener::ProtoTcp => "proto_tcp",
            Listener::OtlpHttp => "otlp_http",
            Listener::OtlpGrpc => "otlp_grpc",
            Listener::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Listener> {
        Listener::ALL.into_iter().find(|l| l.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a connection or a request was refused (the `reason` label of
/// `tallyd_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed (not TLS, no common version or cipher,
    /// timed out) for a reason other than the client's certificate.
    TlsHandshake,
    /// mTLS: the client showed no certificate.
    NoClientCertificate,
    /// mTLS: the client's certificate is not signed by `client_ca_file`,
    /// or has expired.
    BadClientCertificate,
    /// A token is required and none was sent.
    TokenMissing,
    /// The token sent is not one of those configured.
    TokenWrong,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::TlsHandshake,
        Refusal::NoClientCertificate,
        Refusal::BadClientCertificate,
        Refusal::TokenMissing,
        Refusal::TokenWrong,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::BadClientCertificate => "bad_client_certificate",
            Refusal::TokenMissing => "token_missing",
            Refusal::TokenWrong => "token_wrong",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The bearer tokens a listener accepts: any one of them, so that a new
/// token can be added before the old one is removed (a rotation without a
/// refused client). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens(Vec<Vec<u8>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

impl Tokens {
    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: a `Tokens` holds at least one.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One token.
    pub fn one(token: &str) -> Tokens {
        Tokens(vec![token.as_bytes().to_vec()])
    }

    /// These and `token`.
    pub fn with(mut self, token: &str) -> Tokens {
        self.0.push(token.as_bytes().to_vec());
        self
    }

    /// The tokens of a token file's text: one per line, blank lines and
    /// lines starting with `#` skipped, surrounding spaces trimmed. `None`
    /// when it holds none.
    pub fn parse(text: &str) -> Option<Tokens> {
        let tokens: Vec<Vec<u8>> = token_lines(text).map(|l| l.as_bytes().to_vec()).collect();
        (!tokens.is_empty()).then_some(Tokens(tokens))
    }

    /// Whether `given` is one of the tokens, compared in constant time
    /// (`subtle`: the time depends on the lengths only, and every token is
    /// compared).
    pub fn accepts(&self, given: &[u8]) -> bool {
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |any, t| any | t.ct_eq(given))
            .into()
    }

    /// The token of an `Authorization: Bearer <token>` header value,
    /// checked: `Err(TokenMissing)` without one.
    pub fn check_bearer(&self, header: Option<&[u8]>) -> Result<(), Refusal> {
        let token = header
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match token {
            None => Err(Refusal::TokenMissing),
            Some(t) if self.accepts(t.as_bytes()) => Ok(()),
            Some(_) => Err(Refusal::TokenWrong),
        }
    }
}

/// The listeners' TLS and the ingest tokens: one, shared by every
/// listener; a reload swaps the certificates and the tokens in place.
#[derive(Debug, Default)]
pub struct Guard {
    tls: Option<tls::ServerTls>,
    tls_on: Vec<Listener>,
    tokens: RwLock<Option<Arc<Tokens>>>,
}

impl Guard {
    /// TLS with `files` on `tls_on`, and `tokens` asked of protobuf TCP
    /// and OTLP clients.
    pub fn new(
        files: Option<&tls::ServerFiles>,
        tls_on: &[Listener],
        tokens: Option<Tokens>,
    ) -> Result<Guard, String> {
        Ok(Guard {
            tls: files.map(tls::ServerTls::new).transpose()?,
            tls_on: tls_on.to_vec(),
            tokens: RwLock::new(tokens.map(Arc::new)),
        })
    }

    /// The TLS `listener` speaks, if it does.
    pub fn tls(&self, listener: Listener) -> Option<&tls::ServerTls> {
        self.tls
            .as_ref()
            .filter(|_| self.tls_on.contains(&listener))
    }

    /// The tokens asked for now (`None`: none is).
    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A reload: new certificates for the connections accepted from now
    /// on (which listeners speak TLS changes only with a restart), and the
    /// new tokens for every request from now on. On an error nothing
    /// changes.
    pub fn reload(
        &self,
        files: Option<&tls::ServerFiles>,
        tokens: Option<Tokens>,
    ) -> Result<(), String> {
        if let (Some(tls), Some(files)) = (&self.tls, files) {
            tls.replace(files)?;
        }
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens.map(Arc::new);
        Ok(())
    }
}

/// The tokens of a token file's text: its lines, trimmed, without blank
/// lines and `#` comments. A file that tallyd sends from uses the first.
pub fn token_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// A token tallyd sends (the forward link's); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    pub fn new(s: &str) -> Secret {
        Secret(s.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_holds_one_token_per_line_and_any_is_accepted() {
        let t = Tokens::parse("# rotated 2026-12\nnew-token\n\n  old-token  \n").expect("tokens");
        assert!(t.accepts(b"new-token") && t.accepts(b"old-token"));
        assert!(!t.accepts(b"new-toke") && !t.accepts(b"") && !t.accepts(b"# rotated 2026-12"));
        assert_eq!(Tokens::parse("# none\n\n"), None);
        assert_eq!(format!("{t:?}"), "Tokens(2 redacted)");
    }

    #[test]
    fn a_bearer_header_is_missing_wrong_or_accepted() {
        let t = Tokens::parse("s3cret").expect("tokens");
        assert_eq!(t.check_bearer(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(t.check_bearer(Some(b"bearer  s3cret ")), Ok(()));
        assert_eq!(
            t.check_bearer(Some(b"Bearer nope")),
            Err(Refusal::TokenWrong)
        );
        assert_eq!(
            t.check_bearer(Some(b"Basic s3cret")),
            Err(Refusal::TokenMissing)
        );
        assert_eq!(t.check_bearer(None), Err(Refusal::TokenMissing));
        assert_eq!(t.check_bearer(Some(b"\xff")), Err(Refusal::TokenMissing));
    }

    #[test]
    fn listener_names_round_trip() {
        for l in Listener::ALL {
            assert_eq!(Listener::parse(l.name()), Some(l));
        }
        assert_eq!(Listener::parse("statsd_udp"), None);
    }
}
