//! StatsD over TCP: newline-framed streams, many connections at once.
//!
//! Each read is applied as one block (all its complete lines); a partial
//! last line is carried to the next read. A line longer than `max_line` is
//! counted (`tallyd_dropped_total{reason="tcp_line_too_long"}`) and skipped
//! up to its newline; the connection stays open. Connections beyond
//! `max_connections` are closed at once and counted. A connection's memory is
//! bounded by its read buffer plus `max_line`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::tls::{Alpn, Stream};
use crate::auth::{self, Guard};
use tokio::sync::watch;

use super::record::Recorder;
use crate::aggregate::Scratch;
use crate::telemetry::{BlockStats, Telemetry};

/// Largest single read.
const READ_BUF: usize = 64 * 1024;

#[derive(Clone)]
pub struct TcpIngest {
    pub recorder: Recorder,
    pub telemetry: Arc<Telemetry>,
    pub max_line: usize,
    pub max_connections: usize,
    /// A connection silent for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// WAL streams for TCP: connection `n` appends to `streams.start + n % len`.
    pub wal_streams: std::ops::Range<usize>,
    /// TLS, when `tls.listeners` names `statsd_tcp`.
    pub guard: Arc<Guard>,
}

/// Reads a connection gets at a stop to apply what the kernel holds.
const DRAIN_READS: usize = 256;

/// How long a connection waits before it retries a block the WAL refused.
const WAL_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

impl TcpIngest {
    /// Accepts connections until `stop` turns true, then waits for every
    /// connection to apply what it has already received.
    pub async fn serve(self, listener: TcpListener, stop: watch::Receiver<bool>) {
        let (max, streams, telemetry) = (
            self.max_connections,
            self.wal_streams.clone(),
            Arc::clone(&self.telemetry),
        );
        let gate = super::Gate {
            listener: auth::Listener::StatsdTcp,
            guard: Arc::clone(&self.guard),
            telemetry: Arc::clone(&telemetry),
            alpn: Alpn::None,
        };
        super::serve_connections(
            listener,
            max,
            streams,
            Some(telemetry),
            Some(gate),
            stop,
            move |stream, wal_stream, stop| {
                let this = self.clone();
                async move { this.connection(stream, wal_stream, stop).await }
            },
        )
        .await;
    }

    async fn connection(
        &self,
        mut stream: Stream<TcpStream>,
        wal_stream: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut lines = LineBuffer::new(self.max_line);
        let mut buf = vec![0u8; READ_BUF.min(self.max_line.max(4096))];
        let mut scratch = Scratch::for_stream(wal_stream);
        loop {
            // Backpressure: while the WAL refuses a block, read nothing more.
            while !self.retry_blocked(&mut lines, &mut scratch) {
                if *stop.borrow() {
                    return;
                }
                tokio::time::sleep(WAL_RETRY).await;
            }
            let n = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, stream.read(&mut buf)) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        self.telemetry.connections_idle_closed.fetch_add(1, Relaxed);
                        break;
                    }
                },
                _ = stop.changed() => {
                    // Apply what the kernel already holds (bounded: a sender
                    // that never pauses must not hold the stop), then close.
                    for _ in 0..DRAIN_READS {
                        // One poll: what is readable now (decrypted, with
                        // TLS), without waiting.
                        let now = tokio::time::timeout(std::time::Duration::ZERO, stream.read(&mut buf));
                        match now.await {
                            Ok(Ok(n)) if n > 0 => self.apply(&mut lines, &buf[..n], &mut scratch),
                            _ => break,
                        }
                    }
                    break;
                }
            };
            match n {
                Ok(0) => break,
                Ok(n) => self.apply(&mut lines, &buf[..n], &mut scratch),
                Err(e) => {
                    tracing::debug!(error = %e, "TCP read failed");
                    break;
                }
            }
        }
        // Our side ends too (with TLS, close_notify), not waited for long.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
        // A last line without its newline still counts.
        lines.finish();
        while !self.retry_blocked(&mut lines, &mut scratch) {
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(WAL_RETRY).await;
        }
    }

    fn apply(&self, lines: &mut LineBuffer, data: &[u8], scratch: &mut Scratch) {
        let too_long = lines.push(data, |block| self.ingest(block, scratch));
        self.telemetry
            .tcp_lines_too_long
            .fetch_add(too_long, Relaxed);
    }

    /// Applies a block; false when the WAL refused it.
    fn ingest(&self, block: &[u8], scratch: &mut Scratch) -> bool {
        let mut stats = BlockStats::default();
        match self.recorder.block(block, scratch, &mut stats) {
            Ok(()) => {
                self.telemetry.record_block(&self.telemetry.tcp, &stats);
                true
            }
            Err(e) => {
                self.telemetry.wal_refused(e);
                false
            }
        }
    }

    /// Tries the refused block again; true when nothing is left refused.
    fn retry_blocked(&self, lines: &mut LineBuffer, scratch: &mut Scratch) -> bool {
        if lines.blocked.is_empty() {
            return true;
        }
        let block = std::mem::take(&mut lines.blocked);
        if self.ingest(&block, scratch) {
            return true;
        }
        lines.blocked = block;
        false
    }
}

/// Cuts a byte stream into blocks of whole lines, carrying a partial line
/// between reads and skipping lines longer than `max_line`. A block the
/// consumer refuses is kept in `blocked`, to be offered again before the
/// connection reads more.
pub struct LineBuffer {
    carry: Vec<u8>,
    max_line: usize,
    skipping: bool,
    pub blocked: Vec<u8>,
}

impl LineBuffer {
    pub fn new(max_line: usize) -> LineBuffer {
        LineBuffer {
            carry: Vec::new(),
            max_line,
            skipping: false,
            blocked: Vec::new(),
        }
    }

    fn offer(&mut self, block: &[u8], apply: &mut impl FnMut(&[u8]) -> bool) {
        if !block.is_empty() && !apply(block) {
            self.blocked.extend_from_slice(block);
        }
    }

    /// Feeds `data`; calls `apply` with blocks of complete lines (a refused
    /// block goes to `blocked`). Returns how many lines were dropped as too
    /// long.
    pub fn push(&mut self, mut data: &[u8], mut apply: impl FnMut(&[u8]) -> bool) -> u64 {
        let mut too_long = 0;
        if self.skipping {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.skipping = false;
                    data = &data[i + 1..];
                }
                None => return 0,
            }
        }
        let Some(last_nl) = data.iter().rposition(|&b| b == b'\n') else {
            return self.keep(data);
        };
        let (complete, rest) = (&data[..=last_nl], &data[last_nl + 1..]);
        if self.carry.is_empty() {
            self.offer(complete, &mut apply);
        } else {
            let first_nl = complete.iter().position(|&b| b == b'\n').unwrap_or(0);
            if self.carry.len() + first_nl > self.max_line {
                too_long += 1;
                self.carry.clear();
                self.offer(&complete[first_nl + 1..], &mut apply);
            } else {
                let mut block = std::mem::take(&mut self.carry);
                block.extend_from_slice(complete);
                self.offer(&block, &mut apply);
                block.clear();
                self.carry = block;
            }
        }
        too_long + self.keep(rest)
    }

    /// Keeps a partial line; starts skipping when it grows past the limit.
    fn keep(&mut self, partial: &[u8]) -> u64 {
        if self.carry.len() + partial.len() > self.max_line {
            self.carry.clear();
            self.skipping = true;
            return 1;
        }
        self.carry.extend_from_slice(partial);
        0
    }

    /// The stream ended: a last line without its newline joins `blocked`,
    /// to be applied like a refused block.
    pub fn finish(&mut self) {
        if !self.skipping {
            let carry = std::mem::take(&mut self.carry);
            self.blocked.extend_from_slice(&carry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(max: usize, chunks: &[&str]) -> (Vec<String>, u64, Option<String>) {
        let mut lb = LineBuffer::new(max);
        let mut blocks = Vec::new();
        let mut dropped = 0;
        for c in chunks {
            dropped += lb.push(c.as_bytes(), |b| {
                blocks.push(String::from_utf8_lossy(b).into_owned());
                true
            });
        }
        lb.finish();
        let rest =
            (!lb.blocked.is_empty()).then(|| String::from_utf8_lossy(&lb.blocked).into_owned());
        (blocks, dropped, rest)
    }

    #[test]
    fn whole_lines_pass_in_one_block() {
        let (blocks, dropped, rest) = feed(100, &["a:1|c\nb:1|c\n"]);
        assert_eq!(
            (blocks, dropped, rest),
            (vec!["a:1|c\nb:1|c\n".to_string()], 0, None)
        );
    }

    #[test]
    fn partial_line_is_carried_to_the_next_read() {
        let (blocks, _, rest) = feed(100, &["a:1|c\nb:", "1|c\nc:1", "|c"]);
        assert_eq!(blocks, vec!["a:1|c\n", "b:1|c\n"]);
        assert_eq!(rest.as_deref(), Some("c:1|c"));
    }

    #[test]
    fn long_line_is_dropped_and_the_stream_goes_on() {
        let (blocks, dropped, rest) = feed(8, &["a:1|c\nxxxxxx", "xxxxxx", "xx\nb:1|c\n"]);
        assert_eq!(blocks, vec!["a:1|c\n", "b:1|c\n"]);
        assert_eq!((dropped, rest), (1, None));
    }

    #[test]
    fn refused_block_is_kept_for_a_retry() {
        let mut lb = LineBuffer::new(100);
        lb.push(b"a:1|c\nb:", |_| false);
        assert_eq!(lb.blocked, b"a:1|c\n");
        let mut seen = Vec::new();
        lb.push(b"1|c\n", |b| {
            seen.extend_from_slice(b);
            true
        });
        assert_eq!(seen, b"b:1|c\n");
    }

    #[test]
    fn carried_line_that_ends_too_long_is_dropped() {
        let (blocks, dropped, _) = feed(8, &["xxxxx", "xxxxx\nb:1|c\n"]);
        assert_eq!(blocks, vec!["b:1|c\n"]);
        assert_eq!(dropped, 1);
    }
}
