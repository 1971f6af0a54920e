//! WAL segment header and record decoding on arbitrary segment bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tallyd::wal::format::{self, Decoded};

fuzz_target!(|data: &[u8]| {
    let sig = format::SegmentHeader::decode(data).map_or(0, |h| h.signature());
    let mut at = format::SEGMENT_HEADER;
    while let Decoded::Record(r, next) = format::decode_record(data, at, sig) {
        assert!(next > at && next <= data.len() && !r.payload.is_empty());
        at = next;
    }
});
