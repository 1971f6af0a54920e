//! An edge's plan for one flush: what its batches are made with, fixed
//! before its first byte goes out, so that every later send (after a
//! restart or a config change too) carries the same rows to the same
//! upstreams under the same sequences. Pure code.
//!
//! # The persisted form: the flush's sent marker, version 1
//!
//! ```text
//! tallyd-forward-plan 1
//! batch_size <bytes>
//! keep_host <0 or 1>
//! except <glob>              one line per forward.host_except pattern
//! upstream <host:port>       one line per upstream, in order
//! ```
//!
//! The marker is written whole or not at all (see [`crate::ledger`]'s
//! spool); an empty one (a flush marked by a tallyd that wrote ClickHouse)
//! holds no plan.

/// What a flush's batches are made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The upstreams its keys are spread over, in order.
    pub upstreams: Vec<String>,
    pub batch_size: usize,
    pub keep_host: bool,
    pub host_except: Vec<String>,
}

const HEADER: &str = "tallyd-forward-plan 1";

impl Plan {
    /// The marker's text.
    pub fn encode(&self) -> String {
        let mut out = format!(
            "{HEADER}\nbatch_size {}\nkeep_host {}\n",
            self.batch_size,
            u8::from(self.keep_host)
        );
        for e in &self.host_except {
            out.push_str(&format!("except {e}\n"));
        }
        for u in &self.upstreams {
            out.push_str(&format!("upstream {u}\n"));
        }
        out
    }

    /// A marker's plan: `Ok(None)` for an empty marker, an error naming
    /// the line for one that does not read.
    pub fn decode(text: &[u8]) -> Result<Option<Plan>, String> {
        if text.is_empty() {
            return Ok(None);
        }
        let text = std::str::from_utf8(text).map_err(|_| "a plan is not UTF-8".to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("a plan starts with {HEADER:?}"));
        }
        let mut plan = Plan {
            upstreams: Vec::new(),
            batch_size: 0,
            keep_host: true,
            host_except: Vec::new(),
        };
        for line in lines {
            let bad = || format!("a plan's line {line:?} does not read");
            let (key, value) = line.split_once(' ').ok_or_else(bad)?;
            match key {
                "batch_size" => plan.batch_size = value.parse().map_err(|_| bad())?,
                "keep_host" => plan.keep_host = value == "1",
                "except" => plan.host_except.push(value.to_owned()),
                "upstream" => plan.upstreams.push(value.to_owned()),
                _ => return Err(bad()),
            }
        }
        if plan.upstreams.is_empty() || plan.batch_size == 0 {
            return Err("a plan names no upstream or no batch size".into());
        }
        Ok(Some(plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_reads_back_as_written() {
        let plan = Plan {
            upstreams: vec!["agg1:8126".into(), "10.0.0.2:8126".into()],
            batch_size: 1 << 20,
            keep_host: false,
            host_except: vec!["fleet.*".into(), "a b".into()],
        };
        assert_eq!(Plan::decode(plan.encode().as_bytes()), Ok(Some(plan)));
        assert_eq!(Plan::decode(b""), Ok(None));
        for bad in [
            &b"agg1:8126\n"[..],
            b"tallyd-forward-plan 1\nbatch_size x\nupstream a:1\n",
            b"tallyd-forward-plan 1\nbatch_size 5\n",
            b"tallyd-forward-plan 1\nbatch_size 5\nupstream a:1\nnew_field 1\n",
        ] {
            assert!(Plan::decode(bad).is_err(), "{bad:?}");
        }
    }
}
