//! Unit tests of [`super`].

use super::*;
use std::collections::HashMap;

fn delta(memory: &mut GaugeMemory, key: &[u8], d: f64) -> f64 {
    let mut g = crate::aggregate::acc::GaugeAcc {
        value: 0.0,
        absolute: false,
        samples: 0,
    };
    assert!(g.apply(d, true));
    memory.settle(key, &g).0
}

#[test]
fn a_gauge_not_updated_for_its_ttl_is_forgotten_and_an_updated_one_kept() {
    let mut m = GaugeMemory::new(10).with_ttl(4);
    m.start_flush();
    assert_eq!(delta(&mut m, b"idle", 5.0), 5.0);
    assert_eq!(delta(&mut m, b"busy", 5.0), 5.0);
    for _ in 0..4 {
        m.start_flush();
        delta(&mut m, b"busy", 1.0);
    }
    assert_eq!(m.len(), 2, "within its ttl");
    for _ in 0..2 {
        m.start_flush();
        delta(&mut m, b"busy", 1.0);
    }
    assert_eq!((m.len(), m.aged_out), (1, 1));
    assert_eq!(
        delta(&mut m, b"idle", 1.0),
        1.0,
        "a delta after it is forgotten starts from 0"
    );
    assert_eq!(delta(&mut m, b"busy", 0.0), 11.0);
}

#[test]
fn a_full_memory_makes_room_as_gauges_age_out() {
    let mut m = GaugeMemory::new(2).with_ttl(3);
    m.start_flush();
    delta(&mut m, b"a", 1.0);
    delta(&mut m, b"b", 1.0);
    let g = crate::aggregate::acc::GaugeAcc {
        value: 1.0,
        absolute: true,
        samples: 1,
    };
    assert!(m.settle(b"c", &g).1, "full");
    for _ in 0..4 {
        m.start_flush();
    }
    assert_eq!(m.len(), 0, "a full memory is swept at once");
    delta(&mut m, b"c", 2.0);
    assert_eq!(delta(&mut m, b"c", 1.0), 3.0, "remembered");
}

#[test]
fn the_log_appends_each_flush_and_is_rewritten_once_it_doubles() {
    let mut m = GaugeMemory::new(100_000).with_log_bytes(LOG_HEADER as u64);
    let mut log = log_header().to_vec();
    let mut appends = 0;
    for flush in 1..=5_000u64 {
        m.start_flush();
        let key = format!("g{}", flush % 2_000).into_bytes();
        let value = delta(&mut m, &key, 1.0);
        let changed = vec![(key.into_boxed_slice(), value)];
        match m.persist(flush, &changed) {
            GaugesWrite::Append(r) => {
                appends += 1;
                log.extend(r);
            }
            GaugesWrite::Rewrite(all) => log = all,
        }
        assert!(log.len() as u64 <= (2 * m.live_bytes).max(COMPACT_FLOOR) + LOG_HEADER as u64);
    }
    assert!(appends > 4_000, "mostly appends: {appends}");
    let read = decode_log(&log).expect("reads");
    assert_eq!(read.as_of, 5_000);
    let last: HashMap<Box<[u8]>, f64> = read.values.into_iter().collect();
    assert_eq!(last.len(), 2_000);
    assert_eq!(
        last[&b"g0"[..]],
        2.0,
        "g0 was updated in flushes 2000 and 4000"
    );
    assert_eq!(
        last[&b"g1"[..]],
        3.0,
        "g1 was updated in flushes 1, 2001 and 4001"
    );
}

#[test]
fn a_torn_append_ends_the_log_and_a_bad_header_is_damage() {
    let mut log = log_header().to_vec();
    log.extend(encode_record(7, [(&b"a"[..], 1.0)].into_iter()));
    let good = log.len() as u64;
    let mut torn = encode_record(8, [(&b"a"[..], 2.0)].into_iter());
    torn.truncate(torn.len() - 3);
    log.extend(torn);
    let read = decode_log(&log).expect("reads");
    assert_eq!((read.as_of, read.good_len), (7, good));
    assert_eq!(read.values, vec![(b"a".to_vec().into_boxed_slice(), 1.0)]);
    assert!(decode_log(b"TALLYGAU\x01\0\0\0").is_err());
}

#[test]
fn saved_values_are_remembered_newest_first_within_max_keys() {
    let mut m = GaugeMemory::new(2);
    let key = |s: &str| s.as_bytes().to_vec().into_boxed_slice();
    m.remember_saved(vec![
        (key("old"), 1.0),
        (key("a"), 1.0),
        (key("b"), 1.0),
        (key("a"), 5.0),
    ]);
    assert_eq!(m.len(), 2);
    assert_eq!(delta(&mut m, b"a", 1.0), 6.0, "a's last value");
    assert_eq!(delta(&mut m, b"b", 1.0), 2.0);
    assert!(
        m.settle(
            b"old",
            &crate::aggregate::acc::GaugeAcc {
                value: 1.0,
                absolute: false,
                samples: 1
            }
        )
        .1,
        "the oldest key found no room"
    );
}

#[test]
fn without_a_ttl_nothing_ages_out() {
    let mut m = GaugeMemory::new(10);
    delta(&mut m, b"a", 1.0);
    for _ in 0..1000 {
        m.start_flush();
    }
    assert_eq!(delta(&mut m, b"a", 1.0), 2.0);
}
