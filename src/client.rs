//! The reference client (`tallyd send`): StatsD lines over UDP or TCP, or
//! protobuf batches over TCP that wait for their acks and are retried with
//! the same sequence after a broken connection. Blocking std I/O: no tokio.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
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

/// A protobuf TCP connection that survives breaks.
pub struct ProtoClient {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    pub retries: u32,
    pub timeout: Duration,
}

impl ProtoClient {
    pub fn new(addr: SocketAddr) -> ProtoClient {
        ProtoClient {
            addr,
            stream: None,
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
            match self.round_trip(&frame) {
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
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_nodelay(true)?;
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
            let mut s = TcpStream::connect(addr)?;
            for line in lines {
                s.write_all(line.as_bytes())?;
                s.write_all(b"\n")?;
            }
        }
        Target::Proto(addr) => {
            let events = events_from_lines(lines.iter().map(String::as_str))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut client = ProtoClient::new(addr);
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
