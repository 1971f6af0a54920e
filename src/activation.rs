//! systemd socket activation: listeners passed in `LISTEN_FDS`, named by
//! `FileDescriptorName=` (`LISTEN_FDNAMES`): `statsd-udp`, `statsd-tcp`,
//! `proto-tcp`, `proto-udp`, `otlp-http`, `otlp-grpc`, `dogstatsd-stream` (a Unix stream socket,
//! `ListenStream=/run/datadog/dsd.socket`) and `dogstatsd` (a Unix datagram socket,
//! `ListenDatagram=/run/datadog/dsd.socket`; unnamed, it is told apart by
//! its type too). Sockets with any other name (such as the one
//! systemd gives every socket of `tallyd.socket`) are StatsD, UDP or TCP by
//! their type. A listener that comes this way replaces the
//! configured address; the others are bound as usual. Datagrams the kernel
//! queued on a passed socket while tallyd restarted are not lost.
//!
//! [`capture`] must run before any thread starts (it reads and clears the
//! environment); the listenfd crate turns the descriptors into sockets.

use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;

/// The sockets systemd passed.
#[derive(Debug, Default)]
pub struct Activated {
    pub statsd_udp: Option<UdpSocket>,
    pub statsd_tcp: Option<TcpListener>,
    pub proto_udp: Option<UdpSocket>,
    pub proto_tcp: Option<TcpListener>,
    pub otlp_http: Option<TcpListener>,
    pub otlp_grpc: Option<TcpListener>,
    pub dogstatsd_socket: Option<std::os::unix::net::UnixDatagram>,
    pub dogstatsd_stream_socket: Option<std::os::unix::net::UnixListener>,
}

static CAPTURED: Mutex<Option<Activated>> = Mutex::new(None);

/// Takes the passed sockets from the environment, once, at start.
pub fn capture() -> std::io::Result<()> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut activated = Activated::default();
    for i in 0..fds.len() {
        match names.get(i).map(String::as_str) {
            Some("statsd-udp") => activated.statsd_udp = fds.take_udp_socket(i)?,
            Some("statsd-tcp") => activated.statsd_tcp = fds.take_tcp_listener(i)?,
            Some("proto-udp") => activated.proto_udp = fds.take_udp_socket(i)?,
            Some("proto-tcp") => activated.proto_tcp = fds.take_tcp_listener(i)?,
            Some("otlp-http") => activated.otlp_http = fds.take_tcp_listener(i)?,
            Some("otlp-grpc") => activated.otlp_grpc = fds.take_tcp_listener(i)?,
            Some("dogstatsd") => activated.dogstatsd_socket = fds.take_unix_datagram(i)?,
            Some("dogstatsd-stream") => {
                activated.dogstatsd_stream_socket = fds.take_unix_listener(i)?
            }
            // Unnamed (or named after the unit, as with one tallyd.socket
            // holding both): StatsD, told apart by socket type.
            other => {
                if activated.statsd_udp.is_none()
                    && let Ok(Some(s)) = fds.take_udp_socket(i)
                {
                    activated.statsd_udp = Some(s);
                } else if activated.statsd_tcp.is_none()
                    && let Ok(Some(l)) = fds.take_tcp_listener(i)
                {
                    activated.statsd_tcp = Some(l);
                } else if activated.dogstatsd_socket.is_none()
                    && let Ok(Some(s)) = fds.take_unix_datagram(i)
                {
                    activated.dogstatsd_socket = Some(s);
                } else if activated.dogstatsd_stream_socket.is_none()
                    && let Ok(Some(l)) = fds.take_unix_listener(i)
                {
                    activated.dogstatsd_stream_socket = Some(l);
                } else {
                    tracing::warn!(index = i, name = ?other, "ignoring a passed socket: name it statsd-udp, statsd-tcp, proto-udp, proto-tcp, otlp-http, otlp-grpc, dogstatsd or dogstatsd-stream");
                }
            }
        }
    }
    *CAPTURED.lock().unwrap_or_else(|e| e.into_inner()) = Some(activated);
    Ok(())
}

/// The captured sockets (each can be taken once).
pub fn take() -> Activated {
    CAPTURED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default()
}
