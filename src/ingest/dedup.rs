//! Idempotent protobuf batches: `(client_id, sequence)` is accepted once.
//!
//! Per client, tallyd keeps the highest sequence it accepted; a batch at or
//! below it is a duplicate. The check, the WAL append and the apply run
//! under the client's entry lock, so one client on two connections cannot
//! race itself.
//!
//! Across restarts: the state is saved to `<data_dir>/dedup` (atomic
//! rename) before the WAL releases any record, so every accepted batch is
//! either in the saved state or still in the WAL, whose replay feeds
//! [`Dedup::observe`]. The window: a client is remembered for `window`
//! (default 24 h) after its last batch; a client silent for longer starts
//! over. An empty `client_id` opts out of deduplication.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dashmap::DashMap;

#[derive(Debug, Clone, Copy)]
struct Client {
    sequence: u64,
    /// Unix seconds of the last accepted batch.
    seen: u64,
}

pub struct Dedup {
    clients: DashMap<String, Client>,
    path: PathBuf,
    window: Duration,
}

fn now_secs() -> u64 {
    crate::aggregate::wall_clock().as_secs()
}

impl Dedup {
    /// Loads the saved state from `data_dir/dedup` (none is fine).
    pub fn open(data_dir: &Path, window: Duration) -> io::Result<Dedup> {
        let path = data_dir.join("dedup");
        let clients = DashMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    let f: Vec<&str> = line.split(' ').collect();
                    let parsed = match f.as_slice() {
                        [id, seq, seen] => unhex(id).zip(seq.parse().ok()).zip(seen.parse().ok()),
                        _ => None,
                    };
                    let Some(((id, sequence), seen)) = parsed else {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: bad line {line:?}", path.display()),
                        ));
                    };
                    clients.insert(id, Client { sequence, seen });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Dedup {
            clients,
            path,
            window,
        })
    }

    /// Runs `accept` unless `(client, sequence)` was accepted before; then
    /// returns `Ok(None)`. The sequence is recorded only when `accept`
    /// succeeds.
    pub fn admit<R, E>(
        &self,
        client: &str,
        sequence: u64,
        accept: impl FnOnce() -> Result<R, E>,
    ) -> Result<Option<R>, E> {
        if client.is_empty() {
            return accept().map(Some);
        }
        let mut entry = self.clients.entry(client.to_owned()).or_insert(Client {
            sequence: 0,
            seen: 0,
        });
        if entry.seen != 0 && sequence <= entry.sequence {
            return Ok(None);
        }
        let result = accept()?;
        *entry = Client {
            sequence,
            seen: now_secs(),
        };
        Ok(Some(result))
    }

    /// Records a batch found in the WAL at start.
    pub fn observe(&self, client: &str, sequence: u64) {
        if client.is_empty() {
            return;
        }
        let mut entry = self.clients.entry(client.to_owned()).or_insert(Client {
            sequence,
            seen: now_secs(),
        });
        if sequence > entry.sequence {
            entry.sequence = sequence;
        }
        entry.seen = now_secs();
    }

    /// Forgets clients silent for longer than the window, then writes the
    /// state durably.
    pub fn save(&self) -> io::Result<()> {
        let oldest = now_secs().saturating_sub(self.window.as_secs());
        self.clients.retain(|_, c| c.seen == 0 || c.seen >= oldest);
        let mut text = String::new();
        for e in self.clients.iter() {
            if e.seen != 0 {
                text.push_str(&format!("{} {} {}\n", hex(e.key()), e.sequence, e.seen));
            }
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
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
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tallyd-dedup-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn ok() -> Result<(), ()> {
        Ok(())
    }

    #[test]
    fn a_sequence_is_accepted_once() {
        let d = Dedup::open(&temp_dir(), Duration::from_secs(60)).expect("open");
        assert_eq!(d.admit("c", 1, ok), Ok(Some(())));
        assert_eq!(d.admit("c", 1, ok), Ok(None));
        assert_eq!(d.admit("c", 2, ok), Ok(Some(())));
        assert_eq!(d.admit("c", 1, ok), Ok(None), "older than the highest");
        assert_eq!(d.admit("other", 1, ok), Ok(Some(())));
    }

    #[test]
    fn sequence_zero_is_a_valid_first_batch() {
        let d = Dedup::open(&temp_dir(), Duration::from_secs(60)).expect("open");
        assert_eq!(d.admit("c", 0, ok), Ok(Some(())));
        assert_eq!(d.admit("c", 0, ok), Ok(None));
    }

    #[test]
    fn a_failed_accept_records_nothing() {
        let d = Dedup::open(&temp_dir(), Duration::from_secs(60)).expect("open");
        assert_eq!(d.admit("c", 1, || Err::<(), _>("full")), Err("full"));
        assert_eq!(d.admit("c", 1, ok), Ok(Some(())));
    }

    #[test]
    fn empty_client_id_is_never_deduplicated() {
        let d = Dedup::open(&temp_dir(), Duration::from_secs(60)).expect("open");
        assert_eq!(d.admit("", 1, ok), Ok(Some(())));
        assert_eq!(d.admit("", 1, ok), Ok(Some(())));
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = temp_dir();
        let d = Dedup::open(&dir, Duration::from_secs(60)).expect("open");
        d.admit("shipper 1\n", 41, ok).expect("admit");
        d.observe("replayed", 9);
        d.save().expect("save");
        let d = Dedup::open(&dir, Duration::from_secs(60)).expect("reopen");
        assert_eq!(d.admit("shipper 1\n", 41, ok), Ok(None));
        assert_eq!(d.admit("replayed", 9, ok), Ok(None));
        assert_eq!(d.admit("replayed", 10, ok), Ok(Some(())));
    }

    #[test]
    fn silent_clients_are_forgotten_after_the_window() {
        let dir = temp_dir();
        std::fs::write(
            dir.join("dedup"),
            format!("{} 5 {}\n", hex("old"), now_secs() - 7200),
        )
        .expect("write");
        let d = Dedup::open(&dir, Duration::from_secs(3600)).expect("open");
        assert_eq!(d.clients(), 1);
        d.save().expect("save");
        assert_eq!(d.clients(), 0);
    }
}
