//! DogStatsD over a Unix datagram socket: the transport DogStatsD clients
//! use in containers (`socket_path=` in Datadog's clients, `protocol:
//! 'uds'` in hot-shots), conventionally `/var/run/datadog/dsd.socket`.
//!
//! One blocking thread reads it, exactly as a UDP worker reads its socket
//! ([`super::udp::receive`]): one datagram is one block, appended to the WAL
//! (stream 0, shared with the first UDP worker) and counted under
//! `listener="uds"`. A datagram the WAL cannot take is dropped and counted;
//! a sender on a Unix datagram socket is blocked by the kernel while the
//! socket's receive buffer is full, so nothing is lost there.
//!
//! The socket file: a stale one (left by a crash: a socket nobody is bound
//! to) is replaced; a live one (another process receives on it) or a file
//! that is not a socket is an error naming the path. The file's mode is
//! `statsd.dogstatsd_socket_mode` (senders need write access). It is
//! removed when tallyd stops.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::aggregate::Aggregator;
use crate::telemetry::Telemetry;

/// How often the blocked thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Binds a Unix datagram socket at `path` with file mode `mode`, replacing
/// a stale socket file, and asks for a receive buffer of `recv_buffer`
/// bytes. Blocking file work: call it from a blocking thread.
pub fn bind(path: &Path, mode: u32, recv_buffer: usize) -> io::Result<UnixDatagram> {
    clear_stale(path)?;
    let socket = UnixDatagram::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Err(e) = socket2::SockRef::from(&socket).set_recv_buffer_size(recv_buffer) {
        tracing::warn!(error = %e, "could not set the DogStatsD socket's receive buffer");
    }
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Removes a socket file nobody is bound to; refuses anything else.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; tallyd does not remove it",
        ));
    }
    match UnixDatagram::unbound()?.connect(path) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process receives on this socket",
        )),
        // Nobody is bound to it: left by a crash.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Starts the receive thread; it stops when `stop` is set, after draining
/// what the socket holds (bounded).
pub fn spawn(
    socket: UnixDatagram,
    wal_stream: usize,
    aggregator: Arc<Aggregator>,
    telemetry: Arc<Telemetry>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tallyd-uds".into())
        .spawn(move || {
            super::udp::receive(
                &socket,
                wal_stream,
                &aggregator,
                &telemetry,
                &telemetry.uds,
                &stop,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        crate::ledger::test_dir("uds")
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
        let path = dir().join("dsd.socket");
        let first = bind(&path, 0o622, 1 << 20).expect("bind");
        let err = bind(&path, 0o622, 1 << 20).expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(first); // the file stays, as after a crash
        let second = bind(&path, 0o622, 1 << 20).expect("stale file replaced");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o622);
        let client = UnixDatagram::unbound().expect("client");
        client.send_to(b"x:1|c", &path).expect("send");
        let mut buf = [0u8; 16];
        assert_eq!(second.recv(&mut buf).expect("recv"), 5);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let path = dir().join("notes.txt");
        std::fs::write(&path, b"keep me").expect("write");
        let err = bind(&path, 0o622, 1 << 20).expect_err("not a socket");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
    }
}
