//! Unit tests of [`super`].

use super::*;
use crate::outbox::rows::{Batch, CounterRow};

/// A ledger in `dir` with a spool budget of `budget` bytes.
fn open(dir: &Path, budget: u64, fs: Arc<dyn Fs>) -> (Ledger, Recovered) {
    Ledger::open(dir, 60, 10, budget, fs).expect("open")
}

fn counter_flush(ledger: &Ledger, flush_id: u64, value: f64) -> Arc<Flush> {
    let batch = Batch {
        flush_id,
        ts: 100,
        host: "h".into(),
        counters: vec![CounterRow {
            ts: 100,
            name: "c".into(),
            tags: vec![],
            host: "h".into(),
            flush_id,
            value,
            samples: 1,
        }],
        ..Batch::default()
    };
    Arc::new(Flush::seal(batch, ledger.instance()))
}

fn total(flush: &Flush) -> f64 {
    let rows = crate::outbox::rowbinary::decode(&flush.tables).expect("decodes");
    rows.counters.iter().map(|r| r.value).sum()
}

#[test]
fn over_budget_a_new_flush_absorbs_the_newest_parked_one_even_if_gauges_fail() {
    let dir = test_dir("ledger-merge");
    let fs = Arc::new(crate::fs::FaultyFs::default());
    let (ledger, _) = open(&dir, 1, fs.clone());
    let now = Duration::from_secs(1_700_000_000);
    let a = ledger.next_flush_id(now);
    let (first, merged) = ledger
        .record(counter_flush(&ledger, a, 2.0), None)
        .expect("a");
    assert!(!merged);
    ledger.park(first.flush_id);
    fs.arm("gauges", crate::fs::Fault::NoSpace);
    let b = ledger.next_flush_id(now);
    let (second, merged) = ledger
        .record(
            counter_flush(&ledger, b, 3.0),
            Some(&GaugesWrite::Rewrite(b"g".to_vec())),
        )
        .expect("recorded although the gauges file failed");
    assert!(merged);
    assert_eq!((second.flush_id, second.absorbed.clone()), (b, vec![a]));
    assert_eq!(total(&ledger.read(b).expect("read")), 5.0);
    assert!(ledger.read(a).is_err(), "the absorbed file is gone");
    assert_eq!(
        ledger.take_parked(),
        None,
        "the merged one is for the caller to park"
    );
}

#[test]
fn over_budget_a_damaged_newest_parked_file_is_quarantined_and_the_new_flush_recorded_alone() {
    let dir = test_dir("ledger-merge-damaged");
    let (ledger, _) = open(&dir, 1, Arc::new(crate::fs::RealFs));
    let now = Duration::from_secs(1_700_000_000);
    let a = ledger.next_flush_id(now);
    let (first, _) = ledger
        .record(counter_flush(&ledger, a, 2.0), None)
        .expect("a");
    ledger.park(first.flush_id);
    let path = spool::path(&spool::dir(&dir), a);
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).expect("damage it");
    let b = ledger.next_flush_id(now);
    let (second, merged) = ledger
        .record(counter_flush(&ledger, b, 3.0), None)
        .expect("recorded: a damaged tail must not hold the flush");
    assert!(!merged);
    assert_eq!(second.absorbed, Vec::<u64>::new());
    assert_eq!(total(&ledger.read(b).expect("read")), 3.0);
    assert_eq!(ledger.quarantined().len(), 1, "{:?}", ledger.quarantined());
    assert!(
        path.with_file_name(format!("{a:020}.flush.damaged"))
            .exists()
    );
    assert_eq!(ledger.backlog().0, 1, "the damaged flush is forgotten");
    assert_eq!(ledger.take_parked(), None);
}

#[test]
fn a_damaged_state_file_of_each_kind_is_quarantined_and_the_ledger_opens() {
    let dir = test_dir("ledger-damaged-state");
    let (ledger, _) = open(&dir, 1 << 30, Arc::new(crate::fs::RealFs));
    let now = Duration::from_secs(1_700_000_000);
    let a = ledger.next_flush_id(now);
    ledger
        .record(
            counter_flush(&ledger, a, 2.0),
            Some(&GaugesWrite::Append(b"x".to_vec())),
        )
        .expect("a");
    ledger.release(1).expect("release");
    drop(ledger);
    for file in ["instance", "gauges", "gauges.log", "dedup"] {
        std::fs::write(dir.join(file), b"\x00garbage").expect("damage");
    }
    let (ledger, recovered) = open(&dir, 1 << 30, Arc::new(crate::fs::RealFs));
    let q = ledger.quarantined();
    assert_eq!(q.len(), 4, "{q:?}");
    for file in ["instance", "gauges", "gauges.log", "dedup"] {
        assert!(dir.join(format!("{file}.damaged")).exists(), "{file}");
        assert!(
            q.iter().any(|m| m.contains(&format!("{file}.damaged"))),
            "{q:?}"
        );
    }
    assert_eq!(recovered.flushes.len(), 1, "the spool is still read");
    assert!(
        ledger.next_flush_id(now) > a,
        "flush ids still grow past the spool's"
    );
}

#[test]
fn a_flush_under_an_id_from_before_the_start_is_never_merged() {
    let dir = test_dir("ledger-old-id");
    let (ledger, _) = open(&dir, 1, Arc::new(crate::fs::RealFs));
    let (old, merged) = ledger
        .record(counter_flush(&ledger, 0, 2.0), None)
        .expect("old");
    assert!(!merged, "an old id merges nothing");
    ledger.park(old.flush_id);
    let b = ledger.next_flush_id(Duration::from_secs(1_700_000_000));
    let (_, merged) = ledger
        .record(counter_flush(&ledger, b, 3.0), None)
        .expect("b");
    assert!(!merged, "nothing merges into an old id");
    assert_eq!(
        ledger.take_parked(),
        Some(Taken {
            ids: vec![0],
            earlier: true
        })
    );
}

#[test]
fn a_drain_joins_parked_flushes_of_this_run_into_one_and_keeps_earlier_ones_apart() {
    let dir = test_dir("ledger-join");
    let fs = Arc::new(crate::fs::FaultyFs::default());
    let (ledger, _) = open(&dir, 1 << 30, fs.clone());
    let (old, _) = ledger
        .record(counter_flush(&ledger, 0, 1.0), None)
        .expect("old");
    ledger.park(old.flush_id);
    let now = Duration::from_secs(1_700_000_000);
    let mut ids = vec![];
    for v in [2.0, 3.0, 4.0] {
        let id = ledger.next_flush_id(now);
        let (f, _) = ledger
            .record(counter_flush(&ledger, id, v), None)
            .expect("record");
        ledger.park(f.flush_id);
        ids.push(id);
    }
    let earlier = ledger.take_parked().expect("the old one");
    assert_eq!(earlier.ids, vec![0], "an earlier run's flush goes alone");
    let taken = ledger.take_parked().expect("the rest");
    assert_eq!(taken.ids, ids);
    assert!(ledger.take_parked().is_none());
    fs.arm("spool", crate::fs::Fault::NoSpace);
    let (alone, spooled) = ledger.read_taken(&taken).expect("the first, alone");
    assert!(spooled.is_some(), "to be sent from its file");
    let alone = ledger.read(alone.flush_id).expect("on disk");
    assert_eq!((alone.flush_id, total(&alone)), (ids[0], 2.0));
    fs.heal();
    assert_eq!(
        ledger.take_parked().map(|t| t.ids),
        Some(ids[1..].to_vec()),
        "the others are parked again"
    );
    let (head, spooled) = ledger
        .read_taken(&Taken {
            ids: ids.clone(),
            earlier: false,
        })
        .expect("joined");
    assert_eq!(head.flush_id, ids[2]);
    let joined = ledger.read(ids[2]).expect("on disk");
    assert_eq!((head.body_len(), spooled), (0, Some(joined.body_ranges())));
    assert_eq!(joined.absorbed, ids[..2].to_vec());
    assert_eq!(total(&joined), 9.0);
    assert!(ledger.read(ids[0]).is_err() && ledger.read(ids[1]).is_err());
    let (flushes, rows, _) = ledger.backlog();
    assert_eq!((flushes, rows), (2, 4), "the old one and the joined one");
}

#[test]
fn after_a_restart_a_sent_flush_stays_apart_and_an_unsent_one_is_merged() {
    let dir = test_dir("ledger-sent");
    let now = Duration::from_secs(1_700_000_000);
    let (a, b) = {
        let (ledger, _) = open(&dir, 1, Arc::new(crate::fs::RealFs));
        let a = ledger.next_flush_id(now);
        let (fa, _) = ledger
            .record(counter_flush(&ledger, a, 2.0), None)
            .expect("a");
        ledger.park(fa.flush_id);
        ledger.sending(a).expect("marker");
        let b = ledger.next_flush_id(now);
        let (fb, merged) = ledger
            .record(counter_flush(&ledger, b, 3.0), None)
            .expect("b");
        assert!(!merged, "a was sent: nothing merges into it");
        ledger.park(fb.flush_id);
        (a, b)
    };
    let (ledger, recovered) = open(&dir, 1, Arc::new(crate::fs::RealFs));
    assert_eq!(
        recovered
            .flushes
            .iter()
            .map(|f| (f.flush_id, f.sent))
            .collect::<Vec<_>>(),
        vec![(a, true), (b, false)]
    );
    ledger.park_recovered();
    let c = ledger.next_flush_id(now);
    let (fc, merged) = ledger
        .record(counter_flush(&ledger, c, 4.0), None)
        .expect("c");
    assert!(merged, "b was never sent: the new flush absorbs it");
    assert_eq!((fc.absorbed.clone(), total(&fc)), (vec![b], 7.0));
    ledger.park(c);
    assert_eq!(
        ledger.take_parked(),
        Some(Taken {
            ids: vec![a],
            earlier: true
        })
    );
    assert_eq!(
        ledger.take_parked(),
        Some(Taken {
            ids: vec![c],
            earlier: false
        })
    );
    ledger.complete(a).expect("complete");
    assert!(
        !spool::sent_path(&ledger.spool_dir, a).exists(),
        "the marker goes with the flush"
    );
}

#[test]
fn a_flush_under_an_old_id_is_marked_sent_when_recorded() {
    let dir = test_dir("ledger-old-marked");
    let (ledger, _) = open(&dir, 1 << 30, Arc::new(crate::fs::RealFs));
    ledger
        .record(counter_flush(&ledger, 0, 2.0), None)
        .expect("old");
    assert!(spool::sent_path(&ledger.spool_dir, 0).exists());
    drop(ledger);
    let (_, recovered) = open(&dir, 1 << 30, Arc::new(crate::fs::RealFs));
    assert!(recovered.flushes[0].sent, "never merged after a restart");
}

#[test]
fn a_drain_joins_one_host_at_a_time() {
    let dir = test_dir("ledger-join-hosts");
    let (ledger, _) = open(&dir, 1 << 30, Arc::new(crate::fs::RealFs));
    let now = Duration::from_secs(1_700_000_000);
    for host in ["a", "a", "b"] {
        let id = ledger.next_flush_id(now);
        let mut f = (*counter_flush(&ledger, id, 1.0)).clone();
        f.host = host.into();
        let (f, _) = ledger.record(Arc::new(f), None).expect("record");
        ledger.park(f.flush_id);
    }
    assert_eq!(ledger.take_parked().map(|t| t.ids.len()), Some(2));
    assert_eq!(ledger.take_parked().map(|t| t.ids.len()), Some(1));
}

#[test]
fn a_drain_batch_smaller_than_one_flush_takes_one() {
    let dir = test_dir("ledger-join-small");
    let (ledger, _) = open(&dir, 1 << 30, Arc::new(crate::fs::RealFs));
    let ledger = ledger.with_drain_batch(1);
    let now = Duration::from_secs(1_700_000_000);
    for v in [2.0, 3.0] {
        let id = ledger.next_flush_id(now);
        let (f, _) = ledger
            .record(counter_flush(&ledger, id, v), None)
            .expect("record");
        ledger.park(f.flush_id);
    }
    assert_eq!(ledger.take_parked().map(|t| t.ids.len()), Some(1));
    assert_eq!(ledger.take_parked().map(|t| t.ids.len()), Some(1));
}

#[test]
fn the_gauges_file_round_trips_and_damage_is_caught() {
    let entries: Vec<(&[u8], f64)> = vec![(b"\x02a", 1.5), (b"\x02bb", -3.0)];
    let mut b = crate::outbox::gauges::encode(7, entries.iter().copied());
    let (as_of, back) = crate::outbox::gauges::decode(&b).expect("decodes");
    assert_eq!(as_of, 7);
    assert_eq!(back.len(), 2);
    assert_eq!((&*back[1].0, back[1].1), (&b"\x02bb"[..], -3.0));
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(crate::outbox::gauges::decode(&b).is_none());
}

/// A flush of `keys` counter rows, bodies past one read chunk at 100k keys.
fn wide_flush(ledger: &Ledger, flush_id: u64, keys: usize) -> Arc<Flush> {
    let batch = Batch {
        flush_id,
        ts: 100,
        host: "h".into(),
        counters: (0..keys)
            .map(|i| CounterRow {
                ts: 100,
                name: format!("wide.counter.{i}"),
                tags: vec![],
                host: "h".into(),
                flush_id,
                value: 1.0,
                samples: 1,
            })
            .collect(),
        ..Batch::default()
    };
    Arc::new(Flush::seal(batch, ledger.instance()))
}

#[test]
fn a_recorded_body_is_read_back_from_its_spool_file_a_chunk_at_a_time_byte_for_byte() {
    let dir = test_dir("ledger-open-body");
    let (ledger, _) = open(&dir, u64::MAX, Arc::new(crate::fs::RealFs));
    let id = ledger.next_flush_id(Duration::from_secs(1_700_000_000));
    let flush = wide_flush(&ledger, id, 100_000);
    assert!(
        flush.tables.bodies[0].len() > 2 << 20,
        "three chunks at least"
    );
    let (recorded, _) = ledger.record(Arc::clone(&flush), None).expect("record");
    let ranges = recorded.body_ranges();
    let bare = recorded.without_bodies();
    let mut reader = ledger.open_body(&bare, ranges[0]).expect("open");
    let (mut read, mut chunks) = (Vec::new(), 0);
    while let Some(chunk) = reader.next_chunk().expect("chunk") {
        assert!(chunk.len() <= 1 << 20);
        read.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert!(chunks >= 3);
    assert!(read == flush.tables.bodies[0], "the same bytes");
    let mut empty = ledger.open_body(&bare, ranges[1]).expect("open");
    assert_eq!(empty.next_chunk().expect("read"), None);
}

#[test]
fn a_damaged_spool_file_met_while_sending_is_quarantined_and_not_a_byte_of_it_read() {
    let dir = test_dir("ledger-open-body-damaged");
    let (ledger, _) = open(&dir, u64::MAX, Arc::new(crate::fs::RealFs));
    let id = ledger.next_flush_id(Duration::from_secs(1_700_000_000));
    let (recorded, _) = ledger
        .record(counter_flush(&ledger, id, 2.0), None)
        .expect("record");
    let (bare, ranges) = (recorded.without_bodies(), recorded.body_ranges());
    let path = spool::path(&spool::dir(&dir), id);
    let mut bytes = std::fs::read(&path).expect("read");
    // One bit of the body's last byte: only the CRC tells.
    let at = (ranges[0].0 + ranges[0].1 - 1) as usize;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).expect("damage it");
    let e = ledger.open_body(&bare, ranges[0]).expect_err("damaged");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(!path.exists(), "moved aside");
    assert_eq!(ledger.quarantined().len(), 1, "and said (/health)");
    assert_eq!(ledger.backlog().0, 0, "forgotten");
    // Another flush's file under its name is refused the same way.
    let other = ledger.next_flush_id(Duration::from_secs(1_700_000_001));
    let (recorded, _) = ledger
        .record(counter_flush(&ledger, other, 2.0), None)
        .expect("record");
    std::fs::rename(spool::path(&spool::dir(&dir), other), &path).expect("swap");
    let e = ledger
        .open_body(&bare, recorded.body_ranges()[0])
        .expect_err("not this flush's file");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn a_parked_flush_of_an_earlier_format_is_taken_back_whole_under_its_old_token() {
    let dir = test_dir("ledger-take-legacy");
    let (ledger, _) = open(&dir, u64::MAX, Arc::new(crate::fs::RealFs));
    let id = ledger.next_flush_id(Duration::from_secs(1_700_000_000));
    let (recorded, _) = ledger
        .record(counter_flush(&ledger, id, 2.0), None)
        .expect("record");
    // The same file as version 2 wrote it (version 4 without the
    // intervals).
    let path = spool::path(&spool::dir(&dir), id);
    let bytes = crate::outbox::flush::tests::before_intervals(&recorded, 2);
    std::fs::write(&path, &bytes).expect("write");
    ledger.park(id);
    let taken = ledger.take_parked().expect("taken");
    let (flush, spooled) = ledger.read_taken(&taken).expect("read");
    assert_eq!(spooled, None, "not sent from its file: read whole");
    assert_eq!(flush.tables, recorded.tables);
    assert!(
        flush.legacy_token,
        "sent under the token it may have landed under"
    );
    assert_eq!(
        flush.token("counters"),
        format!("tallyd-{:016x}-{id}-counters", flush.instance)
    );
}
