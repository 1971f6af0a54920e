//! Protobuf framing, Batch reading and event validation on arbitrary bytes;
//! the in-place reader and prost's generated decoder must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tallyd::protocol::batch::BatchView;
use tallyd::protocol::proto::{self, Batch};
use tallyd::protocol::statsd::Limits;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((prefix, len))) = proto::frame_header(data, 4 << 20) {
        assert!(prefix <= 10 && len <= 4 << 20);
    }
    let view = BatchView::decode(data);
    assert_eq!(view.is_ok(), Batch::decode(data).is_ok());
    if let Ok(batch) = view {
        let mut tags = Vec::new();
        for e in batch.events() {
            if let Ok(line) = proto::event_line(&e, &mut tags, &Limits::default()) {
                assert!(line.first.is_finite());
            }
        }
    }
});
