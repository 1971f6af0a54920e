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

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::aggregate::{Aggregator, Scratch};
use crate::telemetry::{BlockStats, Telemetry};

/// Largest single read.
const READ_BUF: usize = 64 * 1024;

#[derive(Clone)]
pub struct TcpIngest {
    pub aggregator: Arc<Aggregator>,
    pub telemetry: Arc<Telemetry>,
    pub max_line: usize,
    pub max_connections: usize,
}

impl TcpIngest {
    /// Accepts connections until `stop` turns true, then waits for every
    /// connection to apply what it has already received.
    pub async fn serve(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            self.telemetry.tcp_connections_refused.fetch_add(1, Relaxed);
                            continue;
                        };
                        self.telemetry.tcp_connections.fetch_add(1, Relaxed);
                        let (this, stop) = (self.clone(), stop.clone());
                        connections.spawn(async move {
                            this.connection(stream, stop).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TCP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = stop.changed() => break,
            }
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
    }

    async fn connection(&self, mut stream: TcpStream, mut stop: watch::Receiver<bool>) {
        let mut lines = LineBuffer::new(self.max_line);
        let mut buf = vec![0u8; READ_BUF.min(self.max_line.max(4096))];
        let mut scratch = Scratch::default();
        loop {
            let n = tokio::select! {
                r = stream.read(&mut buf) => r,
                _ = stop.changed() => {
                    // Apply what the kernel already holds, then close.
                    while let Ok(n) = stream.try_read(&mut buf) {
                        if n == 0 { break; }
                        self.apply(&mut lines, &buf[..n], &mut scratch);
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
        // A last line without its newline still counts.
        let mut stats = BlockStats::default();
        if let Some(rest) = lines.finish() {
            self.aggregator.ingest_block(rest, &mut scratch, &mut stats);
            self.telemetry.record_block(&self.telemetry.tcp, &stats);
        }
    }

    fn apply(&self, lines: &mut LineBuffer, data: &[u8], scratch: &mut Scratch) {
        let mut stats = BlockStats::default();
        let too_long = lines.push(data, |block| {
            self.aggregator.ingest_block(block, scratch, &mut stats)
        });
        self.telemetry
            .tcp_lines_too_long
            .fetch_add(too_long, Relaxed);
        self.telemetry.record_block(&self.telemetry.tcp, &stats);
    }
}

/// Cuts a byte stream into blocks of whole lines, carrying a partial line
/// between reads and skipping lines longer than `max_line`.
pub struct LineBuffer {
    carry: Vec<u8>,
    max_line: usize,
    skipping: bool,
}

impl LineBuffer {
    pub fn new(max_line: usize) -> LineBuffer {
        LineBuffer {
            carry: Vec::new(),
            max_line,
            skipping: false,
        }
    }

    /// Feeds `data`; calls `apply` with blocks of complete lines. Returns how
    /// many lines were dropped as too long.
    pub fn push(&mut self, mut data: &[u8], mut apply: impl FnMut(&[u8])) -> u64 {
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
            apply(complete);
        } else {
            let first_nl = complete.iter().position(|&b| b == b'\n').unwrap_or(0);
            if self.carry.len() + first_nl > self.max_line {
                too_long += 1;
                self.carry.clear();
                apply(&complete[first_nl + 1..]);
            } else {
                self.carry.extend_from_slice(complete);
                apply(&self.carry);
                self.carry.clear();
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

    /// What is left when the stream ends (a last line without newline).
    pub fn finish(&mut self) -> Option<&[u8]> {
        (!self.carry.is_empty() && !self.skipping).then_some(&self.carry[..])
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
                blocks.push(String::from_utf8_lossy(b).into_owned())
            });
        }
        let rest = lb.finish().map(|b| String::from_utf8_lossy(b).into_owned());
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
    fn carried_line_that_ends_too_long_is_dropped() {
        let (blocks, dropped, _) = feed(8, &["xxxxx", "xxxxx\nb:1|c\n"]);
        assert_eq!(blocks, vec!["b:1|c\n"]);
        assert_eq!(dropped, 1);
    }
}
