//! Mapping rules (`[[mapping]]`): names matched by glob or regex and
//! rewritten, with captures, into a new name and tags, or dropped. Pure
//! code over keys built by [`KeyBuf`].
//!
//! The first rule whose pattern matches a metric's name (the whole name)
//! applies, in this order:
//!
//! 1. `drop = true`: the metric's samples are dropped and counted
//!    (`tallyd_dropped_total{reason="mapping"}`);
//! 2. `name`: the new name, a template where `$1`, `${1}` or `${word}`
//!    stand for a capture (a glob's `*` are captures 1, 2, ...);
//! 3. `prefix`: put before the name (the new one or the old);
//! 4. `drop_tags`: tags removed by key (a bare tag is its own key);
//! 5. `rename_tags`: tag keys renamed (`{ old = "new" }`);
//! 6. `tags`: tags added, their values templates as `name` is; a line's
//!    tag of the same key is replaced. A value that is empty after
//!    expansion adds no tag; a `,` from a capture becomes `_`.
//!
//! Globs are those of [`crate::protocol::glob`]: `*` any run of bytes
//! (dots included), `?` any one byte. Regexes are Rust's `regex` syntax,
//! anchored at both ends. The idea and the config shape follow
//! statsd_exporter's mapping config and the DogStatsD mapper.
//!
//! A key is matched once, when it is first written in an interval (see
//! [`super::apply`]): a live key pays for matching once per interval,
//! never per line. It stays in the table as it came; the flush merges it
//! into the key it maps to ([`Remap`]).

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

use super::key::{self, KeyBuf};
use crate::protocol::dialect::Dialects;

/// What makes the keys of one interval: the tag dialects and the mapping
/// rules, with the digest the WAL records for the interval, so that a
/// replay makes the same keys (see `server::keying`).
#[derive(Debug, Clone, Default)]
pub struct Keying {
    pub dialects: Dialects,
    pub rules: Rules,
    /// A digest of `text`; 0 for no dialect and no rule.
    pub digest: u64,
    /// The settings as canonical TOML ([`KeyingSettings`]).
    pub text: String,
}

impl PartialEq for Keying {
    /// Equal settings (the text is canonical).
    fn eq(&self, other: &Keying) -> bool {
        self.text == other.text
    }
}

/// The settings [`Keying`] is made of, as persisted (format 1: a TOML
/// table with `format = 1`, `tag_dialects` and `[[mapping]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyingSettings {
    pub format: u32,
    pub tag_dialects: Vec<String>,
    pub mapping: Vec<RuleSettings>,
}

/// The persisted format of [`KeyingSettings`].
pub const KEYING_FORMAT: u32 = 1;

impl Keying {
    /// Compiles `settings`; an error is `(field, reason)`, the field as in
    /// the configuration (`statsd.tag_dialects`, `mapping[2].regex`).
    pub fn compile(settings: &KeyingSettings) -> Result<Keying, (String, String)> {
        let dialects = Dialects::from_names(&settings.tag_dialects).map_err(|bad| {
            let known: Vec<_> = Dialects::NAMES.iter().map(|(n, _)| *n).collect();
            (
                "statsd.tag_dialects".to_owned(),
                format!("{bad:?} is not a tag dialect; known: {}", known.join(", ")),
            )
        })?;
        let rules = Rules::compile(&settings.mapping)
            .map_err(|(i, (field, why))| (format!("mapping[{i}].{field}"), why))?;
        let canonical = KeyingSettings {
            format: KEYING_FORMAT,
            ..settings.clone()
        };
        let text = toml::to_string(&canonical).unwrap_or_default();
        let empty = dialects.is_empty() && rules.is_empty();
        let digest = if empty { 0 } else { digest(text.as_bytes()) };
        Ok(Keying {
            dialects,
            rules,
            digest,
            text,
        })
    }
}

/// A stable 64-bit digest (SipHash-1-3 with fixed keys), never 0.
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x7461_6c6c_7964, 0x6b65_7973);
    h.write(bytes);
    h.finish().max(1)
}

/// One rule as written in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleSettings {
    /// A glob over names (`*`, `?`); or `regex`, not both.
    #[serde(rename = "match", skip_serializing_if = "String::is_empty")]
    pub glob: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub regex: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drop: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drop_tags: Vec<String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rename_tags: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// A rule, compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The pattern as written: `match = "..."` or `regex = '...'`.
    pub pattern: String,
    regex: Regex,
    drop: bool,
    name: String,
    prefix: String,
    drop_tags: Vec<String>,
    rename_tags: Vec<(String, String)>,
    tags: Vec<(String, String)>,
}

/// The rules in force, in order (the first match applies).
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    set: RegexSet,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            rules: Vec::new(),
            set: RegexSet::empty(),
        }
    }
}

/// What the rules make of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// No rule matched, or the rule left the key as it was.
    Unchanged,
    /// Rule `i` drops it.
    Dropped(usize),
    /// Rule `i` made another key (in the [`MapBuf`]).
    Changed(usize),
}

/// Scratch space for mapped keys (one per ingest worker or flush).
#[derive(Default)]
pub struct MapBuf {
    key: KeyBuf,
    name: String,
    tags: String,
    value: String,
}

impl MapBuf {
    /// The key the last [`Rules::map`] that answered `Changed` made.
    pub fn key(&self) -> &[u8] {
        self.key.built()
    }
}

/// Why a rule does not compile: `(field, reason)`.
pub type RuleError = (&'static str, String);

impl Rules {
    /// Compiles `settings` in order; the error names the field of the
    /// rule at its index.
    pub fn compile(settings: &[RuleSettings]) -> Result<Rules, (usize, RuleError)> {
        let rules: Vec<Rule> = settings
            .iter()
            .enumerate()
            .map(|(i, s)| compile(s).map_err(|e| (i, e)))
            .collect::<Result<_, _>>()?;
        let set = RegexSet::new(rules.iter().map(|r| r.regex.as_str()))
            .map_err(|e| (0, ("regex", e.to_string())))?;
        Ok(Rules { rules, set })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The index of the first rule whose pattern matches `name`.
    pub fn rule_for(&self, name: &str) -> Option<usize> {
        if self.rules.is_empty() {
            return None;
        }
        self.set.matches(name).iter().next()
    }

    /// What the rules make of `key` (built by [`KeyBuf`]); a changed key is
    /// built into `out`.
    pub fn map(&self, key: &[u8], out: &mut MapBuf) -> Mapped {
        let Some((kind, name, tags)) = key::parts(key) else {
            return Mapped::Unchanged;
        };
        let Some(i) = self.rule_for(name) else {
            return Mapped::Unchanged;
        };
        let rule = &self.rules[i];
        if rule.drop {
            return Mapped::Dropped(i);
        }
        let Some(caps) = rule.regex.captures(name) else {
            return Mapped::Unchanged;
        };
        out.name.clear();
        out.name.push_str(&rule.prefix);
        if rule.name.is_empty() {
            out.name.push_str(name);
        } else {
            caps.expand(&rule.name, &mut out.name);
        }
        if out.name.is_empty() {
            out.name.push_str(name);
        }
        out.tags.clear();
        for tag in tags.tags() {
            let (k, rest) = match tag.split_once(':') {
                Some((k, _)) => (k, &tag[k.len()..]),
                None => (tag, ""),
            };
            if rule.drop_tags.iter().any(|d| d == k) || rule.tags.iter().any(|(a, _)| a == k) {
                continue;
            }
            let k = rule
                .rename_tags
                .iter()
                .find(|(from, _)| from == k)
                .map_or(k, |(_, to)| to.as_str());
            push_tag(&mut out.tags, k);
            out.tags.push_str(rest);
        }
        for (k, template) in &rule.tags {
            out.value.clear();
            caps.expand(template, &mut out.value);
            if out.value.is_empty() {
                continue;
            }
            push_tag(&mut out.tags, k);
            out.tags.push(':');
            let value = out.value.chars().map(|c| if c == ',' { '_' } else { c });
            out.tags.extend(value);
        }
        out.key
            .build(kind, out.name.as_bytes(), out.tags.as_bytes());
        let mapped = out.key.with_host(key::host(key).unwrap_or("").as_bytes());
        if mapped == key {
            Mapped::Unchanged
        } else {
            Mapped::Changed(i)
        }
    }
}

/// The flush's side of mapping: which key each key of a closed interval
/// is flushed under, from what its admission recorded (no rule is matched
/// again).
pub struct Remap {
    targets: dashmap::DashMap<super::MapKey, (), super::KeyHasher>,
    /// `None` when no key was mapped (known once: a `DashMap`'s
    /// `is_empty` locks every shard, which cost each flushed key more
    /// than its row).
    aliases: Option<dashmap::DashMap<super::MapKey, super::MapKey, super::KeyHasher>>,
    to: super::MapKey,
}

impl super::Generation {
    /// Takes what the flush needs to map this interval's keys.
    pub fn remap(&mut self) -> Remap {
        let aliases = std::mem::take(&mut self.aliases);
        Remap {
            targets: std::mem::take(&mut self.targets),
            aliases: (!aliases.is_empty()).then_some(aliases),
            to: super::MapKey::new(),
        }
    }
}

impl Remap {
    /// The key `key` is flushed under when its row must be merged with
    /// others' (its value taken in by [`super::acc::Acc::absorb`]), or
    /// `None` when it is flushed as it is, alone: a key no rule changed
    /// and no other key maps to.
    pub fn key<'a>(&'a mut self, key: &'a [u8]) -> Option<&'a [u8]> {
        let aliases = self.aliases.as_ref()?;
        if let Some(to) = aliases.get(key) {
            self.to.clone_from(&to);
            return Some(&self.to);
        }
        self.targets.contains_key(key).then_some(key)
    }
}

/// Starts a tag of `key` in a `,`-separated tag section.
fn push_tag(tags: &mut String, key: &str) {
    if !tags.is_empty() {
        tags.push(',');
    }
    tags.push_str(key);
}

/// Whether `s` may be part of a key: no control bytes (the key's
/// separators), no `,` (the tag separator), no `|` (a line's field).
fn plain(s: &str) -> bool {
    !s.bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b',' || b == b'|')
}

fn compile(s: &RuleSettings) -> Result<Rule, RuleError> {
    let (pattern, source) = match (s.glob.is_empty(), s.regex.is_empty()) {
        (false, true) => (glob_regex(&s.glob), format!("match = {:?}", s.glob)),
        (true, false) => (
            format!("^(?:{})$", s.regex),
            format!("regex = {:?}", s.regex),
        ),
        _ => return Err(("match", "set one of `match` (a glob) or `regex`".into())),
    };
    let regex = Regex::new(&pattern).map_err(|e| ("regex", e.to_string()))?;
    if s.drop
        && (!s.name.is_empty()
            || !s.prefix.is_empty()
            || !s.tags.is_empty()
            || !s.drop_tags.is_empty()
            || !s.rename_tags.is_empty())
    {
        return Err((
            "drop",
            "a rule that drops a metric takes nothing else".into(),
        ));
    }
    for (field, text) in [("name", &s.name), ("prefix", &s.prefix)] {
        if !plain(text) || text.contains(':') {
            return Err((
                field,
                format!("{text:?} holds `:`, `,`, `|` or a control byte"),
            ));
        }
    }
    let bad_tag = |t: &String| t.is_empty() || !plain(t) || t.contains(':');
    if let Some(t) = s
        .drop_tags
        .iter()
        .chain(s.rename_tags.keys())
        .chain(s.rename_tags.values())
        .chain(s.tags.keys())
        .find(|t| bad_tag(t))
    {
        return Err((
            "tags",
            format!("{t:?} is not a tag key (empty, or holds `:`, `,`, `|` or a control byte)"),
        ));
    }
    if let Some(v) = s.tags.values().find(|v| !plain(v)) {
        return Err(("tags", format!("{v:?} holds `,`, `|` or a control byte")));
    }
    let templates = std::iter::once(("name", &s.name)).chain(s.tags.values().map(|v| ("tags", v)));
    for (field, template) in templates {
        if let Some(bad) = references(template).find(|r| !captures(&regex, r)) {
            return Err((
                field,
                format!(
                    "{template:?} names capture `{bad}`, which the pattern does not have (write ${{1}} before a letter or digit)"
                ),
            ));
        }
    }
    Ok(Rule {
        pattern: source,
        regex,
        drop: s.drop,
        name: s.name.clone(),
        prefix: s.prefix.clone(),
        drop_tags: s.drop_tags.clone(),
        rename_tags: s.rename_tags.clone().into_iter().collect(),
        tags: s.tags.clone().into_iter().collect(),
    })
}

/// The captures a template names, as `regex`'s `Captures::expand` reads
/// it: `$name` (the longest run of letters, digits and `_`), `${name}`;
/// `$$` is a `$`.
fn references(template: &str) -> impl Iterator<Item = &str> {
    let mut rest = template;
    std::iter::from_fn(move || {
        loop {
            let at = rest.find('$')?;
            let after = &rest[at + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                rest = tail;
                continue;
            }
            if let Some(braced) = after.strip_prefix('{') {
                let end = braced.find('}')?;
                rest = &braced[end + 1..];
                return Some(&braced[..end]);
            }
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[end..];
            if end > 0 {
                return Some(&after[..end]);
            }
        }
    })
}

/// Whether `regex` has the capture `name` (a number or a name).
fn captures(regex: &Regex, name: &str) -> bool {
    match name.parse::<usize>() {
        Ok(i) => i < regex.captures_len(),
        Err(_) => regex.capture_names().flatten().any(|n| n == name),
    }
}

/// A glob as an anchored regex: each `*` a capture of any run, `?` any one
/// character, the rest literal.
fn glob_regex(glob: &str) -> String {
    let mut out = String::from("^");
    let mut literal = String::new();
    for c in glob.chars() {
        if c == '*' || c == '?' {
            out.push_str(&regex::escape(&literal));
            literal.clear();
            out.push_str(if c == '*' { "(.*)" } else { "." });
        } else {
            literal.push(c);
        }
    }
    out.push_str(&regex::escape(&literal));
    out.push('$');
    out
}

#[cfg(test)]
mod tests;
