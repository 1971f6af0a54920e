//! The StatsD parser (every tag dialect on) and key builder on arbitrary
//! bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tallyd::aggregate::key::{self, KeyBuf};
use tallyd::protocol::dialect::Dialects;
use tallyd::protocol::statsd::{self, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let mut keys = KeyBuf::default();
    let names = ["influxdb", "librato", "signalfx", "graphite"];
    let limits = Limits {
        dialects: Dialects::from_names(&names).expect("known"),
        ..Limits::default()
    };
    for line in statsd::lines(data) {
        if let Ok(Parsed::Metric(l)) = statsd::parse_line(line, &limits) {
            assert_eq!(l.values().count() + usize::from(l.kind == statsd::MetricType::Set), l.value_count());
            let k = keys.build_line(&l).to_vec();
            assert!(key::split(&k).is_some(), "a key built from a parsed line splits");
        }
    }
});
