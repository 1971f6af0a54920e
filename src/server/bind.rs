//! Start-up phase 1: every listener bound, or taken from systemd's socket
//! activation (a taken port fails fast, before any data is touched).

use super::*;

/// Every socket tallyd listens on, bound (or passed by systemd).
pub(super) struct Listeners {
    pub(super) udp_sockets: Vec<std::net::UdpSocket>,
    pub(super) tcp_listener: Option<TcpListener>,
    pub(super) proto_tcp_listener: Option<TcpListener>,
    pub(super) otlp_http_listener: Option<TcpListener>,
    pub(super) otlp_grpc_listener: Option<TcpListener>,
    pub(super) proto_udp_sockets: Vec<std::net::UdpSocket>,
    /// The DogStatsD Unix datagram socket, and its path when tallyd made it
    /// (removed at stop).
    pub(super) uds_socket: Option<(std::os::unix::net::UnixDatagram, Option<std::path::PathBuf>)>,
    /// The DogStatsD Unix stream socket, likewise.
    pub(super) uds_stream: Option<(tokio::net::UnixListener, Option<std::path::PathBuf>)>,
    pub(super) admin_listener: Option<TcpListener>,
}

/// Start-up phase 1: binds every listener.
pub(super) async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let bind_err = |what, addr| move |source| StartError::Bind { what, addr, source };
    let activated = crate::activation::take();
    let activated_addr = |what: &'static str| {
        move |source| StartError::Bind {
            what,
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        }
    };
    let udp_sockets = match (activated.statsd_udp, config.statsd_udp) {
        // One passed socket, read by every UDP worker.
        (Some(socket), _) => udp::share(socket, config.udp_workers)
            .map_err(activated_addr("StatsD UDP (passed by systemd)"))?,
        (None, Some(addr)) => udp::bind(addr, config.udp_workers, config.udp_recv_buffer)
            .map_err(bind_err("StatsD UDP", addr))?,
        (None, None) => Vec::new(),
    };
    let tcp_listener = match (activated.statsd_tcp, config.statsd_tcp) {
        (Some(l), _) => {
            Some(from_std(l).map_err(activated_addr("StatsD TCP (passed by systemd)"))?)
        }
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("StatsD TCP", addr))?,
        ),
        (None, None) => None,
    };
    let proto_tcp_listener = match (activated.proto_tcp, config.proto.tcp) {
        (Some(l), _) => {
            Some(from_std(l).map_err(activated_addr("protobuf TCP (passed by systemd)"))?)
        }
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("protobuf TCP", addr))?,
        ),
        (None, None) => None,
    };
    let otlp_http_listener = match (activated.otlp_http, config.otlp.http) {
        (Some(l), _) => Some(from_std(l).map_err(activated_addr("OTLP/HTTP (passed by systemd)"))?),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("OTLP/HTTP", addr))?,
        ),
        (None, None) => None,
    };
    let otlp_grpc_listener = match (activated.otlp_grpc, config.otlp.grpc) {
        (Some(l), _) => Some(from_std(l).map_err(activated_addr("OTLP/gRPC (passed by systemd)"))?),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("OTLP/gRPC", addr))?,
        ),
        (None, None) => None,
    };
    // The StatsD path's receive machinery: its workers and receive buffer.
    let proto_udp_sockets = match (activated.proto_udp, config.proto.udp) {
        (Some(s), _) => udp::share(s, config.udp_workers)
            .map_err(activated_addr("protobuf UDP (passed by systemd)"))?,
        (None, Some(addr)) => udp::bind(addr, config.udp_workers, config.udp_recv_buffer)
            .map_err(bind_err("protobuf UDP", addr))?,
        (None, None) => Vec::new(),
    };
    let uds_socket = match (activated.dogstatsd_socket, &config.dogstatsd_socket) {
        (Some(s), _) => {
            s.set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .map_err(activated_addr("DogStatsD socket (passed by systemd)"))?;
            Some((s, None))
        }
        (None, Some(path)) => {
            let (p, mode, buffer) = (
                path.clone(),
                config.dogstatsd_socket_mode,
                config.udp_recv_buffer,
            );
            let socket =
                tokio::task::spawn_blocking(move || crate::ingest::uds::bind(&p, mode, buffer))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|source| StartError::BindPath {
                        what: "the DogStatsD socket",
                        path: path.display().to_string(),
                        source,
                    })?;
            Some((socket, Some(path.clone())))
        }
        (None, None) => None,
    };
    let uds_stream = match (
        activated.dogstatsd_stream_socket,
        &config.dogstatsd_stream_socket,
    ) {
        (Some(l), _) => {
            let l = l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(l))
                .map_err(activated_addr(
                    "DogStatsD stream socket (passed by systemd)",
                ))?;
            Some((l, None))
        }
        (None, Some(path)) => {
            let (p, mode) = (path.clone(), config.dogstatsd_socket_mode);
            let listener =
                tokio::task::spawn_blocking(move || crate::ingest::uds::bind_stream(&p, mode))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .and_then(tokio::net::UnixListener::from_std)
                    .map_err(|source| StartError::BindPath {
                        what: "the DogStatsD stream socket",
                        path: path.display().to_string(),
                        source,
                    })?;
            Some((listener, Some(path.clone())))
        }
        (None, None) => None,
    };
    let admin_listener = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(bind_err("admin", addr))?,
        ),
        None => None,
    };
    Ok(Listeners {
        udp_sockets,
        tcp_listener,
        proto_tcp_listener,
        otlp_http_listener,
        otlp_grpc_listener,
        proto_udp_sockets,
        uds_socket,
        uds_stream,
        admin_listener,
    })
}
