//! Protobuf framing, Batch decoding and event validation on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tallyd::protocol::proto::{self, Batch};
use tallyd::protocol::statsd::Limits;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((prefix, len))) = proto::frame_header(data, 4 << 20) {
        assert!(prefix <= 10 && len <= 4 << 20);
    }
    if let Ok(batch) = Batch::decode(data) {
        let mut tags = Vec::new();
        for e in &batch.events {
            if let Ok(line) = proto::event_line(e, &mut tags, &Limits::default()) {
                assert!(line.first.is_finite());
            }
        }
    }
});
