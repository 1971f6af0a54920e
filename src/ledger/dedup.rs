//! Idempotent protobuf batches: `(client_id, sequence)` is accepted once.
//!
//! Per client, tallyd keeps a *window* of the last [`WINDOW`] sequences: the
//! highest sequence accepted (`high`) and a bitmap of which of the
//! sequences `high - WINDOW + 1 ..= high` were accepted. A sequence is
//!
//! - accepted if it is above `high`, or inside the window and not yet
//!   accepted: batches may arrive in any order (pipelined TCP, reordered UDP
//!   datagrams, one client on several connections, a batch retried after
//!   `OVERLOADED` while later ones went through);
//! - a duplicate if it is inside the window and already accepted;
//! - too old if it is below the window: tallyd can no longer tell, so it
//!   refuses the batch (`REJECTED`, "outside the deduplication window")
//!   rather than count it twice or call it a duplicate and lose it.
//!
//! The check, the WAL append and the mark run under the client's entry
//! lock, so one client on two connections cannot race itself; the apply
//! follows (the mark already stands, so a copy of the batch racing it is a
//! duplicate). An empty
//! `client_id` opts out of deduplication.
//!
//! Across restarts: the state is saved to `<data_dir>/dedup` before the WAL
//! releases any record (step 5 of the durable order in [`crate::ledger`]), so
//! every accepted batch is either in the saved state or still in the WAL,
//! whose replay feeds [`Dedup::observe`]. A client silent for longer than
//! the window (`proto.dedup_window`, 24 h, counted in flushes: each
//! [`Dedup::snapshot`] is one) is forgotten and starts over. Counting
//! flushes, not the wall clock, a clock that jumps forward forgets nobody.
//!
//! # The `dedup` file, version 3: a change log, compacted when it doubles
//!
//! ```text
//! tallyd-dedup 3
//! now <flushes counted so far>
//! <client id, hex> <high> <bitmap: 256 hex digits, bit i = high - i> <last seen: the flush count then>
//! ...
//! now <N>
//! <the clients changed since the lines before>
//! ...
//! ```
//!
//! Each release appends one chunk: its flush count, then a line for every
//! client accepted since the last chunk (a later line of a client replaces
//! the earlier). When the file has grown past twice what one line per
//! remembered client takes (and 64 KiB), it is rewritten atomically as one
//! chunk of every client. A torn last line (a crash mid-append) is cut off
//! at start.
//!
//! Version 2 (`tallyd-dedup 2 <now>`, then one line per client) and
//! version 1 (`tallyd-dedup 1`, the last seen time in Unix seconds) are
//! read, as is a file without a header line, version 0 (`<client hex>
//! <high> <seen>`, written before the window existed): every sequence up
//! to `high` counts as accepted. Clients of versions 0 and 1 are read as
//! seen at the start.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use dashmap::DashMap;

use crate::fs::{Fs, read_optional};
use crate::lock;

/// Sequences remembered per client below the highest accepted one.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;
/// The longest `client_id` accepted, in bytes.
pub const MAX_CLIENT_ID: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Client {
    high: u64,
    /// Bit `i` set: sequence `high - i` was accepted.
    bits: [u64; WORDS],
    /// The flush count at its last accepted batch (0: never accepted).
    seen: u64,
    /// Accepted a batch since the last chunk written.
    dirty: bool,
}

impl Client {
    const NEW: Client = Client {
        high: 0,
        bits: [0; WORDS],
        seen: 0,
        dirty: false,
    };

    fn state(&self, sequence: u64) -> Seen {
        if self.seen == 0 || sequence > self.high {
            return Seen::New;
        }
        let back = self.high - sequence;
        if back >= WINDOW {
            return Seen::TooOld;
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if self.bits[w] >> b & 1 == 1 {
            Seen::Accepted
        } else {
            Seen::New
        }
    }

    fn mark(&mut self, sequence: u64) {
        if self.seen == 0 {
            self.high = sequence;
            self.bits = [0; WORDS];
        } else if sequence > self.high {
            self.shift(sequence - self.high);
            self.high = sequence;
        }
        let back = self.high - sequence;
        if back < WINDOW {
            self.bits[(back / 64) as usize] |= 1 << (back % 64);
        }
    }

    /// Moves the window up by `by` sequences.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.bits[j]);
            let carry = match i.checked_sub(words + 1) {
                Some(j) if bits > 0 => self.bits[j] >> (64 - bits),
                _ => 0,
            };
            self.bits[i] = if bits == 0 { lo } else { lo << bits | carry };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    New,
    Accepted,
    TooOld,
}

/// The answer to a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<R> {
    /// Accepted now; `accept` returned this.
    Accepted(R),
    /// Accepted before: nothing was done.
    Duplicate,
    /// Below the client's window: refused, nothing was done.
    TooOld,
    /// `client_id` longer than [`MAX_CLIENT_ID`]: refused.
    BadClientId,
}

pub struct Dedup {
    clients: DashMap<String, Client>,
    path: PathBuf,
    /// Flushes a client may stay silent before it is forgotten.
    window: u64,
    /// Flushes counted so far (snapshots taken), from 1.
    now: AtomicU64,
    /// Bytes of the file as written (`None`: unknown, rewrite it next).
    log_bytes: std::sync::Mutex<Option<u64>>,
    /// Past this many clients, the least recently seen tenth is forgotten.
    max_clients: usize,
    /// Held while one thread makes room.
    making_room: std::sync::Mutex<()>,
    fs: Arc<dyn Fs>,
}

fn bad(path: &Path, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

impl Dedup {
    /// Loads the saved state from `data_dir/dedup` (none is fine). A client
    /// silent for more than `window` flushes is forgotten.
    pub fn open(data_dir: &Path, window: u64, fs: Arc<dyn Fs>) -> io::Result<Dedup> {
        let path = data_dir.join("dedup");
        let clients = DashMap::new();
        let mut now = 1;
        let mut log_bytes = None;
        if let Some(bytes) = read_optional(&path)? {
            let mut text = String::from_utf8(bytes).map_err(|_| bad(&path, "not UTF-8".into()))?;
            let version = match text
                .lines()
                .next()
                .map(|h| h.split(' ').collect::<Vec<_>>())
            {
                Some(h) if h[..] == ["tallyd-dedup", "1"] => 1,
                Some(h) if h[..] == ["tallyd-dedup", "3"] => 3,
                Some(h) if h.len() == 3 && h[..2] == ["tallyd-dedup", "2"] => {
                    now = h[2]
                        .parse::<u64>()
                        .map_err(|_| bad(&path, "bad flush count".into()))?
                        .max(1);
                    2
                }
                Some(h) if h.first() == Some(&"tallyd-dedup") => {
                    return Err(bad(&path, format!("unknown version {h:?}")));
                }
                _ => 0,
            };
            if version == 3 {
                let whole = cut_torn_tail(&path, &mut text)?;
                log_bytes = Some(whole);
            }
            let mut lines = text.lines();
            if version > 0 {
                lines.next();
            }
            for line in lines {
                if let Some(n) = line.strip_prefix("now ").filter(|_| version == 3) {
                    now = n
                        .parse::<u64>()
                        .map_err(|_| bad(&path, "bad flush count".into()))?
                        .max(1);
                    continue;
                }
                let (id, mut client) = parse_line(line, version)
                    .ok_or_else(|| bad(&path, format!("bad line {line:?}")))?;
                // Earlier versions kept Unix seconds: seen at the start.
                if version < 2 || client.seen > now {
                    client.seen = now;
                }
                clients.insert(id, client);
            }
        }
        Ok(Dedup {
            clients,
            path,
            window: window.max(1),
            now: AtomicU64::new(now),
            log_bytes: std::sync::Mutex::new(log_bytes),
            max_clients: 100_000,
            making_room: std::sync::Mutex::new(()),
            fs,
        })
    }

    fn now(&self) -> u64 {
        self.now.load(Relaxed)
    }

    /// Caps the client table (`proto.max_clients`).
    pub fn with_max_clients(mut self, max_clients: usize) -> Dedup {
        self.max_clients = max_clients.max(1);
        self
    }

    /// Forgets the least recently seen tenth of the clients when the table
    /// is full (LRU by last accepted batch). A forgotten client starts over:
    /// a batch of it retried after that would count again, so the cap is a
    /// memory bound, set well above the number of live clients.
    ///
    /// One thread makes room at a time (the others go on meanwhile, the
    /// table a few entries over for a moment), and exactly a tenth goes:
    /// in a flood of new clients within one flush every entry was seen at
    /// the same count, and cutting at that count would forget them all.
    fn make_room(&self) {
        if self.clients.len() < self.max_clients {
            return;
        }
        let Ok(_one) = self.making_room.try_lock() else {
            return;
        };
        let mut seen: Vec<u64> = self.clients.iter().map(|e| e.seen).collect();
        let cut = (seen.len() / 10).max(1);
        let (_, &mut oldest, _) = seen.select_nth_unstable(cut - 1);
        // Those seen before the cut's count, then as many seen at it as the
        // tenth still needs.
        let mut at_cut = cut - seen.iter().filter(|&&s| s < oldest).count();
        self.clients.retain(|_, c| {
            if c.seen > oldest {
                return true;
            }
            if c.seen == oldest {
                if at_cut == 0 {
                    return true;
                }
                at_cut -= 1;
            }
            false
        });
        tracing::warn!(
            max_clients = self.max_clients,
            left = self.clients.len(),
            "the protobuf client table was full: forgot the least recently seen clients"
        );
    }

    /// Runs `accept` unless `(client, sequence)` was accepted before or is
    /// below the client's window. The sequence is recorded only when
    /// `accept` succeeds.
    pub fn admit<R, E>(
        &self,
        client: &str,
        sequence: u64,
        accept: impl FnOnce() -> Result<R, E>,
    ) -> Result<Admit<R>, E> {
        if client.is_empty() {
            return accept().map(Admit::Accepted);
        }
        if client.len() > MAX_CLIENT_ID {
            return Ok(Admit::BadClientId);
        }
        // A failed accept leaves no entry behind.
        if let Some(mut entry) = self.clients.get_mut(client) {
            return match entry.state(sequence) {
                Seen::Accepted => Ok(Admit::Duplicate),
                Seen::TooOld => Ok(Admit::TooOld),
                Seen::New => {
                    let r = accept()?;
                    entry.mark(sequence);
                    entry.seen = self.now();
                    entry.dirty = true;
                    Ok(Admit::Accepted(r))
                }
            };
        }
        self.make_room();
        let mut entry = self.clients.entry(client.to_owned()).or_insert(Client::NEW);
        match entry.state(sequence) {
            Seen::Accepted => Ok(Admit::Duplicate),
            Seen::TooOld => Ok(Admit::TooOld),
            Seen::New => match accept() {
                Ok(r) => {
                    entry.mark(sequence);
                    entry.seen = self.now();
                    entry.dirty = true;
                    Ok(Admit::Accepted(r))
                }
                Err(e) => {
                    let fresh = entry.seen == 0;
                    drop(entry);
                    if fresh {
                        self.clients.remove_if(client, |_, c| c.seen == 0);
                    }
                    Err(e)
                }
            },
        }
    }

    /// Records a batch found in the WAL at start.
    pub fn observe(&self, client: &str, sequence: u64) {
        if client.is_empty() || client.len() > MAX_CLIENT_ID {
            return;
        }
        let mut entry = self.clients.entry(client.to_owned()).or_insert(Client::NEW);
        entry.mark(sequence);
        entry.seen = self.now();
        entry.dirty = true;
    }

    /// Forgets clients silent for longer than the window, then writes the
    /// state durably (the ledger splits this around a WAL sync).
    #[cfg(test)]
    pub fn save(&self) -> io::Result<()> {
        self.write(&self.snapshot())
    }

    /// Counts a flush, and returns what to write of the state as of now:
    /// a chunk of the clients accepted since the last one, or the whole
    /// file again once it has doubled (forgetting clients silent for longer
    /// than the window). Every sequence in it was appended to the WAL
    /// before this returns (a mark follows its append, under the client's
    /// lock).
    pub fn snapshot(&self) -> DedupWrite {
        let now = self.now.fetch_add(1, Relaxed).saturating_add(1);
        let oldest = now.saturating_sub(self.window);
        self.clients.retain(|_, c| c.seen >= oldest);
        let mut log = lock(&self.log_bytes);
        let mut chunk = format!("now {now}\n");
        let mut live = 0u64;
        for mut e in self.clients.iter_mut() {
            live += LINE + 2 * e.key().len() as u64;
            if e.dirty {
                e.dirty = false;
                line(&mut chunk, e.key(), e.value());
            }
        }
        let bound = live.saturating_mul(2).max(COMPACT_FLOOR);
        match *log {
            Some(bytes) if bytes.saturating_add(chunk.len() as u64) <= bound => {
                DedupWrite::Append(chunk)
            }
            _ => {
                let mut all = format!("tallyd-dedup 3\nnow {now}\n");
                for e in self.clients.iter() {
                    line(&mut all, e.key(), e.value());
                }
                // Until it is written, the next write rewrites too.
                *log = None;
                DedupWrite::Rewrite(all)
            }
        }
    }

    /// Writes a [`Dedup::snapshot`] durably: an append and its sync, or an
    /// atomic rewrite. A failure makes the next write a rewrite.
    pub fn write(&self, snapshot: &DedupWrite) -> io::Result<()> {
        let (text, rewrite) = match snapshot {
            DedupWrite::Append(chunk) => (chunk, false),
            DedupWrite::Rewrite(all) => (all, true),
        };
        let fs = self.fs.as_ref();
        crate::fs::write_log(fs, &self.path, text.as_bytes(), rewrite, &self.log_bytes)
    }

    /// A snapshot was taken but will not be written (the WAL sync before
    /// it failed): its clients must go into the next write.
    pub fn write_failed(&self) {
        *lock(&self.log_bytes) = None;
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

/// What a [`Dedup::snapshot`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupWrite {
    /// A chunk to append to the file.
    Append(String),
    /// The whole file again.
    Rewrite(String),
}

/// Bytes of a client's line beside its hex id (the high sequence, the
/// bitmap, the last seen count, separators).
const LINE: u64 = 20 + WORDS as u64 * 16 + 20 + 3;
/// A file smaller than this is never compacted.
const COMPACT_FLOOR: u64 = 64 << 10;

fn line(out: &mut String, id: &str, c: &Client) {
    use std::fmt::Write;
    out.push_str(&hex(id.as_bytes()));
    let _ = write!(out, " {} ", c.high);
    for w in c.bits {
        let _ = write!(out, "{w:016x}");
    }
    let _ = writeln!(out, " {}", c.seen);
}

/// Cuts a last line without its newline (a torn append) off `text` and the
/// file; returns the bytes kept.
fn cut_torn_tail(path: &Path, text: &mut String) -> io::Result<u64> {
    if !text.is_empty() && !text.ends_with('\n') {
        let keep = text.rfind('\n').map_or(0, |i| i + 1);
        tracing::warn!(file = %path.display(), cut = text.len() - keep, "cutting a torn append off the dedup file");
        text.truncate(keep);
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(text.len() as u64)
}

fn parse_line(line: &str, version: u32) -> Option<(String, Client)> {
    let f: Vec<&str> = line.split(' ').collect();
    match (version, f.as_slice()) {
        (0, [id, high, seen]) => Some((
            unhex(id)?,
            Client {
                high: high.parse().ok()?,
                bits: [u64::MAX; WORDS],
                seen: seen.parse().ok()?,
                dirty: false,
            },
        )),
        (1..=3, [id, high, bits, seen]) if bits.len() == WORDS * 16 => {
            let mut words = [0; WORDS];
            for (i, w) in words.iter_mut().enumerate() {
                *w = u64::from_str_radix(bits.get(i * 16..i * 16 + 16)?, 16).ok()?;
            }
            Some((
                unhex(id)?,
                Client {
                    high: high.parse().ok()?,
                    bits: words,
                    seen: seen.parse().ok()?,
                    dirty: false,
                },
            ))
        }
        _ => None,
    }
}

fn hex(s: &[u8]) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests;
