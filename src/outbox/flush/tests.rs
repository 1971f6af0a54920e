//! Unit tests of [`super`].

use super::*;

pub fn sample() -> Flush {
    Flush {
        instance: 0xabc,
        flush_id: 42,
        generation: 7,
        ts: 1_700_000_000,
        samples: 9,
        host: "web-1".into(),
        tables: Bodies {
            bodies: [vec![1, 2, 3], vec![], vec![4], vec![5, 6], vec![7], vec![]],
            rows: [1, 0, 1, 2, 1, 0],
        },
        gauges: vec![(b"\x02g".to_vec().into(), 15.0)],
        intervals: vec![1_699_999_940, 1_700_000_000],
        absorbed: vec![41],
        legacy_token: false,
    }
}

#[test]
fn a_flush_round_trips() {
    let f = sample();
    assert_eq!(Flush::decode(&f.encode()), Ok(f));
}

#[test]
fn body_ranges_point_at_each_body_in_the_persisted_form() {
    let f = sample();
    let file = f.encode();
    for (range, body) in f.body_ranges().iter().zip(&f.tables.bodies) {
        let (at, len) = (range.0 as usize, range.1 as usize);
        assert_eq!(&file[at..at + len], &body[..]);
        // Preceded by its length.
        assert_eq!(file[at - 8..at], (len as u64).to_le_bytes());
    }
    let bare = f.without_bodies();
    assert_eq!((bare.body_len(), bare.rows()), (0, f.rows()));
    assert_eq!(bare.token("counters"), f.token("counters"));
}

#[test]
fn a_head_read_without_the_bodies_names_the_flush_and_its_bodies() {
    let f = sample();
    let file = f.encode();
    let mut read_at = |at: u64, buf: &mut [u8]| {
        let at = at as usize;
        buf.copy_from_slice(&file[at..at + buf.len()]);
        Ok(())
    };
    let (head, ranges) = Flush::decode_head(file.len() as u64, &mut read_at).expect("head");
    assert_eq!(head, f.without_bodies());
    assert_eq!(ranges, f.body_ranges());
    // Cut in the head, the host, a table's prefix, the last body (a cut
    // in the tail is for the CRC to catch).
    let last = ranges[5].0 - 12 - 1;
    for cut in [0, 40, 60, 70, last] {
        assert!(
            Flush::decode_head(cut, &mut read_at).is_err(),
            "cut at {cut}"
        );
    }
}

#[test]
fn concatenated_flushes_keep_every_row_under_the_newest_id() {
    let a = sample();
    let mut b = sample();
    b.flush_id = 43;
    b.generation = 8;
    b.ts = a.ts + 1;
    b.absorbed = vec![];
    b.gauges = vec![(b"\x02g".to_vec().into(), 16.0)];
    let c = Flush::concat(vec![a, b]).expect("two parts");
    assert_eq!((c.flush_id, c.generation, c.ts), (43, 8, 1_700_000_000));
    assert_eq!(c.absorbed, vec![41, 42]);
    assert_eq!(c.samples, 18);
    assert_eq!(c.tables.rows, [2, 0, 2, 4, 2, 0]);
    assert_eq!(c.tables.bodies[0], vec![1, 2, 3, 1, 2, 3]);
    assert_eq!(
        c.gauges.last().map(|g| g.1),
        Some(16.0),
        "the newest value last"
    );
    assert_eq!(Flush::concat(vec![]), None);
}

/// `f` as versions 2 and 3 wrote it: version 4 without the intervals.
pub fn before_intervals(f: &Flush, version: u32) -> Vec<u8> {
    let mut b = f.encode();
    let at = 56 + f.host.len();
    b.drain(at..at + 4 + 4 * f.intervals.len());
    b[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c::crc32c(&b[16..]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn a_version_3_file_gets_its_intervals_from_its_rows() {
    let mut batch = crate::outbox::rows::Batch {
        ts: 1_700_000_000,
        ..Default::default()
    };
    for ts in [1_700_000_000, 1_699_998_200] {
        batch.counters.push(crate::outbox::rows::CounterRow {
            ts,
            name: "c".into(),
            tags: vec![],
            host: "h".into(),
            flush_id: 5,
            value: 1.0,
            samples: 1,
        });
    }
    let f = Flush::seal(batch, 1);
    assert_eq!(f.intervals, [1_699_998_200, 1_700_000_000]);
    let read = Flush::decode(&before_intervals(&f, 3)).expect("version 3 reads");
    assert_eq!(read.intervals, f.intervals);
    assert_eq!(read.tables, f.tables);
}

/// A spool file as version 1 wrote it: 4 tables, UInt64 timer counts.
pub fn version_1(f: &Flush, timers_v1: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for n in [f.instance, f.flush_id, f.generation] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&f.ts.to_le_bytes());
    out.extend_from_slice(&f.samples.to_le_bytes());
    bytes(&mut out, f.host.as_bytes());
    for i in 0..4 {
        let body = if i == 2 {
            timers_v1
        } else {
            &f.tables.bodies[i][..]
        };
        out.extend_from_slice(&f.tables.rows[i].to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(body);
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&out[16..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn a_version_1_file_is_read_with_its_timer_counts_as_floats() {
    let mut f = sample();
    f.gauges.clear();
    f.absorbed.clear();
    f.tables = Bodies::default();
    f.tables.bodies[0] = vec![9, 9];
    f.tables.rows[0] = 1;
    f.tables.rows[2] = 0;
    f.legacy_token = true;
    // Bodies that are not rows: the intervals start from `ts`.
    f.intervals = vec![f.ts];
    let read = Flush::decode(&version_1(&f, &[])).expect("version 1 reads");
    assert_eq!(read, f);
    assert!(
        Flush::decode(&version_1(&f, &[1, 2, 3])).is_err(),
        "a damaged timers body is an error"
    );
}

#[test]
fn damage_is_detected() {
    let mut b = sample().encode();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert_eq!(Flush::decode(&b), Err("checksum mismatch".into()));
    assert!(Flush::decode(&b[..20]).is_err());
    let mut v5 = sample().encode();
    v5[8] = 5;
    assert!(Flush::decode(&v5).expect_err("v5").contains("version 5"));
}

#[test]
fn the_token_names_instance_host_flush_and_table() {
    let a = sample();
    let token = a.token("counters");
    assert!(token.starts_with("tallyd-0000000000000abc-"), "{token}");
    assert!(token.ends_with("-42-counters"), "{token}");
    assert_eq!(token, sample().token("counters"), "stable for re-sends");
    let mut clone = sample();
    clone.host = "web-2".into();
    assert_ne!(
        clone.token("counters"),
        token,
        "a cloned data dir on another host"
    );
}

#[test]
fn a_flush_of_the_previous_release_keeps_its_token_and_a_joined_one_gets_the_new() {
    let old = Flush::decode(&before_intervals(&sample(), 2)).expect("version 2 reads");
    assert_eq!(old.token("counters"), "tallyd-0000000000000abc-42-counters");
    let mut newer = sample();
    newer.flush_id = 43;
    let joined = Flush::concat(vec![old, newer]).expect("joined");
    assert_eq!(joined.token("counters"), {
        let mut n = sample();
        n.flush_id = 43;
        n.token("counters")
    });
    let back = Flush::decode(&joined.encode()).expect("decodes");
    assert_eq!(back.token("counters"), joined.token("counters"));
}
