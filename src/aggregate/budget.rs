//! Per-metric key budgets: cardinality control that never loses a sample.
//!
//! Each metric (its type and name, and for a forwarded key that keeps its
//! edge's host, that host) may write `limit` tagged keys in one interval
//! (its bare key, without tags, takes no place: see [`counts`]), the
//! first rule of [`Budgets`] whose glob matches its name giving the limit.
//! A key new to the interval past its metric's budget is *folded*: its
//! values go to the metric's overflow key instead, the same name with each
//! tag's value replaced by [`OVERFLOW`] (`user:42` → `user:tallyd_overflow`;
//! a bare tag `beta` → `tallyd_overflow`), so a dashboard grouped by any
//! tag shows the folded share as one group, and counter sums, timer counts
//! and set members stay exact in total. A metric whose overflow keys pass
//! [`MAX_OVERFLOW_KEYS`] (its tag *keys* vary too) folds the rest into
//! one key with the single tag `tallyd_overflow`.
//!
//! The idea is StatsHouse's "mapping flood" (a budget of new tag values
//! per metric, the sample kept under a marker value); the process-wide
//! `aggregate.max_keys` and `max_memory` stay the last line of defence.
//!
//! A key pays for this once per interval, when it is first written in it
//! (one lookup of its metric); a live key's later lines never see it.
//! Folding depends on arrival order, so a replay across WAL streams may
//! fold other keys than the live run did; the totals are the same.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::acc::Acc;
use super::key::{self, KeyBuf};
use super::{Generation, MapKey};
use crate::protocol::glob;

/// The tag value (and the bare tag) that marks an overflow key.
pub const OVERFLOW: &str = "tallyd_overflow";

/// Overflow keys one metric may make in an interval before the rest of
/// its folded keys share the single tag [`OVERFLOW`].
pub const MAX_OVERFLOW_KEYS: u32 = 64;

/// The counter that says what folded, in the counters table: one row per
/// folding metric and interval, tagged `metric:<name>` and `type:<type>`,
/// its value the values folded (its host the edge's, for a forwarded one).
pub const FOLDED_METRIC: &str = "tallyd.cardinality.folded";

/// Estimated bytes of a metric's tally in a generation beside its name.
const TALLY_BYTES: u64 = 96;

/// The key budgets in force (`[cardinality]`): a default and rules by
/// name glob, the first match winning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    /// Keys per metric and interval when no rule matches.
    pub default: u32,
    /// `(glob over names, keys)`, in order (see [`glob::matches`]).
    pub rules: Vec<(String, u32)>,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            default: 100_000,
            rules: Vec::new(),
        }
    }
}

impl Budgets {
    /// The budget of the metric named `name`.
    pub fn limit(&self, name: &[u8]) -> u32 {
        self.rules
            .iter()
            .find(|(g, _)| glob::matches(g.as_bytes(), name))
            .map_or(self.default, |&(_, n)| n)
    }
}

/// One metric's keys and folded samples in one generation.
#[derive(Debug)]
pub struct Tally {
    pub limit: u32,
    /// Keys admitted within the budget.
    keys: AtomicU32,
    /// Overflow keys made.
    overflow_keys: AtomicU32,
    /// Values folded into the overflow keys.
    folded: AtomicU64,
}

/// What a generation's tallies say of one metric that folded.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// The metric's key prefix: type byte and name (and `0x01` host).
    pub metric: MapKey,
    pub limit: u32,
    pub keys: u32,
    /// Values (samples) folded into its overflow keys.
    pub values: u64,
}

impl Folded {
    /// The metric's name.
    pub fn name(&self) -> &str {
        key::parts(&self.metric).map_or("", |(_, name, _)| name)
    }

    /// The metric's type as written on the wire (`c`, `ms`...).
    pub fn kind(&self) -> &'static str {
        key::parts(&self.metric).map_or("", |(kind, _, _)| kind.as_str())
    }

    /// The key of its [`FOLDED_METRIC`] row (laid out as [`KeyBuf`]
    /// lays keys out; built by hand, as a name may hold a `,`).
    pub fn row_key(&self) -> Vec<u8> {
        let mut k = vec![crate::protocol::statsd::MetricType::Counter as u8];
        k.extend_from_slice(FOLDED_METRIC.as_bytes());
        k.extend_from_slice(b"\0metric:");
        k.extend_from_slice(self.name().as_bytes());
        k.extend_from_slice(b"\0type:");
        k.extend_from_slice(self.kind().as_bytes());
        if let Some(host) = key::host(&self.metric) {
            k.push(key::HOST);
            k.extend_from_slice(host.as_bytes());
        }
        k
    }
}

/// The metric of `key` (built by [`KeyBuf`]): its type and name, and its
/// host if it carries one, without its tags.
fn metric_of(key: &[u8]) -> MapKey {
    let name_end = memchr::memchr2(0, key::HOST, key).unwrap_or(key.len());
    let mut metric = MapKey::from_slice(&key[..name_end]);
    if let Some(at) = memchr::memchr(key::HOST, &key[name_end..]) {
        metric.extend_from_slice(&key[name_end + at..]);
    }
    metric
}

/// Whether `key` takes a place in its metric's budget: whether it has
/// tags (a `0x00` before any host). A metric's bare key is one key, and
/// its overflow key would be itself, so the budget bounds tag sets only
/// (and the bare keys of plain StatsD, one per metric, skip the tally).
pub(super) fn counts(key: &[u8]) -> bool {
    memchr::memchr2(0, key::HOST, key).is_some_and(|at| key.get(at) == Some(&0))
}

/// Takes a place in its metric's budget for `key`, new to `generation`;
/// false (its `values` counted as folded) when the budget is spent.
/// Without `room` (the interval's key limit or memory budget spent) a
/// metric not yet tallied is not: its key is admitted here and refused by
/// the limit, so that refused keys grow nothing. A key that is not one
/// [`KeyBuf`] built (none is) is admitted.
pub(super) fn admit(generation: &Generation, key: &[u8], values: u64, room: bool) -> bool {
    let metric = metric_of(key);
    let tally = match generation.metrics.get(&metric) {
        Some(t) => t,
        None => {
            let Some((_, name, _)) = key::parts(key).filter(|_| room) else {
                return true;
            };
            let name = name.as_bytes();
            let limit = generation.budgets.limit(name);
            let bytes = TALLY_BYTES + metric.len() as u64;
            generation
                .metrics
                .entry(metric)
                .or_insert_with(|| {
                    generation.bytes.fetch_add(bytes, Relaxed);
                    Tally {
                        limit,
                        keys: AtomicU32::new(0),
                        overflow_keys: AtomicU32::new(0),
                        folded: AtomicU64::new(0),
                    }
                })
                .downgrade()
        }
    };
    if tally.keys.fetch_add(1, Relaxed) < tally.limit {
        return true;
    }
    tally.keys.fetch_sub(1, Relaxed);
    let add = |f: u64| Some(f.saturating_add(values));
    let _ = tally.folded.fetch_update(Relaxed, Relaxed, add);
    false
}

/// Whether `key` is an overflow key (a tag value, or a bare tag, is
/// [`OVERFLOW`]), as an edge forwards one.
pub(super) fn is_overflow(key: &[u8]) -> bool {
    key::parts(key).is_some_and(|(_, _, tags)| {
        tags.tags()
            .any(|t| t == OVERFLOW || t.split_once(':').is_some_and(|(_, v)| v == OVERFLOW))
    })
}

/// Gives back the place [`admit`] took for `key` (the key was refused
/// after all, by the key limit or the memory budget).
pub(super) fn release(generation: &Generation, key: &[u8]) {
    if let Some(t) = generation.metrics.get(&metric_of(key)) {
        t.keys.fetch_sub(1, Relaxed);
    }
}

/// Counts an overflow key made for `key`'s metric.
pub(super) fn count_overflow_key(generation: &Generation, key: &[u8]) {
    if let Some(t) = generation.metrics.get(&metric_of(key)) {
        t.overflow_keys.fetch_add(1, Relaxed);
    }
}

/// Scratch space for overflow keys (one per ingest worker).
#[derive(Default)]
pub struct Fold {
    tags: Vec<u8>,
    key: KeyBuf,
    late: Vec<u8>,
    /// Mapped keys (see [`super::mapping`]).
    pub(super) map: super::mapping::MapBuf,
}

impl Fold {
    /// The overflow key (see the module doc) of `key`, or when `None` of
    /// the key the mapping buffer holds.
    pub(super) fn key(&mut self, generation: &Generation, key: Option<&[u8]>) -> &[u8] {
        let Fold {
            tags,
            key: out,
            map,
            ..
        } = self;
        overflow_key(tags, out, generation, key.unwrap_or_else(|| map.key()))
    }

    /// The key of a late sample of the interval that starts at `start`
    /// (4 bytes LE): `key`'s overflow key when `over`, else `key`; `None`
    /// is the key the mapping buffer holds.
    pub(super) fn late_key(
        &mut self,
        generation: &Generation,
        start: &[u8],
        key: Option<&[u8]>,
        over: bool,
    ) -> &[u8] {
        let Fold {
            tags,
            key: out,
            late,
            map,
        } = self;
        let key = key.unwrap_or_else(|| map.key());
        let key = if over {
            overflow_key(tags, out, generation, key)
        } else {
            key
        };
        late.clear();
        late.extend_from_slice(start);
        late.extend_from_slice(key);
        late
    }
}

fn overflow_key<'a>(
    tags: &mut Vec<u8>,
    out: &'a mut KeyBuf,
    generation: &Generation,
    key: &[u8],
) -> &'a [u8] {
    // `admit` folds only keys that split.
    let Some((kind, name, key_tags)) = key::parts(key) else {
        return out.build(
            crate::protocol::statsd::MetricType::Counter,
            OVERFLOW.as_bytes(),
            b"",
        );
    };
    let many = generation
        .metrics
        .get(&metric_of(key))
        .is_some_and(|t| t.overflow_keys.load(Relaxed) >= MAX_OVERFLOW_KEYS);
    tags.clear();
    if many {
        tags.extend_from_slice(OVERFLOW.as_bytes());
    }
    for tag in key_tags.tags().filter(|_| !many) {
        if !tags.is_empty() {
            tags.push(b',');
        }
        if let Some((k, _)) = tag.split_once(':') {
            tags.extend_from_slice(k.as_bytes());
            tags.push(b':');
        }
        tags.extend_from_slice(OVERFLOW.as_bytes());
    }
    out.build(kind, name.as_bytes(), tags);
    out.with_host(key::host(key).unwrap_or("").as_bytes())
}

impl Generation {
    /// Puts each folding metric's [`FOLDED_METRIC`] counter in this closed
    /// interval's table (its flush is about to drain it), so that it is
    /// one row with any the interval holds under the same key: an edge's
    /// for the same metric and host, or a client's. Returns the folding
    /// metrics ([`Generation::folded`]).
    pub fn put_folded_rows(&self) -> Vec<Folded> {
        let limits = super::AggregateLimits {
            max_keys: usize::MAX,
            max_set_members: 0,
            max_depth: u64::MAX,
            max_memory: u64::MAX,
            timestamp_window: std::time::Duration::ZERO,
            interval: std::time::Duration::from_secs(1),
        };
        let shape = (crate::protocol::statsd::MetricType::Counter, 1);
        let folded = self.folded();
        for f in &folded {
            let key = f.row_key();
            let hash = self.series.hash(&key);
            let stats = &mut crate::telemetry::BlockStats::default();
            let admit = super::admit::Admit::Final;
            super::admit::merge_key(self, &key, hash, shape, admit, stats, &limits, |acc, _| {
                if let Acc::Counter { sum, samples } = acc {
                    *sum += f.values as f64;
                    *samples = samples.saturating_add(f.values);
                }
                0
            });
        }
        folded
    }

    /// The metrics that folded keys in this interval, most folded first.
    pub fn folded(&self) -> Vec<Folded> {
        let mut out: Vec<Folded> = self
            .metrics
            .iter()
            .filter_map(|e| {
                let values = e.folded.load(Relaxed);
                (values > 0).then(|| Folded {
                    metric: e.key().clone(),
                    limit: e.limit,
                    keys: e.keys.load(Relaxed),
                    values,
                })
            })
            .collect();
        out.sort_unstable_by(|a, b| b.values.cmp(&a.values).then(a.metric.cmp(&b.metric)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::statsd::MetricType;

    fn key(name: &str, tags: &str) -> Vec<u8> {
        KeyBuf::default()
            .build(MetricType::Counter, name.as_bytes(), tags.as_bytes())
            .to_vec()
    }

    #[test]
    fn the_first_matching_rule_gives_the_budget() {
        let b = Budgets {
            default: 10,
            rules: vec![("api.*".into(), 2), ("*".into(), 5)],
        };
        assert_eq!(b.limit(b"api.requests"), 2);
        assert_eq!(b.limit(b"db.queries"), 5);
        assert_eq!(Budgets::default().limit(b"x"), 100_000);
    }

    #[test]
    fn an_overflow_key_keeps_tag_keys_and_replaces_values() {
        let g = Generation::new(1, std::time::Duration::ZERO);
        let mut fold = Fold::default();
        let k = key("req", "user:42,env:prod,beta");
        let over = fold.key(&g, Some(&k)).to_vec();
        assert_eq!(
            key::split(&over).map(|p| p.tags),
            Some(vec![
                "env:tallyd_overflow",
                "tallyd_overflow",
                "user:tallyd_overflow"
            ])
        );
        let mut kb = KeyBuf::default();
        kb.build(MetricType::Counter, b"req", b"user:1");
        let hosted = kb.with_host(b"web-7").to_vec();
        let over = fold.key(&g, Some(&hosted)).to_vec();
        assert_eq!(
            key::host(&over),
            Some("web-7"),
            "a forwarded key's host stays"
        );
        assert_eq!(metric_of(&over), metric_of(&hosted));
        assert_ne!(metric_of(&hosted), metric_of(&k), "per host");
    }

    #[test]
    fn a_metric_past_its_budget_folds_and_others_are_still_admitted() {
        let mut g = Generation::new(1, std::time::Duration::ZERO);
        g.budgets = std::sync::Arc::new(Budgets {
            default: 2,
            rules: vec![],
        });
        assert!(admit(&g, &key("req", "u:1"), 1, true));
        assert!(admit(&g, &key("req", "u:2"), 1, true));
        assert!(!admit(&g, &key("req", "u:3"), 3, true));
        assert!(admit(&g, &key("other", "u:3"), 1, true));
        assert!(admit(&g, &key("new", "u:3"), 1, false), "no room: no tally");
        assert_eq!(g.metrics.len(), 2);
        release(&g, &key("req", "u:2"));
        assert!(
            admit(&g, &key("req", "u:4"), 1, true),
            "a released place is free"
        );
        let folded = g.folded();
        assert_eq!(folded.len(), 1);
        assert_eq!(
            (
                folded[0].name(),
                folded[0].kind(),
                folded[0].values,
                folded[0].keys
            ),
            ("req", "c", 3, 2)
        );
        assert_eq!(
            key::split(&folded[0].row_key()),
            Some(key::KeyParts {
                kind: MetricType::Counter,
                name: FOLDED_METRIC,
                tags: vec!["metric:req", "type:c"],
            })
        );
    }

    #[test]
    fn many_overflow_keys_fold_into_one() {
        let g = Generation::new(1, std::time::Duration::ZERO);
        let k = key("req", "a:1");
        admit(&g, &k, 1, true);
        for _ in 0..MAX_OVERFLOW_KEYS {
            count_overflow_key(&g, &k);
        }
        let over = Fold::default().key(&g, Some(&key("req", "z:1,y"))).to_vec();
        assert_eq!(key::split(&over).map(|p| p.tags), Some(vec![OVERFLOW]));
    }

    #[test]
    fn only_a_key_with_tags_takes_a_place() {
        assert!(counts(&key("req", "u:1")));
        assert!(!counts(&key("req", "")));
        let mut kb = KeyBuf::default();
        kb.build(MetricType::Counter, b"req", b"");
        assert!(!counts(kb.with_host(b"web\x007")), "a host is not a tag");
        kb.build(MetricType::Counter, b"req", b"u:1");
        assert!(counts(kb.with_host(b"web-7")));
    }

    #[test]
    fn an_edge_s_overflow_key_is_known_as_one() {
        assert!(is_overflow(&key(
            "req",
            "u:tallyd_overflow,env:tallyd_overflow"
        )));
        assert!(is_overflow(&key("req", "tallyd_overflow")));
        assert!(!is_overflow(&key("req", "u:1,tallyd_overflowing")));
    }
}
