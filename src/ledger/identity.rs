//! The instance identity and flush ids.
//!
//! An *instance* is a data dir: at its first start tallyd draws a random
//! 64-bit instance id and keeps it in `<data_dir>/instance`. The id (not the
//! configured host, which a recreated container may change) is what makes a
//! flush's identity: its spool file carries it, and a replay re-sends the
//! flush under the identity it was recorded with.
//!
//! A flush id is `tick << 20 | tag` ([`crate::outbox::flush::flush_id`]):
//! `tag` is the low 20 bits of the instance id, so two instances that share
//! a `host_id` (two daemons on one host, or a copied config) draw different
//! ids unless their tags collide (one chance in 2^20 per pair; give them
//! distinct `host_id`s to be sure); `tick` is the wall clock in units of
//! 2^10 µs (1.024 ms), forced strictly above the last tick this instance
//! used, so ids (and the gauge versions made from them) grow across
//! restarts even if the clock steps back. Releases before this one counted
//! ticks of 2^20 µs; their ids are below every id drawn now.
//!
//! The file is not written for every flush: it *reserves* ids a block at a
//! time (2^16 ticks, about 67 s at one flush a second). A flush whose id is
//! past the reservation saves the file first, with a new one; a restart
//! draws above the reservation, so no id is issued twice.
//!
//! A data dir copied to another machine (a golden image, a VM clone, a
//! restored backup) gets a new instance id there for its new flushes: the
//! file remembers the machine (`/etc/machine-id`) it was made on. Flushes
//! recorded before keep the identity they were recorded with.
//!
//! # The `instance` file, version 2 (text, written atomically)
//!
//! ```text
//! tallyd-instance 2
//! <instance id, 16 hex digits>
//! <reserved: flush ids up to this may have been issued, decimal>
//! <machine id, or - when unknown>
//! ```
//!
//! Version 1 has the first three lines, the third being the last id
//! issued; its machine is taken to be this one.
//!
//! Before version 1, tallyd kept only the last flush id, in `flush_id`; it is
//! read (an empty or damaged one is ignored with a warning) so that ids keep
//! growing over an upgrade.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fs::{Fs, read_optional};
use crate::outbox::flush::{TAG_BITS, flush_id, tick_of};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance: u64,
    /// The last flush id issued.
    pub last: u64,
    /// Ids up to this may have been issued: what the file holds.
    reserved: u64,
    /// The machine the data dir is on, "" when unknown.
    machine: String,
    path: PathBuf,
}

/// 2400-01-01, Unix time: a clock beyond it is broken.
const SANE_CLOCK_LIMIT: Duration = Duration::from_secs(13_569_465_600);

/// Ticks reserved per save of the file (about 67 s).
const RESERVE_TICKS: u64 = 1 << 16;

/// The machine's id (`/etc/machine-id`, trimmed), "" when there is none.
pub fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Identity {
    /// Reads `<data_dir>/instance`, or makes a new identity (not yet saved).
    /// On another machine than the file names, draws a new instance id.
    pub fn open(data_dir: &Path, machine: &str) -> io::Result<Identity> {
        let path = data_dir.join("instance");
        let legacy = legacy_last(data_dir);
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let Some(bytes) = read_optional(&path)? else {
            return Ok(Identity {
                instance: random_id(),
                last: legacy,
                reserved: legacy,
                machine: machine.to_owned(),
                path,
            });
        };
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let mut lines = text.lines();
        let version = match lines.next() {
            Some("tallyd-instance 1") => 1,
            Some("tallyd-instance 2") => 2,
            _ => return Err(bad("not a version 1 or 2 instance file")),
        };
        let mut instance = lines
            .next()
            .and_then(|l| u64::from_str_radix(l, 16).ok())
            .ok_or_else(|| bad("bad instance id"))?;
        let reserved = lines
            .next()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or_else(|| bad("bad reserved flush id"))?
            .max(legacy);
        let recorded = match (version, lines.next()) {
            (1, _) => "",
            (_, Some("-")) => "",
            (_, Some(m)) => m,
            (_, None) => return Err(bad("no machine id")),
        };
        if !recorded.is_empty() && !machine.is_empty() && recorded != machine {
            instance = random_id();
            tracing::warn!(file = %path.display(), "this data dir was made on another machine (its machine id differs): new flushes get a new instance id");
        }
        Ok(Identity {
            instance,
            last: reserved,
            reserved,
            machine: machine.to_owned(),
            path,
        })
    }

    /// The next flush id (see the module doc). Does no I/O: before the id
    /// is used, [`Identity::wanted`] says whether the file must be saved.
    pub fn next(&mut self, now: Duration) -> u64 {
        // A clock reading past 2400 (a bad RTC) is not taken: ids drawn
        // from it would reach the top of the id space and stick there.
        let now = if now > SANE_CLOCK_LIMIT {
            Duration::ZERO
        } else {
            now
        };
        let tick = tick_of(now).max((self.last >> TAG_BITS).saturating_add(1));
        let id = flush_id(tick, self.instance);
        self.last = id;
        id
    }

    /// The reservation to save before the last id issued is used, if it
    /// is past the saved one.
    pub fn wanted(&self) -> Option<u64> {
        (self.last > self.reserved).then(|| {
            flush_id(
                (self.last >> TAG_BITS).saturating_add(RESERVE_TICKS),
                self.instance,
            )
        })
    }

    /// Saves the file with `reserved` (at least the last id issued).
    pub fn save_reserved(&mut self, fs: &dyn Fs, reserved: u64) -> io::Result<()> {
        let reserved = reserved.max(self.last).max(self.reserved);
        fs.write_atomic(&self.path, self.encode(reserved).as_bytes())?;
        self.reserved = reserved;
        Ok(())
    }

    /// Notes that the file holds `reserved` now (saved by a copy).
    pub fn save_reserved_in_memory(&mut self, reserved: u64) {
        self.reserved = self.reserved.max(reserved);
    }

    /// Saves the file as it is (at start: a new machine or format).
    pub fn save(&mut self, fs: &dyn Fs) -> io::Result<()> {
        self.save_reserved(fs, self.reserved)
    }

    fn encode(&self, reserved: u64) -> String {
        let machine = if self.machine.is_empty() {
            "-"
        } else {
            &self.machine
        };
        format!(
            "tallyd-instance 2\n{:016x}\n{reserved}\n{machine}\n",
            self.instance
        )
    }
}

/// The last id of the pre-version-1 `flush_id` file (0 when absent or unreadable).
fn legacy_last(data_dir: &Path) -> u64 {
    let path = data_dir.join("flush_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(file = %path.display(), "ignoring an unreadable legacy flush id file");
            0
        }),
        Err(_) => 0,
    }
}

/// 64 random bits from the OS's hasher seeds, the clock and the pid.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(crate::clock::wall_clock().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::RealFs;

    fn temp_dir() -> crate::test_dir::TestDir {
        crate::ledger::test_dir("identity")
    }

    #[test]
    fn the_instance_id_persists_and_ids_grow_even_if_the_clock_steps_back() {
        let dir = temp_dir();
        let mut a = Identity::open(&dir, "m").expect("open");
        let first = a.next(Duration::from_secs(100));
        assert_eq!(first >> TAG_BITS, 100_000_000 >> 10);
        let tag = (1 << TAG_BITS) - 1;
        assert_eq!(first & tag, a.instance & tag);
        let wanted = a.wanted().expect("past the reservation");
        a.save_reserved(&RealFs, wanted).expect("save");
        assert_eq!(a.wanted(), None, "within the reservation");
        let mut b = Identity::open(&dir, "m").expect("reopen");
        assert_eq!(b.instance, a.instance);
        let second = b.next(Duration::from_secs(50));
        assert!(second > wanted, "a restart draws above the reservation");
        assert_eq!(
            b.next(Duration::from_secs(50)) >> TAG_BITS,
            (second >> TAG_BITS) + 1
        );
    }

    #[test]
    fn a_data_dir_on_another_machine_gets_a_new_instance_and_ids_still_grow() {
        let dir = temp_dir();
        let mut a = Identity::open(&dir, "machine-a").expect("open");
        let id = a.next(Duration::from_secs(1_700_000_000));
        a.save_reserved(&RealFs, a.wanted().expect("wanted"))
            .expect("save");
        let same = Identity::open(&dir, "machine-a").expect("same machine");
        assert_eq!(same.instance, a.instance);
        let mut clone = Identity::open(&dir, "machine-b").expect("a clone");
        assert_ne!(clone.instance, a.instance);
        assert!(clone.next(Duration::from_secs(1_700_000_000)) > id);
        std::fs::write(
            dir.join("instance"),
            format!("tallyd-instance 1\n{:016x}\n{id}\n", a.instance),
        )
        .expect("version 1");
        let upgraded = Identity::open(&dir, "machine-b").expect("version 1 reads");
        assert_eq!(upgraded.instance, a.instance, "version 1 names no machine");
        assert_eq!(upgraded.last, id);
    }

    #[test]
    fn a_flush_a_second_keeps_ids_with_the_clock() {
        let mut a = Identity::open(&temp_dir(), "").expect("open");
        let start = Duration::from_secs(1_700_000_000);
        let first = a.next(start);
        let mut last = first;
        for s in 1..=86_400 {
            last = a.next(start + Duration::from_secs(s));
        }
        let drift_ms = ((last >> TAG_BITS) - (first >> TAG_BITS)) * 1024 / 1000;
        assert!(
            (86_400_000..=86_400_100).contains(&drift_ms),
            "a day of 1 s flushes spans {drift_ms} ms of ids"
        );
    }

    #[test]
    fn two_instances_draw_different_ids_at_the_same_instant() {
        let (dir_a, dir_b) = (temp_dir(), temp_dir());
        let (mut a, mut b) = (
            Identity::open(&dir_a, "m").expect("a"),
            Identity::open(&dir_b, "m").expect("b"),
        );
        assert_ne!(a.instance, b.instance);
        let now = Duration::from_secs(1_700_000_000);
        assert_ne!(a.next(now), b.next(now));
    }

    #[test]
    fn legacy_flush_id_keeps_ids_growing_and_an_empty_one_is_ignored() {
        let dir = temp_dir();
        std::fs::write(dir.join("flush_id"), "1700000000000000\n").expect("write");
        let mut i = Identity::open(&dir, "m").expect("open");
        assert!(i.next(Duration::from_secs(1)) > 1_700_000_000_000_000);
        std::fs::write(dir.join("flush_id"), "").expect("torn by a power loss");
        assert_eq!(Identity::open(&dir, "m").expect("starts").last, 0);
    }

    #[test]
    fn a_damaged_instance_file_is_an_error_naming_it() {
        let dir = temp_dir();
        std::fs::write(dir.join("instance"), "garbage").expect("write");
        let e = Identity::open(&dir, "m").expect_err("refused");
        assert!(e.to_string().contains("instance"), "{e}");
    }
}
