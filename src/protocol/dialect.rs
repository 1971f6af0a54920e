//! Tags written into the metric name, as other StatsD dialects send them.
//! Pure code: it finds where a name's tags are; the key builder
//! ([`crate::aggregate::key::KeyBuf::build_line`]) takes them from there.
//!
//! Each dialect is off unless configured (`statsd.tag_dialects`):
//!
//! | dialect    | line                         | name        | tags               |
//! |------------|------------------------------|-------------|--------------------|
//! | `influxdb` | `req,env=prod,az=b:1\|c`     | `req`       | `env:prod`, `az:b` |
//! | `librato`  | `req#env=prod,az=b:1\|c`     | `req`       | `env:prod`, `az:b` |
//! | `signalfx` | `api.[env=prod]req:1\|c`     | `api.req`   | `env:prod`         |
//! | `graphite` | `req;env=prod;az=b:1\|c`     | `req`       | `env:prod`, `az:b` |
//!
//! The rule that keeps a name unambiguous (statsd_exporter#324 is the trap
//! of a `,` or `#` in a name read two ways): a dialect's marker (`,`, `#`,
//! `[` and `]`, `;`) is part of the name while the dialect is off, and
//! always starts its tags while it is on. So, with a dialect on:
//!
//! - SignalFx first: the first `[` and the first `]` after it enclose
//!   `,`-separated tags, wherever they are in the name, and the name is
//!   what is left around them. A lone `[` or `]` refuses the line.
//! - Else the first marker of the others that are on (`,` InfluxDB, `#`
//!   Librato, `;` Graphite) starts the tags, to the end of the name,
//!   separated by `,` (`;` for Graphite).
//! - Each tag is `key=value`, split at its first `=`, key and value not
//!   empty (a Graphite tag holds no `,`); it becomes the tag `key:value`.
//!   Empty tags (`a,,b`) are skipped. What is left of the name holds no
//!   marker of a dialect that is on. Anything else refuses the line as
//!   `invalid_tag`: a line is never taken under a name that still holds
//!   half a tag.
//! - DogStatsD `|#` tags on the same line are kept as well: the key has
//!   both (statsd_exporter refuses such a line as `mixed_tagging_styles`;
//!   tallyd keeps what it was sent, and the same tag twice is one tag).
//!
//! Sources: InfluxDB's StatsD format (Telegraf's statsd input README,
//! "Influx Statsd"), Librato's stat-level tags, SignalFx's dimensions in
//! StatsD names (its collectd-statsd monitor), and Graphite's tagged
//! series (`name;tag=value`); statsd_exporter's `pkg/line` reads the first
//! three the same way (PR#267, PR#315).

use super::statsd::ParseError;

/// The dialects read, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dialects(u8);

impl Dialects {
    pub const INFLUXDB: Dialects = Dialects(1);
    pub const LIBRATO: Dialects = Dialects(2);
    pub const SIGNALFX: Dialects = Dialects(4);
    pub const GRAPHITE: Dialects = Dialects(8);

    /// Every dialect by its configuration name.
    pub const NAMES: [(&'static str, Dialects); 4] = [
        ("influxdb", Dialects::INFLUXDB),
        ("librato", Dialects::LIBRATO),
        ("signalfx", Dialects::SIGNALFX),
        ("graphite", Dialects::GRAPHITE),
    ];

    /// The dialects named in `names`; `Err` names one that is not known.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Dialects, String> {
        let mut d = Dialects::default();
        for n in names {
            let n = n.as_ref();
            let (_, one) = Dialects::NAMES
                .iter()
                .find(|(name, _)| *name == n)
                .ok_or_else(|| n.to_owned())?;
            d.0 |= one.0;
        }
        Ok(d)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn has(self, d: Dialects) -> bool {
        self.0 & d.0 != 0
    }

    /// `self` with `d` too.
    pub fn with(self, d: Dialects) -> Dialects {
        Dialects(self.0 | d.0)
    }
}

/// Where the tags of a name are: offsets into the name as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameTags {
    /// The name is the bytes before `cut.0` and from `cut.1` on.
    pub cut: (u32, u32),
    /// The tags, `key=value` each, separated by `sep`.
    pub tags: (u32, u32),
    pub sep: u8,
}

impl NameTags {
    /// The name without its tags, as two pieces (the second is empty but
    /// for SignalFx tags within the name).
    pub fn name<'a>(&self, written: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let (a, b) = (self.cut.0 as usize, self.cut.1 as usize);
        (
            written.get(..a).unwrap_or_default(),
            written.get(b..).unwrap_or_default(),
        )
    }

    /// Each tag as `(key, value)`, in order.
    pub fn tags<'a>(&self, written: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let section = written
            .get(self.tags.0 as usize..self.tags.1 as usize)
            .unwrap_or_default();
        section
            .split(move |&b| b == self.sep)
            .filter(|t| !t.is_empty())
            .filter_map(|t| {
                let eq = memchr::memchr(b'=', t)?;
                Some((&t[..eq], &t[eq + 1..]))
            })
    }

    /// How many tags there are.
    pub fn count(&self, written: &[u8]) -> usize {
        self.tags(written).count()
    }
}

/// Finds the tags in `name` (as written) by the rules of the module doc:
/// `None` when it has none of the `dialects`' markers.
pub fn split(name: &[u8], dialects: Dialects) -> Result<Option<NameTags>, ParseError> {
    let len = u32::try_from(name.len()).map_err(|_| ParseError::NameTooLong)?;
    let found = if dialects.has(Dialects::SIGNALFX) {
        let open = memchr::memchr(b'[', name);
        let close = memchr::memchr(b']', name);
        match (open, close) {
            (Some(o), Some(c)) if o < c => Some(NameTags {
                cut: (o as u32, c as u32 + 1),
                tags: (o as u32 + 1, c as u32),
                sep: b',',
            }),
            (None, None) => None,
            _ => return Err(ParseError::InvalidTag),
        }
    } else {
        None
    };
    let found = found.or_else(|| {
        let at = name.iter().position(|&b| {
            (b == b',' && dialects.has(Dialects::INFLUXDB))
                || (b == b'#' && dialects.has(Dialects::LIBRATO))
                || (b == b';' && dialects.has(Dialects::GRAPHITE))
        })?;
        let sep = if name[at] == b';' { b';' } else { b',' };
        Some(NameTags {
            cut: (at as u32, len),
            tags: (at as u32 + 1, len),
            sep,
        })
    });
    let Some(found) = found else {
        return Ok(None);
    };
    let section = &name[found.tags.0 as usize..found.tags.1 as usize];
    // Every tag `key=value`; a Graphite tag holds no `,` (the key's tag
    // separator).
    let well_formed = section
        .split(|&b| b == found.sep)
        .filter(|t| !t.is_empty())
        .all(|t| {
            matches!(memchr::memchr(b'=', t), Some(eq) if eq > 0 && eq + 1 < t.len())
                && !t.contains(&b',')
        });
    let (a, b) = found.name(name);
    // What is left of the name holds no marker of a dialect that is on.
    let marker = |c: &u8| match c {
        b'[' | b']' => dialects.has(Dialects::SIGNALFX),
        b',' => dialects.has(Dialects::INFLUXDB),
        b'#' => dialects.has(Dialects::LIBRATO),
        b';' => dialects.has(Dialects::GRAPHITE),
        _ => false,
    };
    if !well_formed || a.iter().chain(b).any(marker) {
        return Err(ParseError::InvalidTag);
    }
    if a.is_empty() && b.is_empty() {
        return Err(ParseError::EmptyName);
    }
    Ok(Some(found))
}

#[cfg(test)]
mod tests;
