//! The reference client (`tallyd send`): StatsD lines over UDP or TCP, or
//! protobuf batches over TCP that wait for their acks and are retried with
//! the same sequence after a broken connection; over TLS (with a client
//! certificate) and with a token when asked ([`Secure`]). Blocking std
//! I/O: no tokio.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use crate::protocol::proto::pb::ack::Status;
use crate::protocol::proto::pb::event::Value;
use crate::protocol::proto::{self, Ack, Batch, Event, Tag};
use crate::protocol::statsd::{self, Limits, MetricType, Parsed};

/// Turns StatsD lines into protobuf events (a packed line gives one event
/// per value). Lines that do not parse are returned as errors with their text.
pub fn events_from_lines<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Event>, String> {
    let mut events = Vec::new();
    for text in lines {
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            continue;
        }
        let line = match statsd::parse_line(text.as_bytes(), &Limits::default()) {
            Ok(Parsed::Metric(l)) => l,
            Ok(_) => {
                return Err(format!(
                    "{text:?}: events and service checks have no protobuf form"
                ));
            }
            Err(e) => return Err(format!("{text:?}: {e}")),
        };
        let name = String::from_utf8_lossy(line.name).into_owned();
        let mut tags = Vec::new();
        statsd::for_each_tag(line.tags, |t| {
            let t = String::from_utf8_lossy(t);
            let (key, value) = t.split_once(':').unwrap_or((&t, ""));
            tags.push(Tag {
                key: key.to_owned(),
                value: value.to_owned(),
            });
        });
        let rate = if line.sample_rate == 1.0 {
            0.0
        } else {
            line.sample_rate
        };
        let mut push = |value: Value| {
            events.push(Event {
                name: name.clone(),
                tags: tags.clone(),
                value: Some(value),
                sample_rate: rate,
                interval_start: 0,
                host_dropped: false,
            })
        };
        if line.kind == MetricType::Set {
            push(Value::SetMember(
                String::from_utf8_lossy(line.raw_values).into_owned(),
            ));
            continue;
        }
        for v in line.values() {
            push(match line.kind {
                MetricType::Counter => Value::Counter(v.value),
                MetricType::Gauge if v.delta => Value::GaugeDelta(v.value),
                MetricType::Gauge => Value::Gauge(v.value),
                MetricType::Timer => Value::TimerMs(v.value),
                MetricType::Histogram => Value::Histogram(v.value),
                MetricType::Distribution | MetricType::Set => Value::Distribution(v.value),
            });
        }
    }
    Ok(events)
}

/// How a TCP connection is secured: TLS (its client configuration and the
/// server's name), and the token sent first on a protobuf connection.
#[derive(Default, Clone)]
pub struct Secure {
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    pub token: Option<crate::auth::Secret>,
}

/// A blocking stream: TCP, or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

impl Conn {
    /// Why a write failed: with TLS, the server may have refused our
    /// certificate (an alert waiting to be read) and closed; else `e`.
    pub fn why(&mut self, e: io::Error) -> io::Error {
        match self {
            Conn::Tls(s) => why(s, e),
            Conn::Plain(_) if closed_at_once(&e) => closed_error(e),
            Conn::Plain(_) => e,
        }
    }

    /// Ends the stream as TLS says (`close_notify`), so that the server
    /// does not take the end for a cut; then waits (at most 5 s) for the
    /// server to close, so that a refusal it sends after our side of the
    /// handshake (TLS 1.3 checks a client certificate then) is not missed.
    pub fn finish(mut self) -> io::Result<()> {
        let s = match &mut self {
            Conn::Tls(s) => s,
            Conn::Plain(s) => {
                // StatsD answers nothing: bytes back are a TLS listener's
                // alert (it speaks TLS), and a reset is a server that
                // closed at once (a TLS one that read a plain line).
                let shut = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = [0u8; 2];
                let read = s.read_exact(&mut head);
                return match (shut, read) {
                    (_, Ok(())) if head == TLS_ALERT => Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the listener speaks TLS (add --tls)",
                    )),
                    (Err(e), _) | (_, Err(e)) if closed_at_once(&e) => Err(closed_error(e)),
                    _ => Ok(()),
                };
            }
        };
        s.conn.send_close_notify();
        if let Err(e) = s.flush() {
            return Err(why(s, e));
        }
        s.sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => match refused(&e) {
                    Some(refusal) => return Err(refusal),
                    // A close without close_notify, or no close in 5 s:
                    // what was written was taken (StatsD has no ack).
                    None => return Ok(()),
                },
            }
        }
    }
}

impl Secure {
    /// A connection to `addr`, within `timeout`, TLS when configured.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let Some((config, name)) = &self.tls else {
            return Ok(Conn::Plain(s));
        };
        let conn = rustls::ClientConnection::new(Arc::clone(config), name.clone())
            .map_err(io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        // The handshake now, so that its failure is said as such.
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| refused(&e).unwrap_or(e))?;
        }
        Ok(Conn::Tls(Box::new(tls)))
    }
}

/// A plain write or close that found the server gone.
fn closed_at_once(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// What a plain client says of a server that closed at once.
fn closed_error(e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!(
            "the server closed the connection at once ({e}): it is over its connection limit, or speaks TLS (add --tls)"
        ),
    )
}

/// See [`Conn::why`].
fn why(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    e: io::Error,
) -> io::Error {
    let _ = s.sock.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 512];
    // Bytes read (application data after a refusal?) say nothing more.
    match s.read(&mut buf) {
        Err(read) => refused(&read).unwrap_or(e),
        Ok(n) => {
            tracing::debug!(bytes = n, "read after a failed write");
            e
        }
    }
}

/// A certificate refused (either side's) as `PermissionDenied`, its reason
/// in words; `None` for anything else, which a retry may mend.
fn refused(e: &io::Error) -> Option<io::Error> {
    if !crate::sink::tls::is_certificate_refusal(e) {
        return None;
    }
    let reason = crate::sink::tls::tls_reason(e)?;
    Some(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("TLS: {reason}"),
    ))
}

/// A protobuf TCP connection that survives breaks.
pub struct ProtoClient {
    addr: SocketAddr,
    stream: Option<Conn>,
    secure: Secure,
    pub retries: u32,
    pub timeout: Duration,
}

impl ProtoClient {
    pub fn new(addr: SocketAddr) -> ProtoClient {
        ProtoClient::secured(addr, Secure::default())
    }

    /// A client over TLS and with a token, as `secure` says.
    pub fn secured(addr: SocketAddr, secure: Secure) -> ProtoClient {
        ProtoClient {
            addr,
            stream: None,
            secure,
            retries: 20,
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends `batch` and returns its ack. On a broken connection or an
    /// `OVERLOADED` answer it reconnects and sends the same batch (same
    /// sequence) again, up to `retries` times with a growing pause.
    pub fn send(&mut self, batch: &Batch) -> io::Result<Ack> {
        let frame = proto::encode_frame(batch);
        let mut last_error = None;
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(50 * u64::from(attempt.min(20))));
            }
            match self
                .round_trip(&frame)
                .map_err(|e| refused(&e).unwrap_or(e))
            {
                // A certificate refused, on either side: not retried.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(e),
                // Retried in vain: a token is wrong until it is fixed.
                Ok(ack) if ack.status == Status::Unauthenticated as i32 => {
                    let message = format!(
                        "{} (tallyd send: --token-file or TALLYD_TOKEN)",
                        ack.message
                    );
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, message));
                }
                Ok(ack) if ack.status == Status::Overloaded as i32 => {
                    // tallyd closes the connection after OVERLOADED.
                    self.stream = None;
                    last_error = Some(io::Error::other(ack.message))
                }
                Ok(ack) => return Ok(ack),
                Err(e) => {
                    self.stream = None;
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no attempt made")))
    }

    fn round_trip(&mut self, frame: &[u8]) -> io::Result<Ack> {
        if self.stream.is_none() {
            let mut s = self.secure.connect(self.addr, self.timeout)?;
            if let Some(token) = &self.secure.token {
                let hello = Batch {
                    token: token.expose().to_owned(),
                    ..Batch::default()
                };
                s.write_all(&proto::encode_frame(&hello))?;
                let ack = read_ack(&mut s)?;
                if ack.status == Status::Unauthenticated as i32 {
                    return Ok(ack);
                }
                if ack.status != Status::Ok as i32 {
                    // Not the data batch's answer: an older server, or one
                    // that refuses the token batch itself.
                    return Err(io::Error::other(format!(
                        "the token batch was answered {:?}: {}",
                        Status::try_from(ack.status).unwrap_or(Status::Rejected),
                        ack.message
                    )));
                }
            }
            self.stream = Some(s);
        }
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| io::Error::other("not connected"))?;
        stream.write_all(frame)?;
        read_ack(stream)
    }
}

/// Reads one length-delimited `Ack`.
pub fn read_ack(stream: &mut impl Read) -> io::Result<Ack> {
    let mut prefix = Vec::with_capacity(10);
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte)?;
        if prefix.is_empty() && byte[0] == TLS_ALERT[0] {
            // A TLS alert record (type 21, version 3.x) to a plain client;
            // an Ack of 21 bytes would start with a field tag, never 3.
            stream.read_exact(&mut byte)?;
            if byte[0] == TLS_ALERT[1] {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the listener speaks TLS (add --tls)",
                ));
            }
            let mut body = vec![0u8; usize::from(TLS_ALERT[0])];
            body[0] = byte[0];
            stream.read_exact(&mut body[1..])?;
            return Ack::decode(&body[..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        prefix.push(byte[0]);
        match proto::frame_header(&prefix, 1 << 20) {
            Ok(Some((_, len))) => {
                let mut body = vec![0u8; len];
                stream.read_exact(&mut body)?;
                return Ack::decode(&body[..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// The first bytes of a TLS alert record: content type 21, version 3.
const TLS_ALERT: [u8; 2] = [0x15, 0x03];

/// Where `tallyd send` sends to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    StatsdUdp(SocketAddr),
    StatsdTcp(SocketAddr),
    Proto(SocketAddr),
}

/// What `tallyd send` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    pub batches: u64,
    pub duplicates: u64,
    pub rejected_events: u64,
}

/// Sends `lines` to `target`; protobuf batches get sequences from
/// `first_sequence` on.
pub fn send(
    target: Target,
    lines: &[String],
    client_id: &str,
    first_sequence: u64,
    batch_size: usize,
    secure: &Secure,
) -> io::Result<Summary> {
    let mut summary = Summary {
        lines: lines.len() as u64,
        ..Summary::default()
    };
    match target {
        Target::StatsdUdp(addr) => {
            let sock = UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })?;
            let mut datagram = String::new();
            for line in lines {
                if !datagram.is_empty() && datagram.len() + line.len() + 1 > 1400 {
                    sock.send_to(datagram.as_bytes(), addr)?;
                    datagram.clear();
                }
                datagram.push_str(line);
                datagram.push('\n');
            }
            if !datagram.is_empty() {
                sock.send_to(datagram.as_bytes(), addr)?;
            }
        }
        Target::StatsdTcp(addr) => {
            let mut s = secure.connect(addr, Duration::from_secs(30))?;
            for line in lines {
                let written = s.write_all(line.as_bytes());
                if let Err(e) = written.and_then(|()| s.write_all(b"\n")) {
                    return Err(s.why(e));
                }
            }
            s.finish()?;
        }
        Target::Proto(addr) => {
            let events = events_from_lines(lines.iter().map(String::as_str))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut client = ProtoClient::secured(addr, secure.clone());
            for (i, chunk) in events.chunks(batch_size.max(1)).enumerate() {
                let batch = Batch {
                    client_id: client_id.to_owned(),
                    sequence: first_sequence + i as u64,
                    events: chunk.to_vec(),
                    ..Batch::default()
                };
                let ack = client.send(&batch)?;
                match Status::try_from(ack.status) {
                    Ok(Status::Ok) => summary.rejected_events += u64::from(ack.rejected_events),
                    Ok(Status::Duplicate) => summary.duplicates += 1,
                    _ => {
                        return Err(io::Error::other(format!(
                            "batch {} refused: {}",
                            batch.sequence, ack.message
                        )));
                    }
                }
                summary.batches += 1;
            }
        }
    }
    Ok(summary)
}

/// Lines from the arguments, or from standard input when there are none.
pub fn read_lines(args: &[String]) -> io::Result<Vec<String>> {
    if !args.is_empty() {
        return Ok(args.to_vec());
    }
    io::stdin().lock().lines().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_events() {
        let events = events_from_lines(["a:1:2|c|#env:prod,canary", "u:bob|s", "g:-3|g|@0.5"])
            .expect("valid");
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].value, Some(Value::Counter(1.0)));
        assert_eq!(events[1].value, Some(Value::Counter(2.0)));
        assert_eq!(
            events[0].tags,
            vec![
                Tag {
                    key: "env".into(),
                    value: "prod".into()
                },
                Tag {
                    key: "canary".into(),
                    value: String::new()
                }
            ]
        );
        assert_eq!(events[2].value, Some(Value::SetMember("bob".into())));
        assert_eq!(
            (events[3].value.clone(), events[3].sample_rate),
            (Some(Value::GaugeDelta(-3.0)), 0.5)
        );
    }

    #[test]
    fn a_bad_line_is_an_error_naming_it() {
        let err = events_from_lines(["ok:1|c", "bad"]).unwrap_err();
        assert!(err.contains("\"bad\""), "{err}");
    }
}
