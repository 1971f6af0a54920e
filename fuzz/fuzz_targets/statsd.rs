//! The StatsD parser and key builder on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tallyd::aggregate::key::{self, KeyBuf};
use tallyd::protocol::statsd::{self, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let mut keys = KeyBuf::default();
    for line in statsd::lines(data) {
        if let Ok(Parsed::Metric(l)) = statsd::parse_line(line, &Limits::default()) {
            assert_eq!(l.values().count() + usize::from(l.kind == statsd::MetricType::Set), l.value_count());
            let k = keys.build(l.kind, l.name, l.tags).to_vec();
            assert!(key::split(&k).is_some(), "a key built from a parsed line splits");
        }
    }
});
