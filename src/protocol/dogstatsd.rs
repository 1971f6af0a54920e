//! DogStatsD events and service checks: bytes in, owned rows out (they are
//! rare next to metrics, and their text is unescaped, so they own it).
//!
//! The formats (Datadog, "Datagram Format and Shell Usage"):
//!
//! ```text
//! _e{<title length>,<text length>}:<title>|<text>[|d:<unix ts>][|h:<hostname>]
//!     [|k:<aggregation key>][|p:<normal|low>][|s:<source type>]
//!     [|t:<error|warning|info|success>][|#<tag>,<tag>]
//! _sc|<name>|<status 0..3>[|d:<unix ts>][|h:<hostname>][|#<tag>,<tag>][|m:<message>]
//! ```
//!
//! Lengths are of the title and text as sent, in bytes. `\n` (backslash,
//! n) in a text or message is a newline. A service check's message is its
//! last field: it runs to the end of the line. Unknown fields are skipped,
//! as for metrics; a repeated known field, a length that does not match, a
//! bad priority, alert type, status or timestamp rejects the line.

use super::statsd::{Limits, ParseError, check_tags, check_text, for_each_tag, parse_u64};

/// A parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub title: String,
    pub text: String,
    /// `d:`, Unix seconds.
    pub timestamp: Option<u64>,
    /// `h:`
    pub hostname: String,
    /// `k:`
    pub aggregation_key: String,
    /// `p:`: `normal` (the default) or `low`.
    pub priority: &'static str,
    /// `s:`
    pub source_type: String,
    /// `t:`: `info` (the default), `error`, `warning` or `success`.
    pub alert_type: &'static str,
    /// Sorted and deduplicated, as for metrics.
    pub tags: Vec<String>,
}

/// A parsed service check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCheck {
    pub name: String,
    /// 0 OK, 1 warning, 2 critical, 3 unknown.
    pub status: u8,
    pub timestamp: Option<u64>,
    pub hostname: String,
    pub tags: Vec<String>,
    pub message: String,
}

/// Parses an event line (starting `_e{`).
pub fn parse_event(line: &[u8], limits: &Limits) -> Result<Event, ParseError> {
    let bad = ParseError::InvalidEvent;
    let rest = line.strip_prefix(b"_e{").ok_or(bad)?;
    let close = rest.iter().position(|&b| b == b'}').ok_or(bad)?;
    let (lengths, rest) = (&rest[..close], &rest[close + 1..]);
    let comma = lengths.iter().position(|&b| b == b',').ok_or(bad)?;
    let title_len = number(&lengths[..comma]).ok_or(bad)?;
    let text_len = number(&lengths[comma + 1..]).ok_or(bad)?;
    let rest = rest.strip_prefix(b":").ok_or(bad)?;
    // title, '|', text: exactly as long as announced.
    let title_end = title_len;
    let text_start = title_end.checked_add(1).ok_or(bad)?;
    let text_end = text_start.checked_add(text_len).ok_or(bad)?;
    if rest.len() < text_end || rest[title_end] != b'|' {
        return Err(bad);
    }
    if rest.len() > text_end && rest[text_end] != b'|' {
        return Err(bad);
    }
    let title = text(&rest[..title_end]).ok_or(bad)?;
    if title.is_empty() {
        return Err(bad);
    }
    let mut event = Event {
        title,
        text: text(&rest[text_start..text_end]).ok_or(bad)?,
        timestamp: None,
        hostname: String::new(),
        aggregation_key: String::new(),
        priority: "normal",
        source_type: String::new(),
        alert_type: "info",
        tags: Vec::new(),
    };
    let mut seen = 0u8;
    let fields = rest.get(text_end + 1..).unwrap_or_default();
    for field in fields.split(|&b| b == b'|') {
        let (bit, value) = match field {
            [b'd', b':', v @ ..] => (1, v),
            [b'h', b':', v @ ..] => (2, v),
            [b'k', b':', v @ ..] => (4, v),
            [b'p', b':', v @ ..] => (8, v),
            [b's', b':', v @ ..] => (16, v),
            [b't', b':', v @ ..] => (32, v),
            [b'#', v @ ..] => (64, v),
            _ => continue,
        };
        if seen & bit != 0 {
            return Err(ParseError::DuplicateField);
        }
        seen |= bit;
        match bit {
            1 => event.timestamp = Some(timestamp(value)?),
            2 => event.hostname = text(value).ok_or(bad)?,
            4 => event.aggregation_key = text(value).ok_or(bad)?,
            8 => {
                event.priority = match value {
                    b"normal" => "normal",
                    b"low" => "low",
                    _ => return Err(bad),
                }
            }
            16 => event.source_type = text(value).ok_or(bad)?,
            32 => {
                event.alert_type = match value {
                    b"info" => "info",
                    b"error" => "error",
                    b"warning" => "warning",
                    b"success" => "success",
                    _ => return Err(bad),
                }
            }
            _ => event.tags = tags(value, limits)?,
        }
    }
    Ok(event)
}

/// Parses a service check line (starting `_sc|`).
pub fn parse_service_check(line: &[u8], limits: &Limits) -> Result<ServiceCheck, ParseError> {
    let bad = ParseError::InvalidServiceCheck;
    let rest = line.strip_prefix(b"_sc|").ok_or(bad)?;
    let mut parts = rest.splitn(3, |&b| b == b'|');
    let name = parts.next().filter(|n| !n.is_empty()).ok_or(bad)?;
    let status = match parts.next() {
        Some([d @ b'0'..=b'3']) => d - b'0',
        _ => return Err(bad),
    };
    let mut check = ServiceCheck {
        name: text(name).ok_or(bad)?,
        status,
        timestamp: None,
        hostname: String::new(),
        tags: Vec::new(),
        message: String::new(),
    };
    let mut rest = parts.next().unwrap_or_default();
    let mut seen = 0u8;
    while !rest.is_empty() {
        // The message is the last field and may hold `|`.
        if let Some(message) = rest.strip_prefix(b"m:") {
            check.message = text(message).ok_or(bad)?;
            break;
        }
        let end = rest.iter().position(|&b| b == b'|').unwrap_or(rest.len());
        let field = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        let (bit, value) = match field {
            [b'd', b':', v @ ..] => (1, v),
            [b'h', b':', v @ ..] => (2, v),
            [b'#', v @ ..] => (4, v),
            _ => continue,
        };
        if seen & bit != 0 {
            return Err(ParseError::DuplicateField);
        }
        seen |= bit;
        match bit {
            1 => check.timestamp = Some(timestamp(value)?),
            2 => check.hostname = text(value).ok_or(bad)?,
            _ => check.tags = tags(value, limits)?,
        }
    }
    Ok(check)
}

/// A length: 1 to 9 ASCII digits (it fits a 32-bit `usize`).
fn number(b: &[u8]) -> Option<usize> {
    if b.len() > 9 {
        return None;
    }
    usize::try_from(parse_u64(b)?).ok()
}

fn timestamp(b: &[u8]) -> Result<u64, ParseError> {
    parse_u64(b).ok_or(ParseError::InvalidTimestamp)
}

/// UTF-8 text with `\n` turned into newlines; control bytes refused.
fn text(b: &[u8]) -> Option<String> {
    check_text(b).ok()?;
    Some(std::str::from_utf8(b).ok()?.replace("\\n", "\n"))
}

fn tags(b: &[u8], limits: &Limits) -> Result<Vec<String>, ParseError> {
    check_tags(b, limits, false)?;
    let mut out = Vec::new();
    for_each_tag(b, |t| out.push(String::from_utf8_lossy(t).into_owned()));
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(line: &str) -> Result<Event, ParseError> {
        parse_event(line.as_bytes(), &Limits::default())
    }

    fn check(line: &str) -> Result<ServiceCheck, ParseError> {
        parse_service_check(line.as_bytes(), &Limits::default())
    }

    #[test]
    fn an_event_with_every_field() {
        let e = event("_e{21,37}:An exception occurred|Cannot parse CSV file\\nfrom 10.0.0.17|d:1700000000|h:web-1|k:csv|p:low|s:python|t:error|#env:prod,b,a")
            .expect("event");
        assert_eq!(e.title, "An exception occurred");
        assert_eq!(e.text, "Cannot parse CSV file\nfrom 10.0.0.17");
        assert_eq!(
            (e.timestamp, e.hostname.as_str(), e.aggregation_key.as_str()),
            (Some(1_700_000_000), "web-1", "csv")
        );
        assert_eq!(
            (e.priority, e.source_type.as_str(), e.alert_type),
            ("low", "python", "error")
        );
        assert_eq!(e.tags, vec!["a", "b", "env:prod"]);
    }

    #[test]
    fn an_event_title_and_text_are_taken_by_length_and_may_hold_bars() {
        let e = event("_e{3,5}:a|b|c|d|e|#x").expect("event");
        assert_eq!((e.title.as_str(), e.text.as_str()), ("a|b", "c|d|e"));
        assert_eq!((e.priority, e.alert_type), ("normal", "info"));
        let e = event("_e{2,0}:hi|").expect("empty text");
        assert_eq!(e.text, "");
        assert!(event("_e{5,1}:héllo|x").is_err(), "é is two bytes");
        assert!(event("_e{6,1}:héllo|x").is_ok());
    }

    #[test]
    fn malformed_events_are_refused() {
        for line in [
            "_e{5,4}:title|tex",
            "_e{5,4}:title|texts",
            "_e{5,4}title|text",
            "_e{x,4}:title|text",
            "_e{0,4}:|text",
            "_e{5,4}:title|text|p:urgent",
            "_e{5,4}:title|text|t:fatal",
            "_e{99999999999,4}:title|text",
            "_e{+5,4}:title|text",
            "_e{5,4}:title|te\u{1}t",
        ] {
            assert_eq!(event(line), Err(ParseError::InvalidEvent), "{line}");
        }
        // Not digits, or over 19 of them (past a u64): refused, not wrapped.
        for stamp in ["x", "+1", "18446744073709551616"] {
            assert_eq!(
                event(&format!("_e{{5,4}}:title|text|d:{stamp}")),
                Err(ParseError::InvalidTimestamp)
            );
        }
        assert_eq!(
            event("_e{5,4}:title|text|h:a|h:b"),
            Err(ParseError::DuplicateField)
        );
        assert!(event("_e{5,4}:title|text|z:unknown").is_ok(), "skipped");
    }

    #[test]
    fn a_service_check_with_every_field_and_a_message_holding_bars() {
        let c = check("_sc|redis.can_connect|2|d:1700000000|h:db-1|#env:prod|m:timed out | after 10s\\nretrying")
            .expect("check");
        assert_eq!((c.name.as_str(), c.status), ("redis.can_connect", 2));
        assert_eq!(
            (c.timestamp, c.hostname.as_str()),
            (Some(1_700_000_000), "db-1")
        );
        assert_eq!(c.tags, vec!["env:prod"]);
        assert_eq!(c.message, "timed out | after 10s\nretrying");
        let c = check("_sc|app.ok|0").expect("minimal");
        assert_eq!((c.status, c.message.as_str()), (0, ""));
    }

    #[test]
    fn malformed_service_checks_are_refused() {
        for line in ["_sc||0", "_sc|x|4", "_sc|x|", "_sc|x", "_sc|x|01"] {
            assert_eq!(check(line), Err(ParseError::InvalidServiceCheck), "{line}");
        }
        assert_eq!(check("_sc|x|0|d:-1"), Err(ParseError::InvalidTimestamp));
    }
}
