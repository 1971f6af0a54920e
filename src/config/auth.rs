//! `[tls]`, `[auth]` and the forward link's TLS and token, validated: the
//! files are read here (on a thread that may block), so that a bad one is
//! an error naming its field and the runtime reads no file.

use super::{ConfigError, Settings, err};
use crate::auth::tls::{Pem, ServerFiles, ServerTls};
use crate::auth::{Listener, Secret, Tokens};
use crate::sink::tls::TlsFiles;

/// Who may talk to tallyd, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthConfig {
    /// The listeners' certificates, when any listener speaks TLS.
    pub tls: Option<ServerFiles>,
    /// The listeners that speak TLS.
    pub tls_on: Vec<Listener>,
    /// The tokens protobuf TCP and OTLP clients must send (`None`: none is
    /// asked for).
    pub tokens: Option<Tokens>,
}

/// The mode of a secret's file when others may read it (`o+r`).
fn open_to_others(path: &str) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (!path.is_empty() && mode & 0o004 != 0).then_some(mode)
}

/// A PEM file's contents, `None` for an empty path.
pub(super) fn pem(field: &str, path: &str, key: bool) -> Result<Option<Pem>, ConfigError> {
    (!path.is_empty())
        .then(|| Pem::read(path, key).map_err(|e| err(field, e)))
        .transpose()
}

/// A client certificate and its key (`{section}.client_cert` and
/// `{section}.client_key`), which go together.
pub(super) fn client_pair(
    section: &str,
    cert: &str,
    key: &str,
) -> Result<Option<(Pem, Pem)>, ConfigError> {
    let field = format!("{section}.client_cert");
    match (
        pem(&field, cert, false)?,
        pem(&format!("{section}.client_key"), key, true)?,
    ) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        _ => Err(err(&field, "client_cert and client_key go together")),
    }
}

impl Settings {
    /// `[tls]` and `[auth]`; `warnings` gets what is valid but unwise.
    pub(super) fn auth_config(
        &self,
        warnings: &mut Vec<String>,
    ) -> Result<AuthConfig, ConfigError> {
        let t = &self.tls;
        let mut tls_on = Vec::new();
        for name in &t.listeners {
            let l = Listener::parse(name).ok_or_else(|| {
                let names: Vec<&str> = Listener::ALL.iter().map(|l| l.name()).collect();
                err(
                    "tls.listeners",
                    format!("{name:?} is not one of {}", names.join(", ")),
                )
            })?;
            if !tls_on.contains(&l) {
                tls_on.push(l);
            }
            let addr = match l {
                Listener::StatsdTcp => &self.statsd.tcp,
                Listener::ProtoTcp => &self.proto.tcp,
                Listener::OtlpHttp => &self.otlp.http,
                Listener::OtlpGrpc => &self.otlp.grpc,
                Listener::Admin => &self.admin,
            };
            if matches!(addr.as_str(), "" | "off") {
                warnings.push(format!("tls.listeners names {name:?}, which is off"));
            }
        }
        for (field, path) in [
            ("tls.key_file", &t.key_file),
            ("auth.token_file", &self.auth.token_file),
            ("forward.token_file", &self.forward.token_file),
            ("forward.client_key", &self.forward.client_key),
        ] {
            if let Some(mode) = open_to_others(path) {
                warnings.push(format!(
                    "{field} ({path}) is readable by others (mode {mode:o}): chmod 600 it, or 640 with tallyd's group"
                ));
            }
        }
        let cert = pem("tls.cert_file", &t.cert_file, false)?;
        let key = pem("tls.key_file", &t.key_file, true)?;
        let client_ca = pem("tls.client_ca_file", &t.client_ca_file, false)?;
        let tls = match (cert, key) {
            _ if tls_on.is_empty() => {
                if client_ca.is_some() {
                    return Err(err(
                        "tls.client_ca_file",
                        "set, but no listener speaks TLS (tls.listeners is empty)",
                    ));
                }
                if !t.cert_file.is_empty() {
                    warnings.push(
                        "tls.cert_file is set but tls.listeners is empty: every listener is plain"
                            .into(),
                    );
                }
                None
            }
            (Some(cert), Some(key)) => {
                let files = ServerFiles {
                    cert,
                    key,
                    client_ca,
                };
                // rustls must take them together (a key of another
                // certificate, a CA it cannot use).
                ServerTls::new(&files).map_err(|e| match e.as_str() {
                    crate::auth::tls::KEY_MISMATCH => err("tls.key_file", e),
                    _ => err("tls.cert_file", e),
                })?;
                Some(files)
            }
            (None, _) => {
                return Err(err(
                    "tls.cert_file",
                    "tls.listeners names listeners, so a certificate is needed",
                ));
            }
            (_, None) => {
                return Err(err(
                    "tls.key_file",
                    "tls.listeners names listeners, so a key is needed",
                ));
            }
        };
        let mut tokens = match &self.auth.token_file {
            p if p.is_empty() => None,
            p => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| err("auth.token_file", format!("cannot read {p:?}: {e}")))?;
                Some(
                    Tokens::parse(&text)
                        .ok_or_else(|| err("auth.token_file", format!("{p:?} holds no token")))?,
                )
            }
        };
        if let Ok(token) = std::env::var("TALLYD_INGEST_TOKEN")
            && !token.trim().is_empty()
        {
            tokens = Some(match tokens {
                Some(t) => t.with(token.trim()),
                None => Tokens::parse(token.trim()).unwrap_or_else(|| Tokens::one(token.trim())),
            });
        }
        if tokens.is_some() {
            self.token_warnings(&tls_on, warnings);
        }
        let f = &self.forward;
        let forward_token = !f.token_file.is_empty()
            || std::env::var("TALLYD_FORWARD_TOKEN").is_ok_and(|t| !t.trim().is_empty());
        let remote = |u: &String| {
            let host = u.rsplit_once(':').map_or(u.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            !(host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()))
        };
        if forward_token && !f.tls && f.upstreams.iter().any(remote) {
            warnings.push("forward.token_file is set but forward.tls is false: the token crosses the network to the upstreams in clear".into());
        }
        Ok(AuthConfig {
            tls,
            tls_on,
            tokens,
        })
    }

    /// Where a token would not protect what it is meant to.
    fn token_warnings(&self, tls_on: &[Listener], warnings: &mut Vec<String>) {
        if !matches!(self.proto.udp.as_str(), "" | "off") {
            warnings.push(format!(
                "proto.udp ({}) takes batches without a token: UDP has no connection to authenticate (set proto.udp = \"off\" where the network is not trusted)",
                self.proto.udp
            ));
        }
        let plain = [
            (Listener::ProtoTcp, &self.proto.tcp),
            (Listener::OtlpHttp, &self.otlp.http),
            (Listener::OtlpGrpc, &self.otlp.grpc),
        ];
        for (l, addr) in plain {
            let remote = addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback());
            if remote && !tls_on.contains(&l) {
                warnings.push(format!(
                    "{} ({addr}) asks for a token but does not speak TLS: the token crosses the network in clear (add {:?} to tls.listeners)",
                    l.name(),
                    l.name()
                ));
            }
        }
    }

    /// The forward link's TLS files and token.
    pub(super) fn forward_auth(&self) -> Result<(Option<TlsFiles>, Option<Secret>), ConfigError> {
        let f = &self.forward;
        let client = client_pair("forward", &f.client_cert, &f.client_key)?;
        let ca = pem("forward.ca_file", &f.ca_file, false)?;
        let tls = if f.tls {
            let system = match ca {
                Some(_) => Default::default(),
                None => crate::sink::tls::SystemRoots::load(),
            };
            let files = TlsFiles { ca, system, client };
            crate::sink::tls::client_config(&files).map_err(|e| err("forward.ca_file", e))?;
            Some(files)
        } else if ca.is_some() || client.is_some() {
            return Err(err(
                "forward.tls",
                "forward.ca_file or forward.client_cert is set, but forward.tls is false",
            ));
        } else {
            None
        };
        let token = match std::env::var("TALLYD_FORWARD_TOKEN") {
            Ok(t) if !t.trim().is_empty() => Some(Secret::new(t.trim())),
            _ if f.token_file.is_empty() => None,
            _ => {
                let p = &f.token_file;
                let text = std::fs::read_to_string(p)
                    .map_err(|e| err("forward.token_file", format!("cannot read {p:?}: {e}")))?;
                let first = crate::auth::token_lines(&text).next();
                Some(Secret::new(first.ok_or_else(|| {
                    err("forward.token_file", format!("{p:?} holds no token"))
                })?))
            }
        };
        Ok((tls, token))
    }
}
