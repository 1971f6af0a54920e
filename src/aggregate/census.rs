//! The census: live keys counted per metric, for the admin API (the
//! explorer's metric search, the status page's and `tallyd top`'s top
//! lists). One scan of the series table ([`super::series::Series::scan`]);
//! nothing is kept between scans.

use std::collections::HashMap;

use super::acc::Acc;
use super::key;
use crate::protocol::statsd::MetricType;

/// Metrics counted; past this many, new ones are left out (the scan's
/// memory stays bounded).
pub const MAX_METRICS: usize = 100_000;
/// Tag keys listed per metric (the first seen), and the longest listed.
pub const MAX_TAG_KEYS: usize = 32;
pub const MAX_TAG_KEY_LEN: usize = 128;

/// One metric (a name of one table) in the series table.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricCensus {
    pub name: String,
    /// The table's type: `counter`, `gauge`, `timer` (`ms`, `h` and `d`)
    /// or `set`.
    pub kind: &'static str,
    /// Live keys (tag sets and hosts).
    pub keys: u64,
    /// Raw samples in the open interval.
    pub samples: u64,
    /// Samples per second: the open interval's over its age (see
    /// [`crate::admin`]'s recent census for one smoothed over scans).
    pub per_second: f64,
    /// Its tag keys (the text before a tag's first `:`), at most
    /// [`MAX_TAG_KEYS`], sorted.
    pub tag_keys: Vec<String>,
}

/// Every metric of the series table, most keys first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Census {
    pub metrics: Vec<MetricCensus>,
    /// How long the open interval had been open at the scan, seconds
    /// (its samples over this are per second).
    pub open_secs: f64,
}

/// The table's name for a line type.
pub fn kind_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::Counter => "counter",
        MetricType::Gauge => "gauge",
        MetricType::Timer | MetricType::Histogram | MetricType::Distribution => "timer",
        MetricType::Set => "set",
    }
}

fn samples(acc: &Acc) -> u64 {
    match acc {
        Acc::Counter { samples, .. } => *samples,
        Acc::Gauge(g) => g.samples,
        Acc::Dist(d) => d.samples,
        Acc::Set(s) => s.samples,
    }
}

/// The tables, in the order a [`Tally`] keeps them.
const KINDS: [&str; 4] = ["counter", "gauge", "timer", "set"];

/// Counts keys one at a time ([`Tally::add`]), then [`Tally::finish`].
#[derive(Debug, Default)]
pub struct Tally {
    /// Per table (see [`KINDS`]), by name.
    by_name: [HashMap<Box<str>, MetricCensus>; 4],
    metrics: usize,
}

impl Tally {
    /// Counts one key of the series table, with its open-interval value.
    pub fn add(&mut self, key: &[u8], value: Option<&Acc>) {
        let Some((kind, name, tags)) = key::parts(key) else {
            return;
        };
        let kind = kind_name(kind);
        let map = &mut self.by_name[KINDS.iter().position(|&k| k == kind).unwrap_or(0)];
        if !map.contains_key(name) {
            if self.metrics >= MAX_METRICS {
                return;
            }
            self.metrics += 1;
            map.insert(
                Box::from(name),
                MetricCensus {
                    name: name.to_owned(),
                    kind,
                    keys: 0,
                    samples: 0,
                    per_second: 0.0,
                    tag_keys: Vec::new(),
                },
            );
        }
        let Some(entry) = map.get_mut(name) else {
            return;
        };
        entry.keys += 1;
        entry.samples = entry.samples.saturating_add(value.map_or(0, samples));
        for tag in tags.tags() {
            let k = tag.split_once(':').map_or(tag, |(k, _)| k);
            if entry.tag_keys.len() < MAX_TAG_KEYS
                && k.len() <= MAX_TAG_KEY_LEN
                && !entry.tag_keys.iter().any(|t| t == k)
            {
                entry.tag_keys.push(k.to_owned());
            }
        }
    }

    /// The census, most keys first (then by name), of an interval open for
    /// `open_secs`.
    pub fn finish(self, open_secs: f64) -> Census {
        let mut metrics: Vec<MetricCensus> = self
            .by_name
            .into_iter()
            .flat_map(HashMap::into_values)
            .collect();
        for m in &mut metrics {
            m.tag_keys.sort();
            m.per_second = m.samples as f64 / open_secs.max(0.001);
        }
        metrics.sort_by(|a, b| b.keys.cmp(&a.keys).then_with(|| a.name.cmp(&b.name)));
        Census { metrics, open_secs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::key::KeyBuf;

    #[test]
    fn keys_are_counted_per_metric_and_type_with_their_tag_keys() {
        let mut t = Tally::default();
        let mut k = KeyBuf::default();
        for path in ["/a", "/b", "/c"] {
            let tags = format!("path:{path},env:prod");
            t.add(
                k.build(MetricType::Counter, b"req", tags.as_bytes()),
                Some(&Acc::Counter {
                    sum: 1.0,
                    samples: 2,
                }),
            );
        }
        t.add(k.build(MetricType::Gauge, b"req", b""), None);
        t.add(k.build(MetricType::Histogram, b"lat", b"host"), None);
        let c = t.finish(2.0);
        assert_eq!(c.metrics.len(), 3);
        assert_eq!(
            c.metrics[0],
            MetricCensus {
                name: "req".into(),
                kind: "counter",
                keys: 3,
                samples: 6,
                per_second: 3.0,
                tag_keys: vec!["env".into(), "path".into()],
            }
        );
        assert_eq!(
            (c.metrics[1].name.as_str(), c.metrics[1].kind),
            ("lat", "timer")
        );
        assert_eq!(c.metrics[1].tag_keys, vec!["host".to_string()]);
        assert_eq!((c.metrics[2].kind, c.metrics[2].keys), ("gauge", 1));
    }
}
