//! Series keys: `(type, name, canonical tags)` packed into one byte string.
//!
//! Layout: `type byte` `name` then, for each tag in sorted order without
//! duplicates, `0x00` `tag`, then, for a forwarded key that keeps its edge's
//! host ([`KeyBuf::with_host`]), `0x01` `host`. The parser rejects control
//! bytes in names and tags, so `0x00` and `0x01` can only be separators. The key is built into a reused
//! buffer, so looking up a live key allocates nothing.

use std::mem::take;

use crate::protocol::statsd::{Line, MetricType, for_each_tag};

/// Reusable scratch space for building keys (one per ingest worker).
#[derive(Default)]
pub struct KeyBuf {
    tags: Vec<(u32, u32)>,
    buf: Vec<u8>,
    /// A line's name and tags joined, when its name holds tags.
    name: Vec<u8>,
    joined: Vec<u8>,
}

impl KeyBuf {
    /// Builds the key of a parsed line: its name and tags, and the tags
    /// written in its name in a dialect (see
    /// [`crate::protocol::dialect`]), each `key=value` taken as `key:value`.
    pub fn build_line(&mut self, line: &Line<'_>) -> &[u8] {
        let mut buf = take(&mut self.buf);
        buf.clear();
        self.append_line(line, &mut buf);
        self.buf = buf;
        &self.buf
    }

    /// Appends the key of a parsed line (as [`KeyBuf::build_line`] builds
    /// it) to `out`.
    pub fn append_line(&mut self, line: &Line<'_>, out: &mut Vec<u8>) {
        let Some(nt) = &line.name_tags else {
            return self.append(line.kind, line.name, line.tags, out);
        };
        let (mut name, mut joined) = (take(&mut self.name), take(&mut self.joined));
        let (a, b) = nt.name(line.name);
        name.clear();
        name.extend_from_slice(a);
        name.extend_from_slice(b);
        joined.clear();
        for (k, v) in nt.tags(line.name) {
            joined.extend_from_slice(k);
            joined.push(b':');
            joined.extend_from_slice(v);
            joined.push(b',');
        }
        joined.extend_from_slice(line.tags);
        self.append(line.kind, &name, &joined, out);
        (self.name, self.joined) = (name, joined);
    }

    /// Builds the key of `(kind, name, tags)` and returns it. `tags` is the
    /// raw tag section of a line (`a:1,b`).
    pub fn build(&mut self, kind: MetricType, name: &[u8], tags: &[u8]) -> &[u8] {
        let mut buf = take(&mut self.buf);
        buf.clear();
        self.append(kind, name, tags, &mut buf);
        self.buf = buf;
        &self.buf
    }

    /// Appends the key of `(kind, name, tags)` to `out`, as
    /// [`KeyBuf::build`] builds it: straight into the bytes that a block's
    /// lines wait with, with no copy in between.
    pub fn append(&mut self, kind: MetricType, name: &[u8], tags: &[u8], out: &mut Vec<u8>) {
        out.push(kind as u8);
        out.extend_from_slice(name);
        if tags.is_empty() {
            return;
        }
        self.tags.clear();
        let base = tags.as_ptr() as usize;
        for_each_tag(tags, |t| {
            let start = t.as_ptr() as usize - base;
            self.tags.push((start as u32, (start + t.len()) as u32));
        });
        let tag = |&(s, e): &(u32, u32)| &tags[s as usize..e as usize];
        self.tags.sort_unstable_by(|a, b| tag(a).cmp(tag(b)));
        self.tags.dedup_by(|a, b| tag(a) == tag(b));
        for t in &self.tags {
            out.push(0);
            out.extend_from_slice(tag(t));
        }
    }

    /// The key just built.
    pub fn built(&self) -> &[u8] {
        &self.buf
    }

    /// The key just built, with `host` after it (none when empty): a
    /// forwarded key whose row keeps its edge's host.
    pub fn with_host(&mut self, host: &[u8]) -> &[u8] {
        if !host.is_empty() {
            self.buf.push(HOST);
            self.buf.extend_from_slice(host);
        }
        &self.buf
    }
}

/// The byte before a key's host.
pub(crate) const HOST: u8 = 0x01;

/// A key taken apart again (for rows).
#[derive(Debug, PartialEq, Eq)]
pub struct KeyParts<'a> {
    pub kind: MetricType,
    pub name: &'a str,
    pub tags: Vec<&'a str>,
}

/// Splits a key built by [`KeyBuf::build`]. Keys are only built from parsed
/// (valid UTF-8) lines; anything else yields `None`.
pub fn split(key: &[u8]) -> Option<KeyParts<'_>> {
    let (kind, name, tags) = parts(key)?;
    Some(KeyParts {
        kind,
        name,
        tags: tags.tags().collect(),
    })
}

/// A key's tags as they are laid out in it: each tag after a `0x00`, so
/// `""` is no tags and `"\0"` one empty tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTags<'a>(&'a str);

impl<'a> KeyTags<'a> {
    pub fn len(self) -> usize {
        self.0.bytes().filter(|&b| b == 0).count()
    }

    pub fn is_empty(self) -> bool {
        self.0.is_empty()
    }

    pub fn tags(self) -> impl Iterator<Item = &'a str> {
        self.0.split('\0').skip(1)
    }
}

/// `(type, name, tags)` of a key built by [`KeyBuf::build`], borrowed from
/// it; `None` as for [`split`]. A host the key carries is left out (see
/// [`host`]).
pub fn parts(key: &[u8]) -> Option<(MetricType, &str, KeyTags<'_>)> {
    let (&kind, rest) = key.split_first()?;
    let kind = MetricType::from_byte(kind)?;
    let rest = match memchr::memchr(HOST, rest) {
        Some(at) => &rest[..at],
        None => rest,
    };
    let text = std::str::from_utf8(rest).ok()?;
    let end = text.find('\0').unwrap_or(text.len());
    Some((kind, &text[..end], KeyTags(&text[end..])))
}

/// The host a forwarded key carries ([`KeyBuf::with_host`]), if any.
pub fn host(key: &[u8]) -> Option<&str> {
    let at = memchr::memchr(HOST, key)?;
    std::str::from_utf8(&key[at + 1..]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: MetricType, name: &str, tags: &str) -> Vec<u8> {
        KeyBuf::default()
            .build(kind, name.as_bytes(), tags.as_bytes())
            .to_vec()
    }

    #[test]
    fn tag_order_does_not_matter() {
        assert_eq!(
            key(MetricType::Counter, "x", "a:1,b:2"),
            key(MetricType::Counter, "x", "b:2,a:1")
        );
    }

    #[test]
    fn duplicate_tags_collapse() {
        assert_eq!(
            key(MetricType::Counter, "x", "a:1,b,a:1,b"),
            key(MetricType::Counter, "x", "b,a:1")
        );
    }

    #[test]
    fn type_is_part_of_the_key() {
        assert_ne!(
            key(MetricType::Counter, "x", ""),
            key(MetricType::Gauge, "x", "")
        );
    }

    #[test]
    fn tag_values_are_part_of_the_key() {
        assert_ne!(
            key(MetricType::Counter, "x", "a:1"),
            key(MetricType::Counter, "x", "a:2")
        );
    }

    #[test]
    fn split_returns_sorted_tags() {
        let k = key(MetricType::Timer, "req", "z,env:prod,a:1");
        assert_eq!(
            split(&k),
            Some(KeyParts {
                kind: MetricType::Timer,
                name: "req",
                tags: vec!["a:1", "env:prod", "z"],
            })
        );
    }

    #[test]
    fn split_without_tags() {
        let k = key(MetricType::Set, "users", "");
        assert_eq!(split(&k).map(|p| p.tags.len()), Some(0));
    }

    #[test]
    fn a_forwarded_key_keeps_its_host_apart_from_name_and_tags() {
        let mut kb = KeyBuf::default();
        kb.build(MetricType::Counter, b"req", b"b,a:1");
        let k = kb.with_host(b"web-7").to_vec();
        let plain = key(MetricType::Counter, "req", "a:1,b");
        assert_ne!(k, plain, "the host is part of the key");
        assert_eq!(split(&k), split(&plain));
        assert_eq!((host(&k), host(&plain)), (Some("web-7"), None));
        kb.build(MetricType::Counter, b"req", b"a:1,b");
        assert_eq!(kb.with_host(b""), &plain[..], "no host: the plain key");
    }

    #[test]
    fn reused_buffer_gives_same_key() {
        let mut kb = KeyBuf::default();
        let first = kb.build(MetricType::Counter, b"a", b"x,y").to_vec();
        kb.build(MetricType::Gauge, b"longer.name", b"q,r,s,t");
        assert_eq!(kb.build(MetricType::Counter, b"a", b"y,x"), &first[..]);
    }

    #[test]
    fn keys_appended_one_after_another_are_each_the_key_built_alone() {
        let cases = [
            (MetricType::Counter, "a", "y,x,y"),
            (MetricType::Timer, "b.c", ""),
            (MetricType::Set, "d", "env:prod"),
        ];
        let (mut kb, mut out, mut ends) = (KeyBuf::default(), Vec::new(), vec![0]);
        for (kind, name, tags) in cases {
            kb.append(kind, name.as_bytes(), tags.as_bytes(), &mut out);
            ends.push(out.len());
        }
        for (i, (kind, name, tags)) in cases.into_iter().enumerate() {
            assert_eq!(&out[ends[i]..ends[i + 1]], &key(kind, name, tags)[..]);
        }
    }

    #[test]
    fn a_line_with_tags_in_its_name_has_the_key_of_the_same_dogstatsd_line() {
        use crate::protocol::dialect::Dialects;
        use crate::protocol::statsd::{Limits, Parsed, parse_line};
        let limits = Limits {
            dialects: Dialects::from_names(&["influxdb", "signalfx"]).expect("known"),
            ..Limits::default()
        };
        let mut kb = KeyBuf::default();
        let mut key_of = |line: &str| match parse_line(line.as_bytes(), &limits) {
            Ok(Parsed::Metric(l)) => kb.build_line(&l).to_vec(),
            other => panic!("{line}: {other:?}"),
        };
        let want = key(MetricType::Counter, "api.req", "env:prod,az:b");
        assert_eq!(key_of("api.req,env=prod,az=b:1|c"), want);
        assert_eq!(key_of("api.[az=b]req:1|c|#env:prod"), want);
        assert_eq!(
            key_of("api.req,env=prod:1|c|#az:b,env:prod"),
            want,
            "one tag once"
        );
        assert_eq!(key_of("api.req:1|c|#az:b,env:prod"), want);
    }
}
