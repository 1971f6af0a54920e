//! Cardinality control's figures (see [`crate::aggregate::budget`]):
//! which metrics folded keys into their overflow series, and how many
//! values, with bounded labels.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Metrics, Text};

/// Metrics named by `tallyd_cardinality_folded_values`; the others are
/// summed under `metric="other"`.
pub const TOP: usize = 10;

#[derive(Debug, Default)]
pub struct Cardinality {
    /// Values folded into overflow series since the start.
    pub folded_total: AtomicU64,
    /// The last closed interval's folding metrics: the top [`TOP`] as
    /// (name, type, budget, values), then the rest's values and count.
    last: Mutex<Last>,
}

#[derive(Debug, Default)]
struct Last {
    top: Vec<(String, &'static str, u32, u64)>,
    other: u64,
    metrics: usize,
}

impl Cardinality {
    /// Takes in a closed interval's folding metrics as (name, type,
    /// budget, values folded), most folded first (as
    /// `aggregate::Generation::folded` gives them).
    pub fn observe(&self, mut folded: Vec<(String, &'static str, u32, u64)>) {
        let values = folded.iter().fold(0u64, |s, f| s.saturating_add(f.3));
        self.folded_total.fetch_add(values, Relaxed);
        let metrics = folded.len();
        folded.truncate(TOP);
        let top = folded.iter().fold(0u64, |s, f| s.saturating_add(f.3));
        let other = values.saturating_sub(top);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Last {
            top: folded,
            other,
            metrics,
        };
    }

    pub(super) fn render(&self, m: &mut Metrics<'_>) {
        m.counter(
            "tallyd_cardinality_folded_values_total",
            "Values folded into overflow series (tag values tallyd_overflow) because their metric had spent its key budget; counted, not lost.",
            "",
            &self.folded_total,
        );
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        m.gauge(
            "tallyd_cardinality_folding_metrics",
            "Metrics that folded keys into their overflow series in the last closed interval.",
            "",
            &Text(last.metrics.to_string()),
        );
        let help = "Values a metric folded into its overflow series in the last closed interval (the top 10 metrics, the rest as other).";
        for (name, kind, limit, values) in &last.top {
            let labels = format!(
                "metric=\"{}\",type=\"{kind}\",budget=\"{limit}\"",
                escape(name)
            );
            m.gauge(
                "tallyd_cardinality_folded_values",
                help,
                &labels,
                &Text(values.to_string()),
            );
        }
        if last.other > 0 {
            m.gauge(
                "tallyd_cardinality_folded_values",
                help,
                "metric=\"other\"",
                &Text(last.other.to_string()),
            );
        }
    }
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
