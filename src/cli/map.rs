//! `tallyd map test 'LINE'...`: what the configured tag dialects, mapping
//! rules and key budgets make of StatsD lines, without a running tallyd.

use std::process::ExitCode;

use crate::aggregate::key::{self, KeyBuf};
use crate::aggregate::mapping::{MapBuf, Mapped};
use crate::config::Config;
use crate::protocol::statsd::{self, Limits, Parsed};

#[derive(Debug, clap::Args)]
pub struct MapTestArgs {
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// StatsD lines, e.g. 'app.web.hits:1|c|#env:prod'.
    #[arg(required = true)]
    pub lines: Vec<String>,
}

/// Prints, for each line, the key it counts under and the rule that made
/// it; exits with 1 when a line is refused.
pub fn map_test(config: &Config, args: &MapTestArgs) -> ExitCode {
    let mut refused = false;
    for line in &args.lines {
        let (text, bad) = explain(config, line);
        print!("{text}");
        refused |= bad;
    }
    if refused {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// What `config` makes of `line`, as text, and whether it is refused.
pub fn explain(config: &Config, line: &str) -> (String, bool) {
    let keying = &config.keying;
    let limits = Limits {
        dialects: keying.dialects,
        ..config.parse_limits
    };
    let mut out = format!("{line}\n");
    let parsed = match statsd::parse_line(line.trim_end().as_bytes(), &limits) {
        Ok(Parsed::Metric(l)) => l,
        Ok(_) => {
            out.push_str("  an event or service check: kept as written\n");
            return (out, false);
        }
        Err(e) => {
            out.push_str(&format!(
                "  refused: {e} (counted in tallyd_parse_errors_total)\n"
            ));
            return (out, true);
        }
    };
    let mut keys = KeyBuf::default();
    let raw = keys.build_line(&parsed).to_vec();
    let mut buf = MapBuf::default();
    let rules = keying.rules.rules();
    let (key, rule) = match keying.rules.map(&raw, &mut buf) {
        Mapped::Dropped(i) => {
            out.push_str(&format!(
                "  dropped by mapping[{i}] ({}), counted as tallyd_dropped_total{{reason=\"mapping\"}}\n",
                rules[i].pattern
            ));
            return (out, false);
        }
        Mapped::Changed(i) => (buf.key().to_vec(), Some(i)),
        Mapped::Unchanged => (raw.clone(), keying.rules.rule_for(name_of(&raw))),
    };
    let Some((kind, name, tags)) = key::parts(&key) else {
        return (out, true);
    };
    let tags: Vec<&str> = tags.tags().collect();
    out.push_str(&format!(
        "  key:    {name}{}{} (type {})\n",
        if tags.is_empty() { "" } else { "|#" },
        tags.join(","),
        kind.as_str()
    ));
    out.push_str(&match rule {
        Some(i) if key != raw => format!("  rule:   mapping[{i}] ({})\n", rules[i].pattern),
        Some(i) => format!(
            "  rule:   mapping[{i}] ({}), which changes nothing here\n",
            rules[i].pattern
        ),
        None => "  rule:   none matches\n".to_owned(),
    });
    let budget = config.budgets.limit(name.as_bytes());
    out.push_str(&format!(
        "  budget: {budget} keys of {name} per interval; past it, new keys fold into {name} with tag values tallyd_overflow\n"
    ));
    (out, false)
}

fn name_of(key: &[u8]) -> &str {
    key::parts(key).map_or("", |(_, n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_says_which_rule_made_which_key() {
        let text = "[statsd]\ntag_dialects = [\"influxdb\"]\n[[mapping]]\nmatch = \"debug.*\"\ndrop = true\n[[mapping]]\nmatch = \"app.*.hits\"\nname = \"app.hits\"\ntags = { svc = \"$1\" }\n";
        let config = crate::config::Settings::from_toml(text, "t")
            .expect("parses")
            .validate()
            .expect("valid");
        let (out, bad) = explain(&config, "app.web.hits,env=prod:1|c");
        assert!(!bad);
        assert!(
            out.contains("key:    app.hits|#env:prod,svc:web (type c)"),
            "{out}"
        );
        assert!(out.contains("mapping[1] (match = \"app.*.hits\")"), "{out}");
        let (out, _) = explain(&config, "debug.x:1|c");
        assert!(out.contains("dropped by mapping[0]"), "{out}");
        let (out, bad) = explain(&config, "a,b:1|c");
        assert!(bad && out.contains("refused: invalid_tag"), "{out}");
        let (out, _) = explain(&config, "plain:1|ms");
        assert!(
            out.contains("rule:   none matches") && out.contains("100000 keys of plain"),
            "{out}"
        );
    }
}
