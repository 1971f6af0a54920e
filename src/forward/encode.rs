//! A flush's rows as protobuf batches of forwarded state (protocol version
//! 2, proto/tallyd.proto), split among the upstreams by key and cut to
//! size. Pure code.
//!
//! - **Which upstream.** Each key (name and tags, never the host) goes to
//!   the upstream of highest rendezvous score (Thaler and Ravishankar,
//!   "Using name-based mappings to increase hit rates", 1998): SipHash-1-3
//!   with a fixed key of the upstream's address and the key, so every edge
//!   sends a key's rows to the same aggregator, and adding or removing one
//!   upstream moves only the keys that it gains or loses.
//! - **Identity.** Every part of flush `f` for one upstream is sequence
//!   `(f >> 20 << 20) | part` of client [`client_id`]: the flush id's tick
//!   with the part's number in the bits of the instance tag, which the
//!   client id already names. A re-send of the flush (it is only ever
//!   re-sent whole, with the same bytes, see [`super`]) repeats the same
//!   sequences, which the aggregator's deduplication answers `DUPLICATE`.
//! - **Size.** A part holds events up to `batch_size` bytes; a flush is cut
//!   into at most [`MAX_PARTS`] parts per upstream (larger ones past that),
//!   inside the aggregator's deduplication window.

use std::hash::Hasher;

use prost::Message;

use crate::ledger::dedup::WINDOW;
use crate::outbox::flush::TAG_BITS;
use crate::outbox::rows::Batch as Rows;
use crate::protocol::proto::pb::{self, event::Value};

/// Most parts of one flush for one upstream: all of them stay inside the
/// aggregator's deduplication window ([`WINDOW`] sequences), so a re-send
/// of the first part after the last was taken is still a duplicate.
pub const MAX_PARTS: usize = (WINDOW / 2) as usize;

/// The client id an edge sends under: its host and instance, so that two
/// clones of one data dir (same instance, other host) are two clients.
pub fn client_id(host: &str, instance: u64) -> String {
    let mut id = format!("tallyd-edge/{instance:016x}/{host}");
    let mut end = id.len().min(crate::ledger::dedup::MAX_CLIENT_ID);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id.truncate(end);
    id
}

/// The sequence of part `part` of flush `flush_id`.
pub fn sequence(flush_id: u64, part: usize) -> u64 {
    (flush_id >> TAG_BITS << TAG_BITS) | (part as u64 & ((1 << TAG_BITS) - 1))
}

/// The upstream (an index in `upstreams`) that key `(name, tags)` goes to.
pub fn upstream_of(upstreams: &[String], name: &str, tags: &[String]) -> usize {
    let score = |u: &String| {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0x7461_6c6c_7964, 0x6564_6765);
        h.write(u.as_bytes());
        h.write_u8(0xff);
        h.write(name.as_bytes());
        for t in tags {
            h.write_u8(0);
            h.write(t.as_bytes());
        }
        h.finish()
    };
    (0..upstreams.len())
        .max_by_key(|&i| (score(&upstreams[i]), std::cmp::Reverse(i)))
        .unwrap_or(0)
}

/// What the batches of one flush are made with.
pub struct Shape<'a> {
    /// The flush's plan: the upstreams its keys are spread over.
    pub upstreams: &'a [String],
    /// Per upstream of the plan: declared lost (no longer configured). Its
    /// keys go to the others of the plan instead (by rendezvous over them),
    /// in parts numbered from [`MAX_PARTS`], apart from the parts each
    /// took (or may have taken) before under their own numbers.
    pub lost: &'a [bool],
    pub client_id: &'a str,
    pub flush_id: u64,
    /// The host the rows keep (`forward.host = "keep"`), or empty.
    pub host: &'a str,
    pub batch_size: usize,
}

/// One thing a part carries.
enum Item {
    Metric(pb::Event),
    Event(pb::DogstatsdEvent),
    Check(pb::ServiceCheck),
}

impl Item {
    /// Its bytes in a batch (with its field key and length).
    fn len(&self) -> usize {
        4 + match self {
            Item::Metric(e) => e.encoded_len(),
            Item::Event(e) => e.encoded_len(),
            Item::Check(c) => c.encoded_len(),
        }
    }
}

/// The batches of `rows` for each upstream (in `shape.upstreams` order),
/// each part in order: every metric row as its state, and the events and
/// service checks (an event by its title, a check by its name, among the
/// upstreams).
pub fn batches(rows: &Rows, shape: &Shape<'_>) -> Vec<Vec<pb::Batch>> {
    let n = shape.upstreams.len().max(1);
    // Per upstream: its own items, then those moved to it from a lost one.
    let mut items: Vec<[Vec<Item>; 2]> = (0..n).map(|_| Default::default()).collect();
    let kept: Vec<String> = (0..shape.upstreams.len())
        .filter(|&u| !shape.lost.get(u).copied().unwrap_or(false))
        .map(|u| shape.upstreams[u].clone())
        .collect();
    let route = |name: &str, tags: &[String]| -> (usize, usize) {
        let u = upstream_of(shape.upstreams, name, tags);
        if !shape.lost.get(u).copied().unwrap_or(false) || kept.is_empty() {
            return (u, 0);
        }
        let to = &kept[upstream_of(&kept, name, tags)];
        (shape.upstreams.iter().position(|x| x == to).unwrap_or(u), 1)
    };
    let mut add = |name: &str, tags: &[String], item: Item| {
        let (u, moved) = route(name, tags);
        items[u][moved].push(item);
    };
    let mut push = |name: &str, tags: &[String], ts: u32, value: Value| {
        add(
            name,
            tags,
            Item::Metric(pb::Event {
                name: name.to_owned(),
                // Each tag whole as the key: the aggregator rebuilds the same
                // tag text (`k:v`, or a bare `k`).
                tags: tags
                    .iter()
                    .map(|t| pb::Tag {
                        key: t.clone(),
                        value: String::new(),
                    })
                    .collect(),
                value: Some(value),
                sample_rate: 0.0,
                interval_start: u64::from(ts),
            }),
        );
    };
    for r in &rows.counters {
        let state = pb::CounterState {
            sum: r.value,
            samples: r.samples,
        };
        push(&r.name, &r.tags, r.ts, Value::CounterState(state));
    }
    for r in &rows.gauges {
        let state = pb::GaugeState {
            value: r.value,
            samples: r.samples,
        };
        push(&r.name, &r.tags, r.ts, Value::GaugeState(state));
    }
    for r in &rows.timers {
        use pb::distribution_state::Kind;
        let kind = match r.kind.as_str() {
            "h" => Kind::Histogram,
            "d" => Kind::Distribution,
            _ => Kind::Timer,
        };
        let state = pb::DistributionState {
            kind: kind as i32,
            count: r.count,
            sum: r.sum,
            min: r.min,
            max: r.max,
            samples: r.samples,
            bucket_values: r.bucket_values.clone(),
            bucket_weights: r.bucket_counts.clone(),
        };
        push(&r.name, &r.tags, r.ts, Value::DistributionState(state));
    }
    for r in &rows.sets {
        let state = pb::SetState {
            member_hashes: r.member_hashes.clone(),
            samples: r.samples,
        };
        push(&r.name, &r.tags, r.ts, Value::SetState(state));
    }
    for e in &rows.events {
        add(
            &e.title,
            &e.tags,
            Item::Event(pb::DogstatsdEvent {
                interval_start: u64::from(e.ts),
                timestamp: u64::from(e.event_ts),
                title: e.title.clone(),
                text: e.text.clone(),
                hostname: e.hostname.clone(),
                aggregation_key: e.aggregation_key.clone(),
                priority: e.priority.clone(),
                source_type: e.source_type.clone(),
                alert_type: e.alert_type.clone(),
                tags: e.tags.clone(),
            }),
        );
    }
    for c in &rows.service_checks {
        add(
            &c.name,
            &c.tags,
            Item::Check(pb::ServiceCheck {
                interval_start: u64::from(c.ts),
                timestamp: u64::from(c.check_ts),
                name: c.name.clone(),
                status: u32::from(c.status),
                hostname: c.hostname.clone(),
                tags: c.tags.clone(),
                message: c.message.clone(),
            }),
        );
    }
    items
        .into_iter()
        .flat_map(|[own, moved]| {
            let mut parts = cut(own, 0, shape);
            parts.extend(cut(moved, MAX_PARTS, shape));
            [parts]
        })
        .collect()
}

/// `items` as parts of at most `batch_size` bytes (larger where that
/// would make more than [`MAX_PARTS`]), numbered from `first`.
fn cut(items: Vec<Item>, first: usize, shape: &Shape<'_>) -> Vec<pb::Batch> {
    let total: usize = items.iter().map(Item::len).sum();
    let limit = shape.batch_size.max(total.div_ceil(MAX_PARTS));
    let mut parts: Vec<pb::Batch> = Vec::new();
    let mut size = usize::MAX;
    for item in items {
        let len = item.len();
        if size.saturating_add(len) > limit {
            parts.push(pb::Batch {
                client_id: shape.client_id.to_owned(),
                sequence: sequence(shape.flush_id, first + parts.len()),
                host: shape.host.to_owned(),
                version: crate::protocol::proto::VERSION,
                ..pb::Batch::default()
            });
            size = 0;
        }
        size += len;
        if let Some(p) = parts.last_mut() {
            match item {
                Item::Metric(e) => p.events.push(e),
                Item::Event(e) => p.dogstatsd_events.push(e),
                Item::Check(c) => p.service_checks.push(c),
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::rows::CounterRow;

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

    #[test]
    fn every_key_goes_to_one_upstream_and_the_share_is_even() {
        let ups: Vec<String> = (1..=3).map(|i| format!("agg{i}:8126")).collect();
        let mut seen = [0usize; 3];
        for k in 0..3000 {
            let name = format!("m{k}");
            let u = upstream_of(&ups, &name, &[]);
            assert_eq!(u, upstream_of(&ups, &name, &[]), "stable");
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
            let before = &ups[upstream_of(&ups, &name, &[])];
            let after = &two[upstream_of(&two, &name, &[])];
            if before != &ups[1] {
                assert_eq!(before, after, "{name}");
            }
        }
    }

    #[test]
    fn parts_are_cut_to_size_with_sequences_of_the_flush() {
        let rows = Rows {
            counters: (0..1000).map(|i| counter(&format!("m{i}"), 60)).collect(),
            ..Rows::default()
        };
        let flush_id = (5 << TAG_BITS) | 0xabc;
        let ups = vec!["a:1".to_string()];
        let shape = Shape {
            upstreams: &ups,
            lost: &[],
            client_id: "c",
            flush_id,
            host: "web-1",
            batch_size: 4096,
        };
        let parts = &batches(&rows, &shape)[0];
        assert!(parts.len() > 5, "{}", parts.len());
        let events: usize = parts.iter().map(|p| p.events.len()).sum();
        assert_eq!(events, 1000);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.sequence, (5 << TAG_BITS) | i as u64);
            assert!(p.encoded_len() <= 4096 + 64, "{}", p.encoded_len());
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
        let shape = |lost: &'static [bool]| Shape {
            upstreams: &ups,
            lost,
            client_id: "c",
            flush_id: 9 << TAG_BITS,
            host: "",
            batch_size: 1 << 20,
        };
        let before = batches(&rows, &shape(&[]));
        let after = batches(&rows, &shape(&[false, true, false]));
        assert!(after[1].is_empty(), "nothing goes to the lost one");
        for u in [0, 2] {
            assert_eq!(
                after[u][0], before[u][0],
                "the parts it may have taken, unchanged"
            );
            let moved = &after[u][1];
            assert_eq!(moved.sequence, (9 << TAG_BITS) | MAX_PARTS as u64);
            for e in &moved.events {
                let tags: Vec<String> = e.tags.iter().map(|t| t.key.clone()).collect();
                assert_eq!(
                    upstream_of(&ups, &e.name, &tags),
                    1,
                    "only the lost one's keys move"
                );
            }
        }
        let total: usize = after.iter().flatten().map(|p| p.events.len()).sum();
        assert_eq!(total, 300);
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
        let shape = Shape {
            upstreams: &ups,
            lost: &[],
            client_id: "c",
            flush_id: 1 << TAG_BITS,
            host: "",
            batch_size: 4096,
        };
        let parts = &batches(&rows, &shape)[0];
        assert!(parts.len() <= MAX_PARTS, "{}", parts.len());
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
}
