//! DogStatsD over Unix sockets: the transport DogStatsD clients use in
//! containers (`socket_path=` in Datadog's clients, `protocol: 'uds'` in
//! hot-shots), conventionally `/var/run/datadog/dsd.socket`.
//!
//! # Datagrams
//!
//! One blocking thread reads it, exactly as a UDP worker reads its socket
//! ([`super::udp::receive`]): one datagram is one block, appended to the WAL
//! (stream 0, shared with the first UDP worker), datagrams found queued
//! together are applied together, and they are counted under
//! `listener="uds"`. A datagram the WAL cannot take is dropped and counted;
//! a sender on a Unix datagram socket is blocked by the kernel while the
//! socket's receive buffer is full, so nothing is lost there.
//!
//! # Streams (`unixstream`)
//!
//! DogStatsD's stream framing: each payload (what a datagram would hold)
//! is prefixed by its length, 4 bytes little-endian. Connections are served
//! like StatsD TCP connections ([`super::serve_connections`]: the same
//! connection limit, idle timeout and WAL streams, backpressure while the
//! WAL is full); a frame longer than `statsd.tcp_max_line` closes its
//! connection and is counted (`tallyd_dropped_total{reason=
//! "uds_frame_too_large"}`). At a stop, a connection applies the whole
//! frames the kernel already holds (bounded), then closes.
//!
//! # The socket files
//!
//! A stale one (left by a crash: a socket nobody is bound
//! to) is replaced; a live one (another process receives on it) or a file
//! that is not a socket is an error naming the path. The file's mode is
//! `statsd.dogstatsd_socket_mode` (senders need write access). It is
//! removed when tallyd stops.

use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::record::Recorder;
use crate::aggregate::Scratch;
use crate::auth::tls::Stream;
use crate::telemetry::{BlockStats, Telemetry};

/// How often the blocked thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Binds a Unix datagram socket at `path` with file mode `mode`, replacing
/// a stale socket file, and asks for a receive buffer of `recv_buffer`
/// bytes. Blocking file work: call it from a blocking thread.
pub fn bind(path: &Path, mode: u32, recv_buffer: usize) -> io::Result<UnixDatagram> {
    clear_stale(path, |p| UnixDatagram::unbound()?.connect(p))?;
    let socket = UnixDatagram::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Err(e) = super::udp::set_receive_buffer(&socket, recv_buffer) {
        tracing::warn!(error = %e, "could not set the DogStatsD socket's receive buffer");
    }
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Binds a Unix stream socket at `path` with file mode `mode`, replacing a
/// stale socket file. Blocking file work: call it from a blocking thread.
pub fn bind_stream(path: &Path, mode: u32) -> io::Result<std::os::unix::net::UnixListener> {
    clear_stale(path, |p| {
        std::os::unix::net::UnixStream::connect(p).map(drop)
    })?;
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Removes a socket file nobody is bound to (`probe` connecting to it is
/// refused); refuses anything else.
fn clear_stale(path: &Path, probe: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
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
    match probe(path) {
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
    recorder: Recorder,
    telemetry: Arc<Telemetry>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tallyd-uds".into())
        .spawn(move || {
            let ingest =
                super::udp::statsd_ingest(wal_stream, recorder, Arc::clone(&telemetry), |t| &t.uds);
            super::udp::receive(
                &socket,
                wal_stream,
                &telemetry,
                &stop,
                super::udp::Role::Alone,
                ingest,
            )
        })
}

/// Reads a connection gets at a stop to apply what the kernel holds.
const DRAIN_READS: usize = 256;
/// How long a connection waits before it retries a block the WAL refused.
const WAL_RETRY: Duration = Duration::from_millis(10);

/// DogStatsD over a Unix stream socket, length-prefixed frames.
#[derive(Clone)]
pub struct StreamIngest {
    pub recorder: Recorder,
    pub telemetry: Arc<Telemetry>,
    /// Longest frame (`statsd.tcp_max_line`).
    pub max_frame: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub wal_streams: std::ops::Range<usize>,
}

impl StreamIngest {
    /// Accepts connections until `stop` turns true, then waits for every
    /// connection to apply what it has already received.
    pub async fn serve(self, listener: tokio::net::UnixListener, stop: watch::Receiver<bool>) {
        let (max, streams, telemetry) = (
            self.max_connections,
            self.wal_streams.clone(),
            Arc::clone(&self.telemetry),
        );
        super::serve_connections(
            listener,
            max,
            streams,
            Some(telemetry),
            // A Unix socket: its file mode says who may connect; no TLS.
            None,
            stop,
            move |stream, wal_stream, stop| {
                let this = self.clone();
                async move {
                    if let Stream::Plain(stream) = stream {
                        this.connection(stream, wal_stream, stop).await;
                    }
                }
            },
        )
        .await;
    }

    async fn connection(
        &self,
        mut stream: tokio::net::UnixStream,
        wal_stream: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut frames = Frames::new(self.max_frame);
        let mut buf = vec![0u8; 64 * 1024];
        let mut scratch = Scratch::for_stream(wal_stream);
        loop {
            if !self.apply(&mut frames, &mut scratch, &stop).await {
                return;
            }
            let n = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, stream.read(&mut buf)) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        self.telemetry.connections_idle_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                },
                _ = stop.changed() => {
                    for _ in 0..DRAIN_READS {
                        match stream.try_read(&mut buf) {
                            Ok(n) if n > 0 => frames.push(&buf[..n]),
                            _ => break,
                        }
                    }
                    self.apply(&mut frames, &mut scratch, &stop).await;
                    return;
                }
            };
            match n {
                Ok(0) | Err(_) => {
                    self.apply(&mut frames, &mut scratch, &stop).await;
                    return;
                }
                Ok(n) => frames.push(&buf[..n]),
            }
        }
    }

    /// Applies every whole frame; waits while the WAL refuses one (not
    /// past a stop). False when the connection must close (a frame over
    /// the limit, or a stop while the WAL is full).
    async fn apply(
        &self,
        frames: &mut Frames,
        scratch: &mut Scratch,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        loop {
            match frames.next() {
                Frame::Whole(frame) => {
                    let mut stats = BlockStats::default();
                    let payload = &frames.buf[frame.clone()];
                    match self.recorder.block(payload, scratch, &mut stats) {
                        Ok(()) => {
                            frames.take(frame);
                            self.telemetry.record_block(&self.telemetry.uds, &stats);
                        }
                        Err(e) => {
                            // The same frame comes next.
                            self.telemetry.wal_refused(e);
                            if *stop.borrow() {
                                return false;
                            }
                            tokio::time::sleep(WAL_RETRY).await;
                        }
                    }
                }
                Frame::Partial => return true,
                Frame::TooLarge => {
                    self.telemetry
                        .uds_frames_too_large
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return false;
                }
            }
        }
    }
}

/// What [`Frames::next`] found.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// A whole frame's payload: its bytes in [`Frames::buf`].
    Whole(Range<usize>),
    /// More bytes are needed.
    Partial,
    /// A length over the limit: the stream cannot be followed further.
    TooLarge,
}

/// Cuts a byte stream into length-prefixed frames (pure; no I/O), read in
/// place. Empty frames are skipped.
struct Frames {
    buf: Vec<u8>,
    /// Bytes of `buf` already taken or skipped (compacted once per push, so
    /// that many small frames cost no more than their bytes).
    at: usize,
    max: usize,
}

impl Frames {
    fn new(max: usize) -> Frames {
        Frames {
            buf: Vec::new(),
            at: 0,
            max,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.drain(..self.at);
        self.at = 0;
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, left in `buf` until [`Frames::take`]: a frame
    /// the WAL refused comes again.
    fn next(&mut self) -> Frame {
        loop {
            let rest = &self.buf[self.at..];
            let Some(head) = rest.first_chunk::<4>() else {
                return Frame::Partial;
            };
            let len = u32::from_le_bytes(*head) as usize;
            if len > self.max {
                return Frame::TooLarge;
            }
            if rest.len() - 4 < len {
                return Frame::Partial;
            }
            let start = self.at + 4;
            if len == 0 {
                self.at = start;
                continue;
            }
            return Frame::Whole(start..start + len);
        }
    }

    /// Moves past `frame`, the last [`Frames::next`] gave (applied).
    fn take(&mut self, frame: Range<usize>) {
        debug_assert!(frame.start >= self.at + 4 && frame.end <= self.buf.len());
        self.at = frame.end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> crate::test_dir::TestDir {
        crate::test_dir::test_dir("uds")
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
        let dir = dir();
        let path = dir.join("dsd.socket");
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
    fn frames_are_cut_by_their_length_prefix_across_reads() {
        let mut f = Frames::new(16);
        let mut data = Vec::new();
        for payload in [&b"a:1|c"[..], b"", b"b:2|c\nc:3|c"] {
            data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            data.extend_from_slice(payload);
        }
        let (one, two) = data.split_at(7);
        f.push(one);
        assert_eq!(f.next(), Frame::Partial);
        f.push(two);
        let whole = |f: &mut Frames| match f.next() {
            Frame::Whole(r) => (f.buf[r.clone()].to_vec(), r),
            other => panic!("{other:?}"),
        };
        let (first, r) = whole(&mut f);
        assert_eq!(first, b"a:1|c");
        assert_eq!(
            whole(&mut f).0,
            first,
            "not taken: a refused frame comes again"
        );
        f.take(r);
        let (third, r) = whole(&mut f);
        assert_eq!(third, b"b:2|c\nc:3|c");
        f.take(r);
        assert_eq!(f.next(), Frame::Partial);
        f.push(&17u32.to_le_bytes());
        assert_eq!(f.next(), Frame::TooLarge);
    }

    #[test]
    fn a_stale_stream_socket_file_is_replaced() {
        let dir = dir();
        let path = dir.join("dsd-stream.socket");
        let first = bind_stream(&path, 0o622).expect("bind");
        assert_eq!(
            bind_stream(&path, 0o622).expect_err("in use").kind(),
            io::ErrorKind::AddrInUse
        );
        drop(first);
        bind_stream(&path, 0o622).expect("stale file replaced");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = dir();
        let path = dir.join("notes.txt");
        std::fs::write(&path, b"keep me").expect("write");
        let err = bind(&path, 0o622, 1 << 20).expect_err("not a socket");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
    }
}
