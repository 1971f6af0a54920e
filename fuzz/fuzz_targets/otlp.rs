//! OTLP request bodies on arbitrary bytes (the first byte picks protobuf or
//! JSON, gzip or not): decoding never panics, and a request that decodes is
//! walked and converted against the series state without panicking, its
//! batches read back by the WAL reader.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tallyd::ingest::otlp::convert::{self, Context};
use tallyd::ledger::temporality::Temporality;
use tallyd::protocol::batch::BatchView;
use tallyd::protocol::otlp::{self, Encoding};

fn state() -> &'static Temporality {
    static STATE: OnceLock<Temporality> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tallyd-fuzz-otlp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Temporality::open(&dir, 0, Arc::new(tallyd::fs::RealFs)).expect("state")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let encoding = if mode & 1 == 0 {
        Encoding::Protobuf
    } else {
        Encoding::Json
    };
    let Ok(request) = otlp::decode(body, encoding, mode & 2 != 0, 1 << 20) else {
        return;
    };
    let tags = ["service.name".to_owned()];
    let cx = Context {
        resource_tags: &tags,
        budget: 16 << 20,
        started: Duration::from_secs(1_700_000_000),
        window: Duration::from_secs(3600),
        interval: Duration::from_secs(1),
        limits: tallyd::protocol::statsd::Limits::default(),
        max_bytes: 64 << 20,
    };
    let mut guard = state().lock();
    let Some(converted) = convert::convert(&request, &mut guard, &cx) else {
        return;
    };
    for b in &converted.record.batches {
        assert!(BatchView::decode(b).is_ok());
    }
    guard.commit();
});
