//! StatsD over UDP: one socket read by several threads, one `recv` per
//! datagram. The first thread (the lead) waits on the socket; the others
//! (helpers) wait until the lead finds a backlog, then take what is queued
//! without waiting, and wait again once the socket is empty (see [`Crew`]).
//! A thread never waits for anything but the socket or the lead, so a
//! flush never slows the receive path. A thread that finds more datagrams
//! queued takes them too (up to a batch) and applies them together.
//!
//! Each helper appends to its own WAL stream, the lead to all the UDP
//! streams in turn (a batch each), so that it has the room of all of them.
//! A datagram the WAL cannot take (ring full) is dropped and counted: UDP
//! has no way to push back.
//!
//! On stop, helpers return and the lead drains what the socket has already
//! queued (bounded). The kernel's own drop counter for these sockets is
//! read from `/proc/net/udp{,6}` by [`kernel_drops`]. A datagram longer
//! than 65,535 bytes (only a Unix socket carries one) is dropped whole and
//! counted.

use crate::lock;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::net::RecvFlags;
use socket2::{Domain, Protocol, Socket, Type};

use super::record::Recorder;
use crate::aggregate::Scratch;
use crate::telemetry::{BlockStats, ListenerStats, Telemetry};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// A worker applies at most this many datagrams together...
const BATCH_DATAGRAMS: usize = 64;
/// ... and takes no more once it holds this many bytes.
const BATCH_BYTES: usize = 64 * 1024;
/// How often a blocked thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// How often the first helper looks at the socket uncalled (the others every
/// [`POLL`], so that an idle host with many cores wakes little): a lead stalled
/// (by the flush's or ClickHouse's CPU, a slow sync) leaves a backlog of at
/// most about this long (20,000 lines at 2 M/s; the default 8 MiB receive
/// buffer holds about 70 ms of it).
const HELPER_POLL: Duration = Duration::from_millis(10);
/// Datagrams a thread drains from its socket after stop, at most.
const DRAIN_LIMIT: usize = 1 << 16;

/// Binds one socket to `addr` with a receive buffer of `recv_buffer` bytes,
/// and returns it `workers` times (clones of one descriptor). Every worker
/// reads the same queue: under a backlog, one heavy sender (one flow) is
/// spread over all workers, where per-worker `SO_REUSEPORT` sockets would
/// pin it to one. Behind a lead stalled without a call (preempted, a slow
/// sync), a helper looks every [`HELPER_POLL`]; the receive buffer holds the
/// queue meanwhile. Socket activation passes one socket the same way.
pub fn bind(addr: SocketAddr, workers: usize, recv_buffer: usize) -> io::Result<Vec<UdpSocket>> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A smaller buffer is not fatal, only lossier under bursts.
    if let Err(e) = set_receive_buffer(&s, recv_buffer) {
        tracing::warn!(error = %e, "could not set the UDP receive buffer");
    }
    s.bind(&addr.into())?;
    share(s.into(), workers)
}

/// Asks for a receive buffer of `bytes` on a datagram socket. With
/// CAP_NET_ADMIN (root; the packaged unit has none, and gets its buffer
/// from tallyd.socket instead) `SO_RCVBUFFORCE` gives the size asked for,
/// as systemd does for a socket unit; else `SO_RCVBUF`, which the kernel
/// caps at `net.core.rmem_max`.
pub(crate) fn set_receive_buffer(socket: impl AsFd, bytes: usize) -> io::Result<()> {
    rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, bytes)
        .or_else(|_| rustix::net::sockopt::set_socket_recv_buffer_size(&socket, bytes))
        .map_err(io::Error::from)
}

/// `socket` once per worker (clones of one descriptor, see [`bind`]), with
/// the read timeout that lets a blocked worker see the stop flag (a socket
/// option: the clones share it).
pub fn share(socket: UdpSocket, workers: usize) -> io::Result<Vec<UdpSocket>> {
    socket.set_read_timeout(Some(POLL))?;
    let mut sockets = Vec::with_capacity(workers.max(1));
    for _ in 1..workers.max(1) {
        sockets.push(socket.try_clone()?);
    }
    sockets.push(socket);
    Ok(sockets)
}

/// The receive buffer the kernel gave the first socket (`SO_RCVBUF`: on
/// Linux twice the bytes granted, the other half being its bookkeeping),
/// with a warning when it is smaller than `wanted`, the configured
/// `statsd.udp_recv_buffer`.
pub fn receive_buffer(sockets: &[UdpSocket], wanted: usize) -> Option<usize> {
    let got = socket2::SockRef::from(sockets.first()?)
        .recv_buffer_size()
        .ok()?;
    if got < wanted {
        tracing::warn!(
            wanted,
            got,
            "the UDP receive buffer is smaller than configured: the kernel caps it at net.core.rmem_max (the package raises it; see README, Running on every host)"
        );
    }
    Some(got)
}

/// Where the UDP workers after the first wait: the first (the lead) always
/// waits on the socket; the others (helpers) wait here until the lead finds a
/// backlog (a full batch queued), then take what the socket holds without
/// waiting, and come back when it is empty (one looks every [`HELPER_POLL`]
/// uncalled). Below the rate one worker keeps up with, one thread stays busy:
/// at 10k mixed keys and 2 M lines/s the lead took about 40 datagrams per
/// wake-up, where two workers sharing the socket each took about six and passed
/// the map's entries between their cores, for 7-10 % less CPU per line (see the
/// README's Performance section).
pub(crate) struct Crew {
    /// A call no helper has taken yet (calls made meanwhile are one).
    call: Mutex<bool>,
    called: Condvar,
}

impl Crew {
    fn new() -> Crew {
        Crew {
            call: Mutex::new(false),
            called: Condvar::new(),
        }
    }

    /// Wakes a helper (the lead found a backlog).
    fn call(&self) {
        *lock(&self.call) = true;
        self.called.notify_one();
    }

    /// Waits for a call, at most `timeout`, and takes it; whether one
    /// came. A helper looks at the socket after a timeout too, so a backlog
    /// behind a lead that stalls (preempted, a slow WAL sync) waits at most
    /// that long, and a stop is seen.
    fn wait(&self, timeout: Duration) -> bool {
        let mut call = lock(&self.call);
        if !*call {
            call = self
                .called
                .wait_timeout(call, timeout)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        std::mem::take(&mut *call)
    }
}

/// A worker's part (see [`Crew`]).
#[derive(Clone)]
pub(crate) enum Role<'a> {
    /// The only worker on its socket.
    Alone,
    /// Appends to the WAL streams `streams` in turn.
    Lead {
        crew: &'a Crew,
        streams: Range<usize>,
    },
    /// Looks at the socket uncalled every so often.
    Helper(&'a Crew, Duration),
}

/// Starts one StatsD receive thread per socket; thread `i` appends to WAL
/// stream `i % wal_streams`. Thread 0 leads, the others help (see
/// [`Crew`]). They stop when `stop` is set.
pub fn spawn(
    sockets: Vec<UdpSocket>,
    wal_streams: usize,
    recorder: Recorder,
    telemetry: Arc<Telemetry>,
    stop: Arc<AtomicBool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let streams = 0..wal_streams.max(1);
    spawn_with(sockets, streams, "tallyd-udp", &telemetry, stop, |stream| {
        statsd_ingest(stream, recorder.clone(), Arc::clone(&telemetry), |t| &t.udp)
    })
}

/// What a receive thread does with each batch of datagrams it took
/// (`(batch, the WAL stream for it)`), made for the thread's own stream.
pub(crate) trait Ingest: FnMut(&mut Batch, usize) + Send + 'static {}
impl<F: FnMut(&mut Batch, usize) + Send + 'static> Ingest for F {}

/// The StatsD ingest of a receive thread on WAL stream `wal_stream`,
/// counted in the `listener` of `telemetry`.
pub(crate) fn statsd_ingest(
    wal_stream: usize,
    recorder: Recorder,
    telemetry: Arc<Telemetry>,
    listener: fn(&Telemetry) -> &ListenerStats,
) -> impl Ingest {
    let mut scratch = Scratch::for_stream(wal_stream);
    move |batch: &mut Batch, stream: usize| {
        let mut stats = BlockStats::default();
        scratch.wal_stream = stream;
        recorder.datagrams(
            batch.joined(),
            &batch.datagrams,
            &mut scratch,
            &mut stats,
            // A datagram the WAL cannot take is dropped, and counted.
            |e| telemetry.wal_refused(e),
        );
        recorder.settle(stream);
        telemetry.record_block(listener(&telemetry), &stats);
        if batch.too_large > 0 {
            telemetry
                .datagrams_too_large
                .fetch_add(batch.too_large, Ordering::Relaxed);
        }
    }
}

/// Starts one receive thread per socket (named `name-i`), each with the
/// ingest `make(stream)` makes for its WAL stream, thread `i` on stream
/// `streams.start + i % streams.len()`; thread 0 leads over every stream of
/// `streams`, the others help (see [`Crew`]). They stop when `stop` is set.
pub(crate) fn spawn_with<I: Ingest>(
    sockets: Vec<UdpSocket>,
    streams: Range<usize>,
    name: &str,
    telemetry: &Arc<Telemetry>,
    stop: Arc<AtomicBool>,
    make: impl Fn(usize) -> I,
) -> io::Result<Vec<JoinHandle<()>>> {
    let crew = Arc::new(Crew::new());
    let alone = sockets.len() == 1;
    let wal_streams = streams.len().max(1);
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let (telemetry, stop, crew) =
                (Arc::clone(telemetry), Arc::clone(&stop), Arc::clone(&crew));
            let stream = streams.start + i % wal_streams;
            let ingest = make(stream);
            let first = streams.start;
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let role = match i {
                        _ if alone => Role::Alone,
                        0 => Role::Lead {
                            crew: &crew,
                            streams: first..first + wal_streams,
                        },
                        // One helper looks often uncalled; more would
                        // only wake an idle host more.
                        1 => Role::Helper(&crew, HELPER_POLL),
                        _ => Role::Helper(&crew, POLL),
                    };
                    receive(&socket, stream, &telemetry, &stop, role, ingest)
                })
        })
        .collect()
}

/// A worker on WAL stream `wal_stream` that hands each batch to `ingest`.
/// `socket` is UDP, or a Unix datagram socket ([`super::uds`]), with a read
/// timeout so that a blocked worker sees `stop`.
pub(crate) fn receive(
    socket: &impl AsFd,
    wal_stream: usize,
    telemetry: &Telemetry,
    stop: &AtomicBool,
    role: Role<'_>,
    mut take: impl Ingest,
) {
    let mut batch = Batch::new();
    let mut ingest = |batch: &mut Batch, stream: usize| {
        take(batch, stream);
        batch.clear();
    };
    let streams = match role {
        Role::Helper(crew, poll) => {
            while !stop.load(Ordering::Relaxed) {
                crew.wait(poll);
                // What the socket holds, without waiting, then back to the
                // crew; a stop ends it (the lead drains, bounded).
                while !stop.load(Ordering::Relaxed) {
                    while !batch.is_full() && batch.recv(socket, RecvFlags::DONTWAIT).is_ok() {}
                    if batch.is_empty() {
                        break;
                    }
                    ingest(&mut batch, wal_stream);
                }
            }
            return;
        }
        Role::Lead { ref streams, .. } => streams.clone(),
        Role::Alone => wal_stream..wal_stream + 1,
    };
    // The lead's batches go to its WAL streams in turn, so that it has
    // the room of all of them, as workers that each took datagrams had.
    let mut turn = 0;
    let mut next_stream = || {
        turn = (turn + 1) % streams.len().max(1);
        streams.start + turn
    };
    while !stop.load(Ordering::Relaxed) {
        // A sign of life for the watchdog at each wake-up (a batch, or the
        // read timeout), not per datagram.
        telemetry
            .udp_heartbeat_ms
            .store(crate::notify::now_ms(), Ordering::Relaxed);
        match batch.recv(socket, RecvFlags::empty()) {
            Ok(()) => {
                // What the kernel already holds joins it, up to a batch.
                while !batch.is_full() && batch.recv(socket, RecvFlags::DONTWAIT).is_ok() {}
                // A full batch: more may wait behind it.
                if let Role::Lead { crew, .. } = &role
                    && batch.is_full()
                {
                    crew.call();
                }
                ingest(&mut batch, next_stream());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!(error = %e, "UDP receive failed");
                std::thread::sleep(POLL);
            }
        }
    }
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        while !batch.is_full() && batch.recv(socket, RecvFlags::DONTWAIT).is_ok() {}
        if batch.is_empty() {
            return;
        }
        drained += batch.datagrams.len() + batch.too_large as usize;
        ingest(&mut batch, next_stream());
    }
}

/// Datagrams received back to back, kept one after the other for one
/// [`Recorder::datagrams`]: a batch forms only from what the
/// kernel already holds, so it costs no wait, and it grows when the
/// worker falls behind, which is when the shared apply pays most.
pub(crate) struct Batch {
    /// The datagrams, each followed by `\n`. Sized so that a datagram of
    /// the largest size always fits after [`BATCH_BYTES`].
    buf: Vec<u8>,
    len: usize,
    /// Their ranges in `buf`, without the `\n`.
    datagrams: Vec<Range<usize>>,
    /// Datagrams longer than [`MAX_DATAGRAM`] (only a Unix socket carries
    /// them), dropped whole: their cut last line could count a wrong value.
    too_large: u64,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0; BATCH_BYTES + MAX_DATAGRAM + 1],
            len: 0,
            datagrams: Vec::with_capacity(BATCH_DATAGRAMS),
            too_large: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.datagrams.len() + self.too_large as usize >= BATCH_DATAGRAMS || self.len >= BATCH_BYTES
    }

    /// Whether it holds nothing, not even an oversized datagram to count.
    fn is_empty(&self) -> bool {
        self.datagrams.is_empty() && self.too_large == 0
    }

    fn joined(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Each datagram held.
    pub(crate) fn each(&self) -> impl Iterator<Item = &[u8]> {
        self.datagrams
            .iter()
            .filter_map(|d| self.buf.get(d.clone()))
    }

    /// Datagrams longer than a UDP payload can be, dropped whole.
    pub(crate) fn too_large(&self) -> u64 {
        self.too_large
    }

    fn clear(&mut self) {
        self.len = 0;
        self.datagrams.clear();
        self.too_large = 0;
    }

    /// Receives one datagram after those held. An empty one counts too (as
    /// it always has: a block, and an empty WAL record), so a flood of
    /// empty datagrams still fills a batch and ends it. With
    /// `RecvFlags::DONTWAIT`, `WouldBlock` when none is waiting. One longer
    /// than [`MAX_DATAGRAM`] is counted in `too_large` instead.
    fn recv(&mut self, socket: &impl AsFd, flags: RecvFlags) -> io::Result<()> {
        let start = self.len;
        let Some(spare) = self.buf.get_mut(start..start + MAX_DATAGRAM + 1) else {
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        // With TRUNC, the datagram's whole length comes back.
        let (n, whole) =
            rustix::net::recv(socket, &mut spare[..MAX_DATAGRAM], flags | RecvFlags::TRUNC)?;
        if whole > n {
            self.too_large += 1;
            return Ok(());
        }
        spare[n] = b'\n';
        self.datagrams.push(start..start + n);
        self.len = start + n + 1;
        Ok(())
    }
}

/// The socket inodes of these sockets, each once (clones share one), to
/// find them in `/proc/net/udp`.
pub fn inodes(sockets: &[UdpSocket]) -> Vec<u64> {
    let mut inodes: Vec<u64> = sockets
        .iter()
        .filter_map(|s| {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).ok()?;
            let text = link.to_str()?;
            text.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes
}

/// Datagrams the kernel dropped on these sockets (receive buffer full), from
/// `/proc/net/udp` and `/proc/net/udp6`. `None` where the platform does not say.
pub fn kernel_drops(inodes: &[u64]) -> Option<u64> {
    if inodes.is_empty() {
        return None;
    }
    let mut total = None;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            let drops = drops_in_table(&text, inodes);
            total = Some(total.unwrap_or(0) + drops);
        }
    }
    total
}

/// Sums the `drops` column of the rows whose inode is one of `inodes`.
fn drops_in_table(text: &str, inodes: &[u64]) -> u64 {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = cols.get(9)?.parse().ok()?;
            let drops: u64 = cols.last()?.parse().ok()?;
            inodes.contains(&inode).then_some(drops)
        })
        .sum()
}

#[cfg(test)]
mod tests;
