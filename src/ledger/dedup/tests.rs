//! Unit tests of [`super`].

use super::*;
use crate::fs::RealFs;

fn temp_dir() -> crate::test_dir::TestDir {
    crate::ledger::test_dir("dedup")
}

fn open(dir: &Path) -> Dedup {
    Dedup::open(dir, 60, Arc::new(RealFs)).expect("open")
}

fn ok() -> Result<(), ()> {
    Ok(())
}

#[test]
fn a_sequence_is_accepted_once() {
    let dir = temp_dir();
    let d = open(&dir);
    assert_eq!(d.admit("c", 1, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 1, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("c", 2, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 1, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("other", 1, ok), Ok(Admit::Accepted(())));
}

#[test]
fn out_of_order_sequences_are_each_accepted_once() {
    let dir = temp_dir();
    let d = open(&dir);
    for s in [5, 3, 9, 1, 4, 2, 8, 7, 6] {
        assert_eq!(d.admit("c", s, ok), Ok(Admit::Accepted(())), "seq {s}");
    }
    for s in 1..=9 {
        assert_eq!(d.admit("c", s, ok), Ok(Admit::Duplicate), "seq {s} again");
    }
}

#[test]
fn overloaded_then_later_seq_then_retry_counts_once() {
    let dir = temp_dir();
    let d = open(&dir);
    assert_eq!(d.admit("c", 6, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 7, || Err::<(), _>("full")), Err("full"));
    assert_eq!(d.admit("c", 8, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 7, ok), Ok(Admit::Accepted(())), "the retry");
    assert_eq!(d.admit("c", 7, ok), Ok(Admit::Duplicate));
}

#[test]
fn below_the_window_is_refused_not_called_a_duplicate() {
    let dir = temp_dir();
    let d = open(&dir);
    assert_eq!(d.admit("c", 10, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 10 + WINDOW, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 10, ok), Ok(Admit::TooOld));
    assert_eq!(d.admit("c", 11, ok), Ok(Admit::Accepted(())), "at the edge");
    assert_eq!(d.admit("c", 11, ok), Ok(Admit::Duplicate));
}

#[test]
fn the_window_slides_by_any_amount() {
    let dir = temp_dir();
    let d = open(&dir);
    let mut accepted = Vec::new();
    let mut seq = 0u64;
    for step in [1u64, 63, 64, 65, 1, 130, 7, 1000, 3, 5000] {
        seq += step;
        assert_eq!(d.admit("c", seq, ok), Ok(Admit::Accepted(())));
        accepted.push(seq);
        for &a in &accepted {
            let want = if seq - a < WINDOW {
                Admit::Duplicate
            } else {
                Admit::TooOld
            };
            assert_eq!(d.admit("c", a, ok), Ok(want), "seq {a} after {seq}");
        }
    }
}

#[test]
fn a_full_client_table_forgets_the_least_recently_seen() {
    let dir = temp_dir();
    let d = open(&dir).with_max_clients(20);
    for c in 0..20 {
        d.observe(&format!("c{c}"), 1);
        d.clients.alter(&format!("c{c}"), |_, mut cl| {
            cl.seen = 1000 + c;
            cl
        });
    }
    assert_eq!(d.admit("new", 1, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.clients(), 19, "the oldest tenth (and ties) went");
    assert_eq!(
        d.admit("c0", 1, ok),
        Ok(Admit::Accepted(())),
        "c0 was forgotten"
    );
    assert_eq!(d.admit("c19", 1, ok), Ok(Admit::Duplicate), "c19 was kept");
}

#[test]
fn a_flood_of_new_clients_in_one_flush_forgets_a_tenth_not_all() {
    let dir = temp_dir();
    let d = open(&dir).with_max_clients(1000);
    // Every client seen at the same flush count, as in a flood.
    for c in 0..5000 {
        assert_eq!(d.admit(&format!("c{c}"), 1, ok), Ok(Admit::Accepted(())));
        // Once full, the table stays between nine tenths and its cap,
        // never emptied.
        let n = d.clients();
        assert!(n <= 1000 && (c < 999 || n >= 900), "{n} clients at c{c}");
    }
    assert_eq!(d.admit("c4999", 1, ok), Ok(Admit::Duplicate));
}

#[test]
fn sequence_zero_is_a_valid_first_batch() {
    let dir = temp_dir();
    let d = open(&dir);
    assert_eq!(d.admit("c", 0, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("c", 0, ok), Ok(Admit::Duplicate));
}

#[test]
fn a_failed_accept_records_nothing() {
    let dir = temp_dir();
    let d = open(&dir);
    assert_eq!(d.admit("c", 1, || Err::<(), _>("full")), Err("full"));
    assert_eq!(d.clients(), 0);
    assert_eq!(d.admit("c", 1, ok), Ok(Admit::Accepted(())));
}

#[test]
fn empty_client_id_is_never_deduplicated_and_long_ones_are_refused() {
    let dir = temp_dir();
    let d = open(&dir);
    assert_eq!(d.admit("", 1, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("", 1, ok), Ok(Admit::Accepted(())));
    let long = "x".repeat(MAX_CLIENT_ID + 1);
    assert_eq!(d.admit(&long, 1, ok), Ok(Admit::BadClientId));
    assert_eq!(d.clients(), 0);
}

#[test]
fn state_survives_a_restart() {
    let dir = temp_dir();
    let d = open(&dir);
    d.admit("shipper 1\n", 41, ok).expect("admit");
    d.admit("shipper 1\n", 43, ok).expect("admit");
    d.observe("replayed", 9);
    d.save().expect("save");
    let d = open(&dir);
    assert_eq!(d.admit("shipper 1\n", 41, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("shipper 1\n", 43, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("shipper 1\n", 42, ok), Ok(Admit::Accepted(())));
    assert_eq!(d.admit("replayed", 9, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("replayed", 10, ok), Ok(Admit::Accepted(())));
}

#[test]
fn a_version_0_file_is_read() {
    let dir = temp_dir();
    let line = format!("{} 5 1700000000\n", hex(b"old"));
    std::fs::write(dir.join("dedup"), line).expect("write");
    let d = open(&dir);
    assert_eq!(d.admit("old", 5, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("old", 4, ok), Ok(Admit::Duplicate));
    assert_eq!(d.admit("old", 6, ok), Ok(Admit::Accepted(())));
}

#[test]
fn silent_clients_are_forgotten_after_the_window_counted_in_flushes() {
    let dir = temp_dir();
    let d = Dedup::open(&dir, 3, Arc::new(RealFs)).expect("open");
    assert_eq!(d.admit("quiet", 1, ok), Ok(Admit::Accepted(())));
    for _ in 0..3 {
        d.save().expect("save");
        assert_eq!(d.admit("busy", d.now(), ok), Ok(Admit::Accepted(())));
    }
    assert_eq!(d.clients(), 2, "within the window");
    d.save().expect("save");
    assert_eq!(d.clients(), 1, "the quiet client is forgotten");
    // The count carries over a restart: the busy client is kept.
    let again = Dedup::open(&dir, 3, Arc::new(RealFs)).expect("reopen");
    assert_eq!(again.now(), d.now());
    assert_eq!(again.admit("busy", 4, ok), Ok(Admit::Duplicate));
}

#[test]
fn each_write_appends_the_changed_clients_and_the_file_is_rewritten_once_it_doubles() {
    let dir = temp_dir();
    let d = Dedup::open(&dir, 1_000_000, Arc::new(RealFs)).expect("open");
    for c in 0..300 {
        assert_eq!(d.admit(&format!("c{c}"), 1, ok), Ok(Admit::Accepted(())));
    }
    d.save().expect("the first write is whole");
    let whole = std::fs::metadata(dir.join("dedup")).expect("meta").len();
    let mut appends = 0;
    for flush in 0..2_000u64 {
        let client = format!("c{}", flush % 300);
        assert_eq!(d.admit(&client, flush + 2, ok), Ok(Admit::Accepted(())));
        let w = d.snapshot();
        if let DedupWrite::Append(chunk) = &w {
            appends += 1;
            assert_eq!(chunk.lines().count(), 2, "the count and the one client");
        }
        d.write(&w).expect("write");
        let len = std::fs::metadata(dir.join("dedup")).expect("meta").len();
        assert!(len <= 2 * whole + COMPACT_FLOOR + 1024, "{len} bytes");
    }
    assert!(appends > 1_500, "mostly appends: {appends}");
    let again = Dedup::open(&dir, 1_000_000, Arc::new(RealFs)).expect("reopen");
    assert_eq!(again.clients(), 300);
    assert_eq!(again.now(), d.now());
    for flush in 1_700..2_000u64 {
        let client = format!("c{}", flush % 300);
        assert_eq!(
            again.admit(&client, flush + 2, ok),
            Ok(Admit::Duplicate),
            "{client}"
        );
    }
}

#[test]
fn a_torn_append_is_cut_and_a_failed_write_makes_the_next_one_whole() {
    let dir = temp_dir();
    let d = Dedup::open(&dir, 100, Arc::new(RealFs)).expect("open");
    assert_eq!(d.admit("a", 1, ok), Ok(Admit::Accepted(())));
    d.save().expect("save");
    assert_eq!(d.admit("b", 1, ok), Ok(Admit::Accepted(())));
    d.save().expect("append");
    // A crash mid-append leaves half a line.
    let path = dir.join("dedup");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.extend_from_slice(b"now 9\n6363 5 00");
    std::fs::write(&path, &bytes).expect("write");
    let again = Dedup::open(&dir, 100, Arc::new(RealFs)).expect("a torn tail is cut");
    assert_eq!(again.clients(), 2);
    assert!(std::fs::read(&path).expect("read").ends_with(b"\n"));
    assert_eq!(again.admit("c", 1, ok), Ok(Admit::Accepted(())));
    let _lost = again.snapshot();
    again.write_failed();
    assert!(
        matches!(again.snapshot(), DedupWrite::Rewrite(_)),
        "after a failure, whole"
    );
}

#[test]
fn a_version_1_file_is_read_as_seen_at_the_start() {
    let dir = temp_dir();
    let bits = "0".repeat(WORDS * 16);
    let line = format!("tallyd-dedup 1\n{} 5 {bits} 1700000000\n", hex(b"old"));
    std::fs::write(dir.join("dedup"), line).expect("write");
    let d = Dedup::open(&dir, 2, Arc::new(RealFs)).expect("open");
    assert_eq!(d.clients(), 1);
    d.save().expect("save");
    assert_eq!(d.clients(), 1, "kept for a window from the start");
}
