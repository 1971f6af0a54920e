//! Unit tests of [`super`].

use super::*;
use crate::outbox::rows::{CounterRow, GaugeRow};

#[test]
fn a_counter_row_is_encoded_column_by_column() {
    let batch = Batch {
        counters: vec![CounterRow {
            ts: 1,
            name: "ab".into(),
            tags: vec!["x".into()],
            host: "h".into(),
            flush_id: 2,
            value: 1.5,
            samples: 3,
        }],
        ..Batch::default()
    };
    let b = encode(&batch);
    let mut want = vec![1, 0, 0, 0, 2, b'a', b'b', 1, 1, b'x', 1, b'h'];
    want.extend_from_slice(&2u64.to_le_bytes());
    want.extend_from_slice(&1.5f64.to_le_bytes());
    want.extend_from_slice(&3u64.to_le_bytes());
    assert_eq!(b.bodies[0], want);
    assert_eq!(b.rows, [1, 0, 0, 0, 0, 0]);
    assert!(b.bodies[1].is_empty());
}

#[test]
fn every_table_decodes_to_what_was_encoded() {
    let head = |name: &str| {
        (
            7u32,
            name.to_string(),
            vec!["a:1".to_string()],
            "h".to_string(),
        )
    };
    let (ts, name, tags, host) = head("t");
    let batch = Batch {
        counters: vec![CounterRow {
            ts,
            name: "c".into(),
            tags: tags.clone(),
            host: host.clone(),
            flush_id: 1,
            value: 2.5,
            samples: 3,
        }],
        gauges: vec![GaugeRow {
            ts,
            name: "g".into(),
            tags: vec![],
            host: host.clone(),
            value: -1.0,
            version: 9,
            samples: 1,
        }],
        timers: vec![TimerRow {
            ts,
            name: name.clone(),
            tags: tags.clone(),
            host: host.clone(),
            flush_id: 1,
            kind: "ms".into(),
            count: 2.5,
            sum: 3.0,
            min: 1.0,
            max: 2.0,
            p50: 1.0,
            p90: 2.0,
            p95: 2.0,
            p99: 2.0,
            samples: 2,
            bucket_values: vec![1.0, 2.0],
            bucket_counts: vec![1.25, 1.25],
        }],
        sets: vec![SetRow {
            ts,
            name: "s".into(),
            tags,
            host,
            flush_id: 1,
            cardinality: 2,
            samples: 3,
            member_hashes: vec![5, 6],
        }],
        events: vec![EventRow {
            ts,
            host: "h".into(),
            flush_id: 1,
            seq: 0,
            event_ts: ts - 5,
            title: "deploy | v2".into(),
            text: "line 1\nline 2".into(),
            hostname: "web-1".into(),
            aggregation_key: "k".into(),
            priority: "low".into(),
            source_type: "ci".into(),
            alert_type: "success".into(),
            tags: vec!["env:prod".into()],
        }],
        service_checks: vec![ServiceCheckRow {
            ts,
            host: "h".into(),
            flush_id: 1,
            seq: 0,
            check_ts: ts,
            name: "db.up".into(),
            status: 2,
            hostname: String::new(),
            tags: vec![],
            message: "down".into(),
        }],
        ..Batch::default()
    };
    let mut cut = encode(&batch);
    assert_eq!(cut.rows, [1, 1, 1, 1, 1, 1]);
    let back = decode(&cut).expect("decodes");
    assert_eq!(
        (back.counters, back.gauges, back.timers, back.sets),
        (batch.counters, batch.gauges, batch.timers, batch.sets)
    );
    assert_eq!(
        (back.events, back.service_checks),
        (batch.events, batch.service_checks)
    );
    cut.bodies[2].pop();
    assert!(decode(&cut).is_err());
}

#[test]
fn a_timers_body_of_the_previous_release_is_upgraded_to_float_counts() {
    let row = TimerRow {
        ts: 1_700_000_000,
        name: "t".into(),
        tags: vec!["a:b".into()],
        host: "h".into(),
        flush_id: 7,
        kind: "ms".into(),
        count: 3.0,
        sum: 6.0,
        min: 1.0,
        max: 3.0,
        p50: 2.0,
        p90: 3.0,
        p95: 3.0,
        p99: 3.0,
        samples: 3,
        bucket_values: vec![1.0, 2.0, 3.0],
        bucket_counts: vec![1.0, 1.0, 1.0],
    };
    // The columns as version 1 wrote them: UInt64 counts.
    let mut v1 = Vec::new();
    Head::of(row.ts, &row.name, &row.tags, &row.host).encode(&mut v1);
    v1.extend_from_slice(&row.flush_id.to_le_bytes());
    string(&mut v1, &row.kind);
    v1.extend_from_slice(&3u64.to_le_bytes());
    for x in [
        row.sum, row.min, row.max, row.p50, row.p90, row.p95, row.p99,
    ] {
        v1.extend_from_slice(&x.to_le_bytes());
    }
    v1.extend_from_slice(&row.samples.to_le_bytes());
    f64s(&mut v1, &row.bucket_values);
    u64s(&mut v1, &[1, 1, 1]);
    let mut today = Bodies::default();
    today.timer(
        Head::of(row.ts, &row.name, &row.tags, &row.host),
        TimerColumns::of(&row),
    );
    assert_eq!(upgrade_v1_timers(&v1), Ok(today.bodies[2].clone()));
    assert!(upgrade_v1_timers(&v1[..v1.len() - 1]).is_err());
}

#[test]
fn long_strings_get_multi_byte_lengths() {
    let mut out = Vec::new();
    string(&mut out, &"x".repeat(300));
    assert_eq!(&out[..2], &[0xAC, 0x02]);
    assert_eq!(out.len(), 302);
}
