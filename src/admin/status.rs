//! `GET /api/status`: `/metrics` as JSON, with health first and the
//! census's top lists (the status page's and `tallyd top`'s one source).
//! The exposition is parsed back rather than listed twice, so a counter
//! added to `/metrics` shows up here without a second list to keep.
//!
//! Pure: text and a census in, JSON out.

use serde_json::{Map, Value, json};

use crate::aggregate::census::Census;

/// Entries in each top list.
pub const TOP: usize = 10;

/// One sample of a Prometheus text exposition: `name{labels} value`.
#[derive(Debug, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, String)>,
    pub value: f64,
}

/// The samples of a text exposition (version 0.0.4); comments, blank and
/// unreadable lines are skipped.
pub fn parse(text: &str) -> Vec<Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample<'_>> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(at) => line.split_at(at),
        None => return None,
    };
    let mut labels = Vec::new();
    let mut rest = rest;
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            inner = inner.trim_start_matches(',');
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inner.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key, value));
            inner = &after[end + 1..];
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A number as JSON: whole numbers without a fraction (`80`, not
/// `80.0`: shorter, and exact up to 2^53), `null` where JSON has none.
pub fn number(v: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT {
        // Whole and within 2^53: the cast is exact.
        return Value::from(v as i64);
    }
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// What the status page shows, as one JSON object (see the README's
/// "Admin API"). `health` is `("ok" | "degraded" | "not ready", problems)`.
pub struct Status<'a> {
    pub time: f64,
    pub host: &'a str,
    pub flush_interval: u64,
    pub health: (&'a str, Vec<String>),
    pub metrics: &'a str,
    pub census: &'a Census,
    /// ClickHouse's state: `None` while it takes tallyd's statements, else
    /// (seconds it has failed every one, its last error).
    pub clickhouse_failing: Option<(u64, String)>,
}

impl Status<'_> {
    pub fn to_json(&self) -> Value {
        let metrics: Vec<Value> = parse(self.metrics)
            .into_iter()
            .map(|s| {
                let labels: Map<String, Value> = s
                    .labels
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), Value::String(v)))
                    .collect();
                json!({"name": s.name, "labels": labels, "value": number(s.value)})
            })
            .collect();
        let top_keys: Vec<Value> = self
            .census
            .metrics
            .iter()
            .take(TOP)
            .map(|m| json!({"name": m.name, "type": m.kind, "keys": m.keys}))
            .collect();
        let mut by_samples: Vec<_> = self
            .census
            .metrics
            .iter()
            .filter(|m| m.per_second > 0.0)
            .collect();
        by_samples.sort_by(|a, b| {
            b.per_second
                .total_cmp(&a.per_second)
                .then_with(|| a.name.cmp(&b.name))
        });
        let top_samples: Vec<Value> = by_samples
            .into_iter()
            .take(TOP)
            .map(|m| {
                json!({"name": m.name, "type": m.kind, "samples": m.samples,
                       "per_second": number(m.per_second)})
            })
            .collect();
        json!({
            "time": number(self.time),
            "host": self.host,
            "version": env!("CARGO_PKG_VERSION"),
            "flush_interval": self.flush_interval,
            "health": {"status": self.health.0, "problems": self.health.1},
            "clickhouse": match &self.clickhouse_failing {
                None => json!({"up": true}),
                Some((secs, error)) => json!({"up": false, "failing_seconds": secs, "last_error": error}),
            },
            "metrics": metrics,
            "top_keys": top_keys,
            "top_samples": top_samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::census::MetricCensus;

    #[test]
    fn an_exposition_parses_into_samples_with_their_labels() {
        let text = "# HELP a b\n# TYPE a counter\na 3\nb{reason=\"wal_full\",x=\"q\\\"u\\\\o\"} 1.5\nc{} +Inf\nbroken{x=\"1\" \n";
        let s = parse(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!((s[0].name, s[0].value), ("a", 3.0));
        assert_eq!(
            s[1].labels,
            vec![
                ("reason", "wal_full".to_string()),
                ("x", "q\"u\\o".to_string())
            ]
        );
        assert_eq!(s[1].value, 1.5);
        assert!(s[2].value.is_infinite());
    }

    #[test]
    fn the_status_names_health_samples_and_the_top_metrics() {
        let census = Census {
            metrics: vec![
                MetricCensus {
                    name: "wide".into(),
                    kind: "counter",
                    keys: 50,
                    samples: 10,
                    per_second: 5.0,
                    tag_keys: vec![],
                },
                MetricCensus {
                    name: "busy".into(),
                    kind: "timer",
                    keys: 1,
                    samples: 400,
                    per_second: 200.0,
                    tag_keys: vec![],
                },
            ],
            open_secs: 2.0,
        };
        let v = Status {
            time: 1.0,
            host: "h",
            flush_interval: 1,
            health: ("degraded", vec!["the WAL was full".into()]),
            metrics: "tallyd_dropped_total{reason=\"wal_full\"} 7\n",
            census: &census,
            clickhouse_failing: Some((58, "Connection refused".into())),
        }
        .to_json();
        assert_eq!(v["health"]["status"], "degraded");
        assert_eq!(v["clickhouse"]["up"], false);
        assert_eq!(v["clickhouse"]["failing_seconds"], 58);
        assert_eq!(v["metrics"][0]["labels"]["reason"], "wal_full");
        assert_eq!(v["metrics"][0]["value"], 7.0);
        assert_eq!(v["top_keys"][0]["name"], "wide");
        assert_eq!(v["top_samples"][0]["name"], "busy");
        assert_eq!(v["top_samples"][0]["per_second"], 200.0);
    }
}
