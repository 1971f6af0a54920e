//! Whether a NATS server can hold what tallyd acknowledges: pure checks of
//! its monitoring document (`GET /varz`), read by the caller.
//!
//! The rule (docs/replication.md): JetStream must fsync every write before
//! it acknowledges it. By default it does not (it syncs every 2 minutes;
//! Jepsen, nats-io/nats-server#7564); `jetstream { sync_interval: always }`
//! makes it, and exists from v2.10.0. `/varz` says both: `version`, and
//! `jetstream.config.sync_always` (true under `always`; the interval field
//! keeps its default then, so the flag is what counts).

use std::io::{Read, Write};
use std::time::Duration;

use serde::Deserialize;

/// The first release with `sync_interval: always`.
pub const FIRST_SYNC_ALWAYS: (u64, u64, u64) = (2, 10, 0);

/// What tallyd reads of `/varz`.
#[derive(Debug, Deserialize)]
struct Varz {
    #[serde(default)]
    server_name: String,
    version: String,
    #[serde(default)]
    jetstream: Option<JetStream>,
}

#[derive(Debug, Deserialize)]
struct JetStream {
    #[serde(default)]
    config: Option<JetStreamConfig>,
}

#[derive(Debug, Deserialize)]
struct JetStreamConfig {
    #[serde(default)]
    sync_always: bool,
}

/// A server that can hold acknowledged batches: its name and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    pub name: String,
    pub version: String,
}

/// Checks one server's `/varz` document; `Err` says why it cannot hold
/// what tallyd acknowledges, in words an operator can act on.
pub fn varz(body: &[u8]) -> Result<Fit, String> {
    let v: Varz =
        serde_json::from_slice(body).map_err(|e| format!("not a NATS /varz document: {e}"))?;
    let version = parse_version(&v.version)
        .ok_or_else(|| format!("version {:?} is not one tallyd can read", v.version))?;
    if version < FIRST_SYNC_ALWAYS {
        return Err(format!(
            "version {} is older than 2.10.0, the first that can fsync every write (sync_interval: always): it acknowledges writes it has not stored on disk",
            v.version
        ));
    }
    let config = v
        .jetstream
        .and_then(|j| j.config)
        .ok_or("JetStream is not enabled (no jetstream block in its config)")?;
    if !config.sync_always {
        return Err("JetStream does not fsync every write: add `sync_interval: always` to its jetstream block (by default it syncs every 2 minutes and acknowledges writes it has not stored; nats-io/nats-server#7564)".into());
    }
    Ok(Fit {
        name: v.server_name,
        version: v.version,
    })
}

/// Why a server cannot be used (now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Its `/varz` could not be read: it may come up later.
    Unreachable(String),
    /// It answered, and cannot promise what tallyd needs: a configuration
    /// error.
    Unfit(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unreachable(why) | Refused::Unfit(why) => f.write_str(why),
        }
    }
}

/// Reads `<url>/varz` (blocking; `url` is `http://host:port`) and checks
/// it: the server's name and version, or why it cannot be used, with its
/// URL.
pub fn server(url: &str) -> Result<Fit, Refused> {
    let get = || -> Result<Vec<u8>, String> {
        let hostport = url
            .strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/');
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET /varz HTTP/1.0\r\nHost: {hostport}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
        let at = memchr::memmem::find(&resp, b"\r\n\r\n").ok_or("not an HTTP answer: is it the server's monitoring port, `http:` in its config, not its client port?")?;
        Ok(resp.split_off(at + 4))
    };
    let body = get().map_err(|e| Refused::Unreachable(format!("{url}/varz: cannot read it ({e}), so tallyd cannot confirm that the server fsyncs every write")))?;
    varz(&body).map_err(|e| Refused::Unfit(format!("{url}: {e}")))
}

/// `2.10.0`, `v2.12.8`, `2.11.0-RC.1` as (major, minor, patch).
fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let core = text.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(version: &str, jetstream: &str) -> Vec<u8> {
        format!(r#"{{"server_name":"n1","version":"{version}","jetstream":{jetstream}}}"#)
            .into_bytes()
    }

    #[test]
    fn a_server_that_fsyncs_every_write_is_fit() {
        let fit = varz(&doc(
            "2.15.1",
            r#"{"config":{"sync_interval":120000000000,"sync_always":true}}"#,
        ));
        assert_eq!(
            fit,
            Ok(Fit {
                name: "n1".into(),
                version: "2.15.1".into()
            })
        );
    }

    #[test]
    fn a_server_with_the_default_sync_is_refused_saying_what_to_add() {
        let e = varz(&doc(
            "2.12.8",
            r#"{"config":{"sync_interval":120000000000}}"#,
        ))
        .expect_err("default sync");
        assert!(e.contains("sync_interval: always"), "{e}");
    }

    #[test]
    fn a_server_older_than_2_10_is_refused_whatever_it_says() {
        // Debian 12's nats-server is 2.9.10; it has no `always`.
        let e = varz(&doc("2.9.10", r#"{"config":{"sync_always":true}}"#)).expect_err("too old");
        assert!(e.contains("older than 2.10.0"), "{e}");
        assert!(varz(&doc("v2.10.0", r#"{"config":{"sync_always":true}}"#)).is_ok());
        assert!(varz(&doc("2.11.0-RC.1", r#"{"config":{"sync_always":true}}"#)).is_ok());
    }

    #[test]
    fn a_server_without_jetstream_or_a_document_that_is_not_varz_is_refused() {
        let e = varz(br#"{"server_name":"n1","version":"2.12.8"}"#).expect_err("no jetstream");
        assert!(e.contains("JetStream is not enabled"), "{e}");
        assert!(
            varz(b"<html>")
                .expect_err("html")
                .contains("not a NATS /varz")
        );
        assert!(
            varz(&doc("two", "{}"))
                .expect_err("version")
                .contains("\"two\"")
        );
    }
}
