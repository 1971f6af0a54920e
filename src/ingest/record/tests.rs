//! Unit tests of [`super`].

use super::*;
use crate::aggregate::AggregateLimits;
use crate::aggregate::acc::Acc;
use crate::aggregate::key::KeyBuf;
use crate::protocol::statsd::{Limits, MetricType};
use std::time::Duration;

#[test]
fn a_batch_records_each_datagram_and_applies_all_but_one_the_wal_refuses() {
    use crate::wal::{SyncMode, WalConfig};
    let dir = crate::test_dir::test_dir("batch");
    let config = || WalConfig {
        dir: dir.to_path_buf(),
        streams: 1,
        segments_per_stream: 2,
        segment_size: 4096,
        sync: SyncMode::Interval,
        sync_interval: Duration::from_millis(100),
        skip_corrupt: false,
    };
    let (wal, _) = Wal::open(config()).expect("open");
    let a = Arc::new(Aggregator::new(
        AggregateLimits {
            max_keys: 100,
            max_set_members: 100,
            max_depth: u64::MAX,
            max_memory: u64::MAX,
            timestamp_window: Duration::from_secs(3600),
            interval: Duration::from_secs(1),
        },
        Limits::default(),
        Duration::ZERO,
    ));
    let recorder = Recorder::new(Arc::clone(&a), Some(Arc::new(wal)));
    // The middle datagram is larger than a segment: the WAL refuses it.
    let big = "b:1|c\n".repeat(1000);
    let joined = format!("a:1|c\n{big}\na:2|c\n");
    let datagrams = [0..5, 6..6 + big.len(), 7 + big.len()..12 + big.len()];
    let (mut stats, mut refused) = (BlockStats::default(), vec![]);
    recorder.datagrams(
        joined.as_bytes(),
        &datagrams,
        &mut Scratch::default(),
        &mut stats,
        |e| refused.push(e),
    );
    assert_eq!(refused, [AppendError::TooLarge]);
    assert_eq!((stats.blocks, stats.bytes, stats.samples), (2, 10, 2));
    let key = KeyBuf::default()
        .build(MetricType::Counter, b"a", b"")
        .to_vec();
    match a.current().get(&key).as_deref() {
        Some(Acc::Counter { sum, .. }) => assert_eq!(*sum, 3.0),
        other => panic!("{other:?}"),
    }
    assert!(a.current().keys() == 1, "nothing of the refused one");
    drop((a, recorder));
    // Each recorded datagram is a record of its own, as it arrived.
    let (_, recovery) = Wal::open(config()).expect("reopen");
    let records: Vec<&[u8]> = recovery.generations[0]
        .blocks
        .iter()
        .map(|(_, b)| &b[..])
        .collect();
    assert_eq!(records, [&b"a:1|c"[..], b"a:2|c"]);
}
