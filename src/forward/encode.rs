//! A flush's bodies as protobuf batches of forwarded state (protocol
//! version 2, proto/tallyd.proto), split among the upstreams by key and cut
//! to size, each framed as it is sent. Pure code.
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
//!   inside the aggregator's deduplication window. A part larger than the
//!   aggregator's `proto.max_frame` (a flush of gigabytes, or a set of
//!   hundreds of thousands of members) is refused by it, and waits.
//! - **Cost.** Counter and gauge rows (most of a flush) go from the
//!   RowBinary bodies to protobuf bytes without a row struct or a string
//!   copied; timers, sets, events and service checks go through their row
//!   structs and prost.

use std::hash::Hasher;

use prost::Message;
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::ledger::dedup::WINDOW;
use crate::outbox::flush::TAG_BITS;
use crate::outbox::rowbinary::{self, Bodies, KeyView, TABLES};
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
pub fn upstream_of<'t>(
    upstreams: &[String],
    name: &[u8],
    tags: impl Iterator<Item = &'t [u8]> + Clone,
) -> usize {
    if upstreams.len() < 2 {
        return 0;
    }
    let score = |u: &String| {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0x7461_6c6c_7964, 0x6564_6765);
        h.write(u.as_bytes());
        h.write_u8(0xff);
        h.write(name);
        for t in tags.clone() {
            h.write_u8(0);
            h.write(t);
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
    /// The edge's host, which its events and service checks keep, and
    /// its metric rows unless they drop it (see [`Shape::drops_host`]).
    pub host: &'a str,
    /// `forward.host = "keep"`...
    pub keep_host: bool,
    /// ...but not for names that match one of these globs
    /// (`forward.host_except`), which take the other mode.
    pub host_except: &'a [String],
    pub batch_size: usize,
}

impl Shape<'_> {
    /// Whether the rows of metric `name` merge fleet-wide (the state says
    /// `host_dropped`).
    pub fn drops_host(&self, name: &[u8]) -> bool {
        let except = self
            .host_except
            .iter()
            .any(|p| crate::protocol::glob::matches(p.as_bytes(), name));
        self.keep_host == except
    }
}

/// Protobuf field keys (`number << 3 | wire type`) of the messages built
/// here by hand.
mod key {
    /// Batch: client_id, sequence, events, host, version.
    pub const CLIENT_ID: u8 = 1 << 3 | 2;
    pub const SEQUENCE: u8 = 2 << 3;
    pub const EVENTS: u64 = 3 << 3 | 2;
    pub const HOST: u8 = 4 << 3 | 2;
    pub const VERSION: u8 = 5 << 3;
    pub const DOGSTATSD_EVENTS: u64 = 6 << 3 | 2;
    pub const SERVICE_CHECKS: u64 = 7 << 3 | 2;
    /// Event: name, tags, counter_state, gauge_state, interval_start.
    pub const NAME: u8 = 1 << 3 | 2;
    pub const TAGS: u8 = 2 << 3 | 2;
    pub const COUNTER_STATE: u8 = 11 << 3 | 2;
    pub const GAUGE_STATE: u8 = 12 << 3 | 2;
    pub const INTERVAL_START: u8 = 15 << 3;
    /// Event field 16, a varint: two bytes of key.
    pub const HOST_DROPPED: [u8; 2] = [0x80, 0x01];
    /// Tag: key. A state's first field (a double) and second (a varint).
    pub const TAG_KEY: u8 = 1 << 3 | 2;
    pub const STATE_DOUBLE: u8 = 1 << 3 | 1;
    pub const STATE_SAMPLES: u8 = 2 << 3;
}

/// One upstream's parts (own, or moved from a lost upstream) as they fill.
struct Parts {
    /// The first part's number.
    first: usize,
    /// Finished parts, each framed (its length before it).
    done: Vec<Vec<u8>>,
    /// The part being filled: a Batch's bytes, header first.
    open: Vec<u8>,
    /// Whether `open` has an event yet.
    filled: bool,
    /// Messages (rows) pushed.
    rows: u64,
}

impl Parts {
    fn new(first: usize) -> Parts {
        Parts {
            first,
            done: Vec::new(),
            open: Vec::new(),
            filled: false,
            rows: 0,
        }
    }

    /// Adds one message of `len` bytes under Batch field `field`, written by
    /// `write`, cutting a new part first when it would pass `limit`.
    fn push(
        &mut self,
        shape: &Shape<'_>,
        limit: usize,
        field: u64,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        let size = 1 + encoded_len_varint(len as u64) + len;
        if self.filled && self.open.len() + size > limit {
            self.finish();
        }
        if !self.filled {
            self.header(shape);
            self.filled = true;
        }
        self.rows += 1;
        encode_varint(field, &mut self.open);
        encode_varint(len as u64, &mut self.open);
        let at = self.open.len();
        write(&mut self.open);
        debug_assert_eq!(self.open.len() - at, len, "a message's length as computed");
    }

    /// A new part's header fields.
    fn header(&mut self, shape: &Shape<'_>) {
        let b = &mut self.open;
        let seq = sequence(shape.flush_id, self.first + self.done.len());
        b.push(key::CLIENT_ID);
        encode_varint(shape.client_id.len() as u64, b);
        b.extend_from_slice(shape.client_id.as_bytes());
        b.push(key::SEQUENCE);
        encode_varint(seq, b);
        if !shape.host.is_empty() {
            b.push(key::HOST);
            encode_varint(shape.host.len() as u64, b);
            b.extend_from_slice(shape.host.as_bytes());
        }
        b.push(key::VERSION);
        encode_varint(u64::from(crate::protocol::proto::VERSION), b);
    }

    fn finish(&mut self) {
        if self.filled {
            let mut frame = Vec::with_capacity(self.open.len() + 5);
            encode_varint(self.open.len() as u64, &mut frame);
            frame.extend_from_slice(&self.open);
            self.done.push(frame);
            self.open.clear();
            self.filled = false;
        }
    }
}

/// The length of a length-delimited field's value `len` with its key.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Writes a counter's or gauge's Event: name, tags, state, interval, and
/// whether it drops the host.
fn state_event(
    out: &mut Vec<u8>,
    k: &KeyView<'_>,
    state_key: u8,
    (value, samples): (f64, u64),
    ts: u32,
    state_len: usize,
    drops_host: bool,
) {
    out.push(key::NAME);
    encode_varint(k.name.len() as u64, out);
    out.extend_from_slice(k.name);
    for t in k.tags() {
        out.push(key::TAGS);
        encode_varint(field_len(t.len()) as u64, out);
        out.push(key::TAG_KEY);
        encode_varint(t.len() as u64, out);
        out.extend_from_slice(t);
    }
    out.push(state_key);
    encode_varint(state_len as u64, out);
    out.push(key::STATE_DOUBLE);
    out.extend_from_slice(&value.to_le_bytes());
    out.push(key::STATE_SAMPLES);
    encode_varint(samples, out);
    out.push(key::INTERVAL_START);
    encode_varint(u64::from(ts), out);
    if drops_host {
        out.extend_from_slice(&key::HOST_DROPPED);
        out.push(1);
    }
}

/// One upstream's share of a flush: its parts, each framed as it is sent
/// (its length before it), in order, and the rows they hold.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Framed {
    pub frames: Vec<Vec<u8>>,
    pub rows: u64,
}

/// The share of `bodies` of each upstream (in `shape.upstreams` order):
/// every metric row as its state, and the events and service checks (an
/// event by its title, a check by its name, among the upstreams). Errors
/// for a body that does not read as its table's rows.
pub fn frames(bodies: &Bodies, shape: &Shape<'_>) -> Result<Vec<Framed>, String> {
    let total: usize = bodies.bodies.iter().map(Vec::len).sum();
    // Protobuf takes about what RowBinary does, and a little more; where
    // that guess is short, the parts are cut again, twice as large, so that
    // no share passes MAX_PARTS (its own parts and the moved ones keep
    // their numbers apart).
    let mut limit = shape
        .batch_size
        .max(total.saturating_mul(2).div_ceil(MAX_PARTS));
    loop {
        let out = frames_at(bodies, shape, limit)?;
        if out
            .iter()
            .all(|[own, moved]| own.done.len().max(moved.done.len()) <= MAX_PARTS)
        {
            return Ok(out
                .into_iter()
                .map(|[own, moved]| Framed {
                    rows: own.rows + moved.rows,
                    frames: own.done.into_iter().chain(moved.done).collect(),
                })
                .collect());
        }
        limit = limit.saturating_mul(2);
    }
}

/// [`frames`] in parts of at most `limit` bytes (a single message larger
/// than that is a part of its own), each share's own and moved parts
/// finished.
fn frames_at(bodies: &Bodies, shape: &Shape<'_>, limit: usize) -> Result<Vec<[Parts; 2]>, String> {
    let n = shape.upstreams.len().max(1);
    let mut out: Vec<[Parts; 2]> = (0..n)
        .map(|_| [Parts::new(0), Parts::new(MAX_PARTS)])
        .collect();
    let kept: Vec<String> = (0..shape.upstreams.len())
        .filter(|&u| !shape.lost.get(u).copied().unwrap_or(false))
        .map(|u| shape.upstreams[u].clone())
        .collect();
    for (table, state_key) in [(0, key::COUNTER_STATE), (1, key::GAUGE_STATE)] {
        let mut failed = None;
        rowbinary::each_row(&bodies.bodies[table], table == 1, false, |row| {
            let k = match KeyView::read(row.key) {
                Ok(k) => k,
                Err(e) => {
                    failed.get_or_insert(e);
                    return;
                }
            };
            let (u, moved) = route(shape, &kept, k.name, k.tags());
            let state_len = 9 + 1 + encoded_len_varint(row.samples);
            let len = field_len(k.name.len())
                + k.tags()
                    .map(|t| field_len(field_len(t.len())))
                    .sum::<usize>()
                + field_len(state_len)
                + 1
                + encoded_len_varint(u64::from(row.ts));
            let drops = shape.drops_host(k.name);
            let len = len + if drops { 3 } else { 0 };
            out[u][moved].push(shape, limit, key::EVENTS, len, |b| {
                let value = (row.value, row.samples);
                state_event(b, &k, state_key, value, row.ts, state_len, drops)
            });
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    // The other tables, through their row structs.
    let mut rest = Bodies::default();
    for t in 2..TABLES {
        rest.bodies[t].clone_from(&bodies.bodies[t]);
        rest.rows[t] = bodies.rows[t];
    }
    if rest.bodies.iter().any(|b| !b.is_empty()) {
        let rows = rowbinary::decode(&rest)?;
        let mut push = |name: &str, tags: &[String], field: u64, bytes: Vec<u8>| {
            let (u, moved) = route(
                shape,
                &kept,
                name.as_bytes(),
                tags.iter().map(String::as_bytes),
            );
            out[u][moved].push(shape, limit, field, bytes.len(), |b| {
                b.extend_from_slice(&bytes)
            });
        };
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
            let value = Value::DistributionState(state);
            let e = event(shape, &r.name, &r.tags, r.ts, value);
            push(&r.name, &r.tags, key::EVENTS, e.encode_to_vec());
        }
        for r in &rows.sets {
            let state = pb::SetState {
                member_hashes: r.member_hashes.clone(),
                samples: r.samples,
            };
            let e = event(shape, &r.name, &r.tags, r.ts, Value::SetState(state));
            push(&r.name, &r.tags, key::EVENTS, e.encode_to_vec());
        }
        for e in &rows.events {
            let m = pb::DogstatsdEvent {
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
            };
            push(&e.title, &e.tags, key::DOGSTATSD_EVENTS, m.encode_to_vec());
        }
        for c in &rows.service_checks {
            let m = pb::ServiceCheck {
                interval_start: u64::from(c.ts),
                timestamp: u64::from(c.check_ts),
                name: c.name.clone(),
                status: u32::from(c.status),
                hostname: c.hostname.clone(),
                tags: c.tags.clone(),
                message: c.message.clone(),
            };
            push(&c.name, &c.tags, key::SERVICE_CHECKS, m.encode_to_vec());
        }
    }
    for [own, moved] in &mut out {
        own.finish();
        moved.finish();
    }
    Ok(out)
}

/// The upstream (an index in the plan) of key `(name, tags)`, and 1 when
/// it was moved there from a lost upstream (else 0).
fn route<'t>(
    shape: &Shape<'_>,
    kept: &[String],
    name: &[u8],
    tags: impl Iterator<Item = &'t [u8]> + Clone,
) -> (usize, usize) {
    let u = upstream_of(shape.upstreams, name, tags.clone());
    if !shape.lost.get(u).copied().unwrap_or(false) || kept.is_empty() {
        return (u, 0);
    }
    let to = &kept[upstream_of(kept, name, tags)];
    (shape.upstreams.iter().position(|x| x == to).unwrap_or(u), 1)
}

/// A metric Event of forwarded state.
fn event(shape: &Shape<'_>, name: &str, tags: &[String], ts: u32, value: Value) -> pb::Event {
    pb::Event {
        name: name.to_owned(),
        // Each tag whole as the key: the aggregator rebuilds the same tag
        // text (`k:v`, or a bare `k`).
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
        host_dropped: shape.drops_host(name.as_bytes()),
    }
}

#[cfg(test)]
mod tests;
