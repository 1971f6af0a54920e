//! Unit tests of [`super`].

use super::*;
use crate::outbox::rows::{Batch as Rows, CounterRow, TimerRow};

fn counter(name: &str, ts: u32) -> CounterRow {
    CounterRow {
        ts,
        name: name.into(),
        tags: vec!["a:1".into(), "b".into()],
        host: "h".into(),
        flush_id: 7,
        value: 2.5,
        samples: 3,
    }
}

fn bodies(rows: &Rows) -> Bodies {
    rowbinary::encode(rows)
}

/// A share's parts as prost reads them.
pub(crate) fn batches(f: &Framed) -> Vec<pb::Batch> {
    f.frames
        .iter()
        .map(|frame| {
            let (prefix, len) = crate::protocol::proto::frame_header(frame, usize::MAX)
                .expect("a frame")
                .expect("whole");
            assert_eq!(prefix + len, frame.len());
            pb::Batch::decode(&frame[prefix..]).expect("prost reads it")
        })
        .collect()
}

fn shape<'a>(
    ups: &'a [String],
    lost: &'a [bool],
    host: &'a str,
    flush_id: u64,
    size: usize,
) -> Shape<'a> {
    Shape {
        upstreams: ups,
        lost,
        client_id: "c",
        flush_id,
        host,
        keep_host: true,
        host_except: &[],
        batch_size: size,
    }
}

#[test]
fn every_key_goes_to_one_upstream_and_the_share_is_even() {
    let ups: Vec<String> = (1..=3).map(|i| format!("agg{i}:8126")).collect();
    let mut seen = [0usize; 3];
    for k in 0..3000 {
        let name = format!("m{k}");
        let u = upstream_of(&ups, name.as_bytes(), [].into_iter());
        assert_eq!(
            u,
            upstream_of(&ups, name.as_bytes(), [].into_iter()),
            "stable"
        );
        seen[u] += 1;
    }
    assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
}

#[test]
fn removing_an_upstream_moves_only_its_own_keys() {
    let ups: Vec<String> = (1..=3).map(|i| format!("agg{i}:8126")).collect();
    let two = vec![ups[0].clone(), ups[2].clone()];
    for k in 0..1000 {
        let name = format!("m{k}");
        let before = &ups[upstream_of(&ups, name.as_bytes(), [].into_iter())];
        let after = &two[upstream_of(&two, name.as_bytes(), [].into_iter())];
        if before != &ups[1] {
            assert_eq!(before, after, "{name}");
        }
    }
}

#[test]
fn the_hand_made_bytes_read_as_the_batch_prost_would_make() {
    let rows = Rows {
        counters: vec![counter("m", 60)],
        gauges: vec![crate::outbox::rows::GaugeRow {
            ts: 61,
            name: "g".into(),
            tags: vec![],
            host: "h".into(),
            value: -1.5,
            version: 9,
            samples: 300,
        }],
        ..Rows::default()
    };
    let ups = vec!["a:1".to_string()];
    let framed = &frames(
        &bodies(&rows),
        &shape(&ups, &[], "web-1", 5 << TAG_BITS, 4096),
    )
    .expect("frames")[0];
    let tag = |k: &str| pb::Tag {
        key: k.into(),
        value: String::new(),
    };
    let want = pb::Batch {
        client_id: "c".into(),
        sequence: 5 << TAG_BITS,
        host: "web-1".into(),
        version: 2,
        events: vec![
            pb::Event {
                name: "m".into(),
                tags: vec![tag("a:1"), tag("b")],
                value: Some(Value::CounterState(pb::CounterState {
                    sum: 2.5,
                    samples: 3,
                })),
                interval_start: 60,
                ..Default::default()
            },
            pb::Event {
                name: "g".into(),
                value: Some(Value::GaugeState(pb::GaugeState {
                    value: -1.5,
                    samples: 300,
                    delta: false,
                })),
                interval_start: 61,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    // The same message (prost writes the header fields after the
    // events, by field number; both orders are protobuf).
    assert_eq!(batches(framed), vec![want]);
    assert_eq!(framed.rows, 2);
}

#[test]
fn parts_are_cut_to_size_with_sequences_of_the_flush() {
    let rows = Rows {
        counters: (0..1000).map(|i| counter(&format!("m{i}"), 60)).collect(),
        timers: vec![TimerRow {
            ts: 60,
            name: "t".into(),
            tags: vec![],
            host: "h".into(),
            flush_id: 7,
            kind: "ms".into(),
            count: 2.0,
            sum: 3.0,
            min: 1.0,
            max: 2.0,
            p50: 1.0,
            p90: 2.0,
            p95: 2.0,
            p99: 2.0,
            samples: 2,
            bucket_values: vec![1.0, 2.0],
            bucket_counts: vec![1.0, 1.0],
        }],
        ..Rows::default()
    };
    let ups = vec!["a:1".to_string()];
    let framed = &frames(
        &bodies(&rows),
        &shape(&ups, &[], "web-1", (5 << TAG_BITS) | 0xabc, 4096),
    )
    .expect("frames")[0];
    let parts = batches(framed);
    assert!(parts.len() > 5, "{}", parts.len());
    let events: usize = parts.iter().map(|p| p.events.len()).sum();
    assert_eq!((events, framed.rows), (1001, 1001));
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.sequence, (5 << TAG_BITS) | i as u64);
        assert!(p.encoded_len() <= 4096, "{}", p.encoded_len());
        assert_eq!((p.host.as_str(), p.version), ("web-1", 2));
    }
    let e = &parts[0].events[0];
    assert_eq!(e.interval_start, 60);
    assert_eq!(e.tags[0].key, "a:1");
}

#[test]
fn a_lost_upstreams_keys_go_to_the_others_in_parts_of_their_own() {
    let rows = Rows {
        counters: (0..300).map(|i| counter(&format!("m{i}"), 60)).collect(),
        ..Rows::default()
    };
    let ups: Vec<String> = (1..=3).map(|i| format!("agg{i}:8126")).collect();
    let b = bodies(&rows);
    let before = frames(&b, &shape(&ups, &[], "", 9 << TAG_BITS, 1 << 20)).expect("frames");
    let lost = [false, true, false];
    let after = frames(&b, &shape(&ups, &lost, "", 9 << TAG_BITS, 1 << 20)).expect("frames");
    assert!(after[1].frames.is_empty(), "nothing goes to the lost one");
    for u in [0, 2] {
        let (was, now) = (batches(&before[u]), batches(&after[u]));
        assert_eq!(now[0], was[0], "the parts it may have taken, unchanged");
        let moved = &now[1];
        assert_eq!(moved.sequence, (9 << TAG_BITS) | MAX_PARTS as u64);
        for e in &moved.events {
            let tags = e.tags.iter().map(|t| t.key.as_bytes());
            assert_eq!(
                upstream_of(&ups, e.name.as_bytes(), tags),
                1,
                "only the lost one's keys move"
            );
        }
    }
    let total: u64 = after.iter().map(|f| f.rows).sum();
    assert_eq!(total, 300);
}

#[test]
fn parts_grow_until_a_share_fits_the_part_limit() {
    // Long tags: each event several times its RowBinary row, so the
    // first guess of the part size makes too many parts.
    let rows = Rows {
        counters: (0..(MAX_PARTS * 8))
            .map(|i| CounterRow {
                tags: (0..8).map(|t| format!("t{t}:{}", "v".repeat(40))).collect(),
                ..counter(&format!("m{i}"), 1)
            })
            .collect(),
        ..Rows::default()
    };
    let ups = vec!["a:1".to_string()];
    let s = shape(&ups, &[], "", 1 << TAG_BITS, 4096);
    let framed = &frames(&bodies(&rows), &s).expect("frames")[0];
    assert!(framed.frames.len() <= MAX_PARTS, "{}", framed.frames.len());
    assert_eq!(framed.rows, (MAX_PARTS * 8) as u64);
}

#[test]
fn a_huge_flush_stays_within_the_part_limit() {
    let rows = Rows {
        counters: (0..(MAX_PARTS * 4))
            .map(|i| counter(&format!("m{i}"), 1))
            .collect(),
        ..Rows::default()
    };
    let ups = vec!["a:1".to_string()];
    let framed =
        &frames(&bodies(&rows), &shape(&ups, &[], "", 1 << TAG_BITS, 4096)).expect("frames")[0];
    assert!(framed.frames.len() <= MAX_PARTS, "{}", framed.frames.len());
}

#[test]
fn a_client_id_names_instance_and_host_within_the_limit() {
    assert_eq!(
        client_id("web-1", 0xab),
        "tallyd-edge/00000000000000ab/web-1"
    );
    let long = "é".repeat(300);
    let id = client_id(&long, 1);
    assert!(id.len() <= crate::ledger::dedup::MAX_CLIENT_ID);
}
