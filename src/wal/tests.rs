//! Unit tests of [`super`].

use super::*;

fn temp_dir() -> crate::test_dir::TestDir {
    crate::test_dir::test_dir("wal")
}

fn config(dir: &Path) -> WalConfig {
    WalConfig {
        dir: dir.to_owned(),
        streams: 2,
        segments_per_stream: 3,
        segment_size: 4096,
        sync: SyncMode::Interval,
        sync_interval: Duration::from_millis(100),
        skip_corrupt: false,
    }
}

fn payloads(r: &Recovery) -> Vec<(u64, Vec<String>)> {
    r.generations
        .iter()
        .map(|g| {
            (
                g.generation,
                g.blocks
                    .iter()
                    .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn unconfirmed_records_are_recovered_by_generation() {
    let dir = temp_dir();
    {
        let (wal, rec) = Wal::open(config(&dir)).expect("open");
        assert_eq!(rec.next_generation, 1);
        wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
        wal.append(1, 1, Kind::Statsd, b"b:1|c").expect("append");
        wal.append(0, 2, Kind::Statsd, b"c:1|c").expect("append");
        wal.confirm(1).expect("confirm");
    }
    let (_, rec) = Wal::open(config(&dir)).expect("reopen");
    assert_eq!(payloads(&rec), vec![(2, vec!["c:1|c".to_string()])]);
    assert_eq!(rec.next_generation, 3);
    assert_eq!(rec.records, 1);
}

#[test]
fn legacy_intents_come_back_with_their_generation() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
    }
    std::fs::write(
        dir.join("checkpoint"),
        "confirmed 0\nintent 1 77 1700000000\n",
    )
    .expect("a checkpoint of the previous release");
    let (_, rec) = Wal::open(config(&dir)).expect("reopen");
    assert_eq!(
        rec.generations[0].intent,
        Some(Intent {
            flush_id: 77,
            ts: 1_700_000_000
        })
    );
}

/// The resident size in kB of this process's mapping of `path`, from
/// `/proc/self/smaps`.
fn resident_kb(path: &Path) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut lines = smaps.lines();
    while let Some(line) = lines.next() {
        if line.ends_with(path.to_str()?) {
            return lines
                .find_map(|l| l.strip_prefix("Rss:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok();
        }
    }
    None
}

#[test]
fn written_pages_are_unmapped_behind_the_appends_and_keep_their_bytes() {
    let dir = temp_dir();
    let cfg = WalConfig {
        streams: 1,
        segment_size: 4 * 1024 * 1024,
        sync: SyncMode::Interval,
        ..config(&dir)
    };
    let records: Vec<String> = (0..2000).map(|i| format!("{i:0>1000}")).collect();
    {
        let (wal, _) = Wal::open(cfg.clone()).expect("open");
        for (i, r) in records.iter().enumerate() {
            wal.append(0, 1, Kind::Statsd, r.as_bytes())
                .expect("append");
            if i % 500 == 0 {
                wal.sync();
            }
        }
        let seg = dir.join("stream-0").join("seg-0.wal");
        // About 2 MB written: no more than the last chunk, the page
        // being written and the end marker's stay mapped.
        let most = (RELEASE_CHUNK + RELEASE_ALIGN) as u64 / 1024 + 8;
        let resident = resident_kb(&seg).expect("mapped");
        assert!(resident <= most, "{resident} kB resident");
        wal.sync();
    }
    let (_, rec) = Wal::open(cfg).expect("reopen");
    assert_eq!(payloads(&rec), vec![(1, records)]);
}

#[test]
fn confirmed_segments_give_their_pages_back_and_keep_their_bytes() {
    let dir = temp_dir();
    let cfg = WalConfig {
        streams: 1,
        segment_size: 64 * 1024,
        ..config(&dir)
    };
    let (wal, _) = Wal::open(cfg).expect("open");
    // Generation 1 fills segment 0 and goes on into segment 1.
    let record = vec![b'x'; 1000];
    for _ in 0..80 {
        wal.append(0, 1, Kind::Statsd, &record).expect("append");
    }
    let (seg0, seg1) = (
        dir.join("stream-0").join("seg-0.wal"),
        dir.join("stream-0").join("seg-1.wal"),
    );
    assert!(resident_kb(&seg0) >= Some(60), "{:?}", resident_kb(&seg0));
    let before = std::fs::read(&seg0).expect("read");
    wal.confirm(1).expect("confirm");
    assert_eq!(resident_kb(&seg0), Some(0), "the left segment is released");
    assert!(resident_kb(&seg1) > Some(0), "the current one is kept");
    assert_eq!(std::fs::read(&seg0).expect("read"), before);
    // The ring comes round to it again: it is written as before.
    for _ in 0..120 {
        wal.append(0, 2, Kind::Statsd, &record).expect("append");
    }
    assert!(resident_kb(&seg0) > Some(0));
}

#[test]
fn segments_have_their_blocks_reserved_at_creation() {
    use std::os::unix::fs::MetadataExt;
    let dir = temp_dir();
    let cfg = WalConfig {
        segment_size: 1 << 20,
        ..config(&dir)
    };
    let (_wal, _) = Wal::open(cfg).expect("open");
    let meta = std::fs::metadata(dir.join("stream-1").join("seg-2.wal")).expect("meta");
    assert_eq!(meta.len(), 1 << 20);
    assert!(
        meta.blocks() * 512 >= 1 << 20,
        "sparse: {} blocks",
        meta.blocks()
    );
}

#[test]
fn a_full_ring_refuses_until_flushes_are_confirmed() {
    let dir = temp_dir();
    let (wal, _) = Wal::open(config(&dir)).expect("open");
    let block = [b'x'; 1000];
    let mut appended = 0;
    while wal.append(0, 1, Kind::Statsd, &block).is_ok() {
        appended += 1;
    }
    assert_eq!(
        wal.append(0, 1, Kind::Statsd, &block),
        Err(AppendError::Full)
    );
    assert_eq!(
        appended, 9,
        "3 segments of 4 KiB hold 3 records of ~1 KiB each"
    );
    assert_eq!(wal.stats.full.load(Relaxed), 2);
    // The other stream has its own ring.
    wal.append(1, 1, Kind::Statsd, &block)
        .expect("other stream");
    wal.confirm(1).expect("confirm");
    wal.append(0, 2, Kind::Statsd, &block)
        .expect("room after confirm");
}

#[test]
fn wrap_around_recovers_only_the_newest_unconfirmed_records() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        for generation in 1..=20u64 {
            for i in 0..3 {
                wal.append(
                    0,
                    generation,
                    Kind::Statsd,
                    format!("g{generation}.r{i}:1|c").repeat(20).as_bytes(),
                )
                .expect("append");
            }
            if generation < 20 {
                wal.confirm(generation).expect("confirm");
            }
        }
    }
    let (_, rec) = Wal::open(config(&dir)).expect("reopen");
    let got = payloads(&rec);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 20);
    assert_eq!(got[0].1.len(), 3);
    assert!(got[0].1[2].starts_with("g20.r2:1|c"));
}

#[test]
fn appends_go_on_after_reopen_without_losing_order() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        wal.append(0, 1, Kind::Statsd, b"first:1|c")
            .expect("append");
    }
    {
        let (wal, rec) = Wal::open(config(&dir)).expect("reopen");
        assert_eq!(rec.records, 1);
        wal.append(0, rec.next_generation, Kind::Statsd, b"second:1|c")
            .expect("append");
    }
    let (_, rec) = Wal::open(config(&dir)).expect("reopen again");
    assert_eq!(
        payloads(&rec),
        vec![
            (1, vec!["first:1|c".into()]),
            (2, vec!["second:1|c".into()])
        ]
    );
}

fn segment_path(dir: &Path) -> PathBuf {
    dir.join("stream-0").join("seg-0.wal")
}

#[test]
fn a_generation_start_record_comes_back_apart_from_the_blocks() {
    let dir = temp_dir();
    let started = Duration::new(1_700_000_000, 250_000_000);
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        wal.append(1, 1, Kind::Start, &format::encode_start(started, 42))
            .expect("append");
        wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
        wal.append(0, 2, Kind::Statsd, b"b:1|c").expect("append");
    }
    let (_, rec) = Wal::open(config(&dir)).expect("reopen");
    assert_eq!(rec.generations[0].started, Some(started));
    assert_eq!(rec.generations[0].keying, Some(42));
    assert_eq!(
        payloads(&rec),
        vec![(1, vec!["a:1|c".into()]), (2, vec!["b:1|c".into()])]
    );
    assert_eq!(
        rec.generations[1].started, None,
        "a generation of an earlier release"
    );
    assert_eq!(format::decode_start(&[0; 11]), None);
    let old = &format::encode_start(started, 7)[..12];
    assert_eq!(
        format::decode_start(old),
        Some((started, None)),
        "an earlier release's start record names no keying"
    );
}

#[test]
fn torn_tail_is_truncated_and_earlier_records_kept() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        wal.append(0, 1, Kind::Statsd, b"kept:1|c").expect("append");
        wal.append(0, 1, Kind::Statsd, b"torn:1|c").expect("append");
    }
    // Tear the second record: keep its length, smash its payload.
    let mut bytes = std::fs::read(segment_path(&dir)).expect("read");
    let second = SEGMENT_HEADER + record_len(8);
    bytes[second + 24..second + 32].fill(0xAA);
    std::fs::write(segment_path(&dir), &bytes).expect("write");
    let (wal, rec) = Wal::open(config(&dir)).expect("reopen");
    assert_eq!(payloads(&rec), vec![(1, vec!["kept:1|c".into()])]);
    assert_eq!(wal.stats.torn_tails.load(Relaxed), 1);
    wal.append(0, 2, Kind::Statsd, b"next:1|c")
        .expect("append after truncation");
    drop(wal);
    let (_, rec) = Wal::open(config(&dir)).expect("reopen");
    assert_eq!(rec.records, 2);
}

#[test]
fn a_torn_older_segment_starts_under_interval_sync_and_stops_under_always() {
    let dir = temp_dir();
    let big = |c: char| c.to_string().repeat(1000);
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        for c in ['a', 'b', 'c', 'd'] {
            wal.append(0, 1, Kind::Statsd, big(c).as_bytes())
                .expect("append");
        }
    }
    // Three records fill seg-0; the fourth went to seg-1. Tear the third,
    // as a power loss does to pages never written back.
    let seg0 = dir.join("stream-0").join("seg-0.wal");
    let mut bytes = std::fs::read(&seg0).expect("read");
    let third = SEGMENT_HEADER + 2 * record_len(1000);
    bytes[third + 24..third + 64].fill(0);
    std::fs::write(&seg0, &bytes).expect("write");
    let (wal, rec) = Wal::open(config(&dir)).expect("a torn older segment starts under interval");
    assert_eq!(
        payloads(&rec),
        vec![(1, vec![big('a'), big('b'), big('d')])]
    );
    assert_eq!(wal.stats.torn_tails.load(Relaxed), 1);
    drop(wal);
    let mut always = config(&dir);
    always.sync = SyncMode::Always;
    assert!(matches!(
        Wal::open(always.clone()),
        Err(WalError::Corrupt { .. })
    ));
    always.skip_corrupt = true;
    Wal::open(always).expect("skip_corrupt applies to it");
}

#[test]
fn corruption_in_the_middle_stops_recovery_unless_told_to_skip() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        for name in ["a", "b", "c"] {
            wal.append(0, 1, Kind::Statsd, format!("{name}:1|c").as_bytes())
                .expect("append");
        }
    }
    let mut bytes = std::fs::read(segment_path(&dir)).expect("read");
    bytes[SEGMENT_HEADER + record_len(5) + 24] ^= 0x01; // flip a bit of "b"
    std::fs::write(segment_path(&dir), &bytes).expect("write");
    match Wal::open(config(&dir)) {
        Err(WalError::Corrupt { segment, offset }) => {
            assert!(segment.ends_with("seg-0.wal"));
            assert_eq!(offset, SEGMENT_HEADER + record_len(5));
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("corruption went unnoticed"),
    }
    let mut skip = config(&dir);
    skip.skip_corrupt = true;
    let (wal, rec) = Wal::open(skip).expect("open skipping");
    assert_eq!(
        payloads(&rec),
        vec![(1, vec!["a:1|c".into(), "c:1|c".into()])]
    );
    assert_eq!(wal.stats.corrupt_skipped.load(Relaxed), 1);
}

#[test]
fn a_second_process_cannot_open_the_same_wal() {
    let dir = temp_dir();
    let (_wal, _) = Wal::open(config(&dir)).expect("open");
    assert!(matches!(Wal::open(config(&dir)), Err(WalError::Locked(_))));
}

#[test]
fn changed_geometry_replays_the_old_streams_read_only() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        wal.append(0, 1, Kind::Statsd, b"a:1|c").expect("append");
        wal.append(1, 2, Kind::Statsd, b"b:1|c").expect("append");
    }
    let mut bigger = config(&dir);
    bigger.streams = 5;
    bigger.segment_size = 8192;
    {
        let (wal, rec) = Wal::open(bigger.clone()).expect("the new geometry opens");
        assert_eq!(
            payloads(&rec),
            vec![(1, vec!["a:1|c".into()]), (2, vec!["b:1|c".into()])]
        );
        assert_eq!(rec.next_generation, 3);
        assert!(dir.join("previous-0").exists());
        wal.append(4, 3, Kind::Statsd, b"c:1|c")
            .expect("new streams take appends");
        wal.confirm(1).expect("confirm");
        assert!(
            dir.join("previous-0").exists(),
            "generation 2 is still there"
        );
        wal.confirm(2).expect("confirm");
        assert!(!dir.join("previous-0").exists(), "drained and removed");
    }
    let (_, rec) = Wal::open(bigger).expect("reopen");
    assert_eq!(payloads(&rec), vec![(3, vec!["c:1|c".into()])]);
}

#[test]
fn generations_without_records_are_confirmed_at_open() {
    let dir = temp_dir();
    {
        let (wal, _) = Wal::open(config(&dir)).expect("open");
        wal.append(0, 3, Kind::Statsd, b"a:1|c").expect("append");
        wal.confirm(3).expect("confirm 3 before 1 and 2");
        assert_eq!(wal.confirmed(), 0);
    }
    let (wal, rec) = Wal::open(config(&dir)).expect("reopen");
    assert_eq!(rec.records, 0);
    assert_eq!(wal.confirmed(), 3);
}
