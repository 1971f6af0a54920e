//! The explorer's API: `GET /api/metrics`, `/api/series`, `/api/events`
//! (the README's "Admin API" has an example of each).
//!
//! Parameters are checked here, before anything reaches ClickHouse
//! ([`ChartRequest::parse`] is pure); the statements are
//! [`crate::rollup::read`]'s, where user input is only ever a quoted,
//! escaped literal. Every statement is bounded: a range of at most
//! [`MAX_SPAN`], at most [`MAX_POINTS`] periods of the resolution the
//! rollup rule picks, at most [`MAX_TOP`] groups plus "other", and it runs
//! read-only (`readonly = 2`) under [`QUERY_TIMEOUT`], [`MAX_ROWS`],
//! [`MAX_ROWS_READ`] and [`MAX_MEMORY`], at most [`MAX_QUERIES`] at a time: however many
//! pages are open, the explorer holds at most that many of ClickHouse's
//! threads (a request waits its turn up to [`QUERY_TIMEOUT`], then is
//! answered 503).

use std::borrow::Cow;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Value, json};

use super::status::number;
use crate::aggregate::census::Census;
use crate::rollup::Retention;
use crate::rollup::read::{self, Chart, Group, Kind, Source};
use crate::sink::SinkConfig;

/// The longest range a chart covers.
pub const MAX_SPAN: Duration = Duration::from_secs(62 * 86_400);
/// Periods a chart has at most (the rollup rule's `points`).
pub const MAX_POINTS: u32 = 1500;
/// Groups kept by name; the rest are summed as "other".
pub const MAX_TOP: u32 = 20;
/// The longest name, tag filter or host taken (bytes).
pub const MAX_TEXT: usize = 4096;
/// Tag filters at most.
pub const MAX_TAGS: usize = 32;
/// What ClickHouse may spend on one statement.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows one statement may return (`(MAX_TOP + 1) * MAX_POINTS` and some).
pub const MAX_ROWS: u64 = 40_000;
/// Rows one statement may read (30 days of hour rollups of a metric of
/// 100k series is 72 M).
pub const MAX_ROWS_READ: u64 = 100_000_000;
/// Explorer statements running at once, for every page together.
pub const MAX_QUERIES: usize = 2;
/// Memory one statement may take on the server (`max_memory_usage`).
pub const MAX_MEMORY: u64 = 1 << 30;
/// Metrics `/api/metrics` lists at most; events `/api/events`.
pub const MAX_LIST: usize = 200;

/// An answer that is not 200: its status and a sentence.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// A request's query string, decoded (`+` and `%XX`, as HTML forms send).
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Decodes `query`; a key or value that is not UTF-8 once decoded is
    /// refused (no name or tag tallyd keeps can hold one).
    pub fn parse(query: Option<&str>) -> Result<Params, ApiError> {
        let mut out = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                let s = s.replace('+', " ");
                percent_encoding::percent_decode_str(&s)
                    .decode_utf8()
                    .map(Cow::into_owned)
            };
            let k = decode(k).map_err(|_| bad("a parameter name is not valid UTF-8"))?;
            let v = decode(v).map_err(|_| bad(format!("parameter {k:?} is not valid UTF-8")))?;
            if v.len() > MAX_TEXT {
                return Err(bad(format!(
                    "parameter {k:?} is longer than {MAX_TEXT} bytes"
                )));
            }
            out.push((k, v));
        }
        Ok(Params(out))
    }

    /// The first value of `key`, if given and not empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// Every non-empty value of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Refuses a parameter not in `known` (a typo would otherwise be
    /// ignored without a word).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(bad(format!(
                "unknown parameter {k:?}; this endpoint takes {}",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| bad(format!("{key} must be a whole number, not {v:?}")))
            })
            .transpose()
    }
}

/// `[from, to)` from `range` (a duration up to now, e.g. `1h`) or from
/// `from` and `to` (Unix seconds; `to` defaults to now); `range=1h`
/// without either.
pub fn time_range(p: &Params, now: u32) -> Result<(u32, u32), ApiError> {
    let (from, to) = match (p.number::<u32>("from")?, p.get("range")) {
        (Some(_), Some(_)) => return Err(bad("give range, or from (and to), not both")),
        (Some(from), None) => (from, p.number::<u32>("to")?.unwrap_or(now)),
        (None, _) if p.get("to").is_some() => return Err(bad("to needs from")),
        (None, range) => {
            let range = range.unwrap_or("1h");
            let span = humantime::parse_duration(range)
                .map_err(|e| bad(format!("range {range:?} is not a duration like 1h: {e}")))?;
            if span > MAX_SPAN {
                return Err(bad(format!(
                    "range {range:?} is longer than {} days",
                    MAX_SPAN.as_secs() / 86_400
                )));
            }
            let span = u32::try_from(span.as_secs()).unwrap_or(u32::MAX);
            (now.saturating_sub(span), now)
        }
    };
    if from >= to {
        return Err(bad(format!("from ({from}) must be before to ({to})")));
    }
    if u64::from(to - from) > MAX_SPAN.as_secs() {
        return Err(bad(format!(
            "the range is longer than {} days",
            MAX_SPAN.as_secs() / 86_400
        )));
    }
    Ok((from, to))
}

/// How a chart splits into series, as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Tag(String),
    Host,
}

/// `/api/series`'s parameters, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartRequest {
    pub name: String,
    pub kind: Kind,
    pub tags: Vec<String>,
    pub host: Option<String>,
    pub group: Option<GroupBy>,
    pub top: u32,
    pub from: u32,
    pub to: u32,
    pub points: u32,
}

impl ChartRequest {
    /// Reads `name`, `type` (counter), `tag` (repeated, `k:v`), `host`,
    /// `group` (a tag key or `host`), `top` (5), the range (see
    /// [`time_range`]) and `points` (1500).
    pub fn parse(p: &Params, now: u32) -> Result<ChartRequest, ApiError> {
        p.only(&[
            "name", "type", "tag", "host", "group", "top", "range", "from", "to", "points",
        ])?;
        let name = p.get("name").ok_or_else(|| bad("name is required"))?;
        let kind = match p.get("type").unwrap_or("counter") {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "timer" => Kind::Timer,
            "set" => Kind::Set,
            other => {
                return Err(bad(format!(
                    "type {other:?} is not one of counter, gauge, timer, set"
                )));
            }
        };
        let tags = p.all("tag");
        if tags.len() > MAX_TAGS {
            return Err(bad(format!("at most {MAX_TAGS} tag filters")));
        }
        let group = p.get("group").map(|g| match g {
            "host" => GroupBy::Host,
            key => GroupBy::Tag(key.to_owned()),
        });
        let top = p.number::<u32>("top")?.unwrap_or(5);
        if !(1..=MAX_TOP).contains(&top) {
            return Err(bad(format!("top must be 1 to {MAX_TOP}, not {top}")));
        }
        let points = p.number::<u32>("points")?.unwrap_or(MAX_POINTS);
        if !(1..=MAX_POINTS).contains(&points) {
            return Err(bad(format!(
                "points must be 1 to {MAX_POINTS}, not {points}"
            )));
        }
        let (from, to) = time_range(p, now)?;
        Ok(ChartRequest {
            name: name.to_owned(),
            kind,
            tags: tags.into_iter().map(str::to_owned).collect(),
            host: p.get("host").map(str::to_owned),
            group,
            top,
            from,
            to,
            points,
        })
    }
}

/// What the explorer reads with: where ClickHouse is, and the rule's
/// inputs.
#[derive(Debug, Clone)]
pub struct Explore {
    pub sink: tokio::sync::watch::Receiver<SinkConfig>,
    pub retention: Retention,
    pub flush_interval: Duration,
    /// For `tallyd_rollup_lag_seconds` (see [`read::cuts`]).
    pub telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
    /// [`MAX_QUERIES`] permits.
    pub queries: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Explore {
    fn rollup_lag(&self) -> u32 {
        let lag = self
            .telemetry
            .rollups
            .lag_seconds
            .load(std::sync::atomic::Ordering::Relaxed);
        u32::try_from(lag).unwrap_or(u32::MAX)
    }

    fn interval_secs(&self) -> u32 {
        u32::try_from(self.flush_interval.as_secs())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// Runs `sql` read-only and returns its rows (JSONEachRow).
    async fn rows(&self, sql: &str) -> Result<Vec<serde_json::Map<String, Value>>, ApiError> {
        let config = self.sink.borrow().clone();
        let failed = |e: String| ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: format!("ClickHouse at {} answered: {e}", config.url),
        };
        let busy = || ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the explorer's {MAX_QUERIES} ClickHouse statements at a time stayed busy for {} s; try again",
                QUERY_TIMEOUT.as_secs()
            ),
        };
        let _permit = tokio::time::timeout(QUERY_TIMEOUT, self.queries.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        // Each endpoint in turn (the url, then each replica), as the sink
        // fails over: a statement ClickHouse refused is not tried again.
        let mut last = failed("no endpoint configured".into());
        let mut answer = None;
        for client in crate::sink::admin_clients(&config) {
            let client = client
                .with_setting("readonly", "2")
                .with_setting("max_execution_time", QUERY_TIMEOUT.as_secs().to_string())
                .with_setting("max_result_rows", MAX_ROWS.to_string())
                .with_setting("result_overflow_mode", "throw")
                .with_setting("max_rows_to_read", MAX_ROWS_READ.to_string())
                .with_setting("read_overflow_mode", "throw")
                .with_setting("max_memory_usage", MAX_MEMORY.to_string());
            // `?` binds a parameter in the client's queries; `??` is one `?`.
            let bytes = async {
                let mut cursor = client
                    .query(&sql.replace('?', "??"))
                    .fetch_bytes("JSONEachRow")?;
                cursor.collect().await
            };
            match tokio::time::timeout(QUERY_TIMEOUT + Duration::from_secs(5), bytes).await {
                Ok(Ok(bytes)) => {
                    answer = Some(bytes);
                    break;
                }
                Ok(Err(e @ clickhouse::error::Error::BadResponse(_))) => {
                    return Err(failed(e.to_string()));
                }
                Ok(Err(e)) => last = failed(e.to_string()),
                Err(_) => last = failed("no answer in time".into()),
            }
        }
        let bytes = answer.ok_or(last)?;
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// `/api/series`; ClickHouse has the intervals before `flushed_until`
    /// (the open interval's start, Unix seconds) at most.
    pub async fn series(
        &self,
        req: &ChartRequest,
        now: u32,
        flushed_until: u32,
    ) -> Result<Value, ApiError> {
        let interval = self.interval_secs();
        let source = read::choose(req.from, req.to, now, interval, &self.retention, req.points);
        let (step, resolution, text) = match source {
            Source::Raw => (interval, "raw", format!("raw rows ({interval} s each)")),
            Source::Rollup(r) => (
                match r {
                    crate::rollup::sql::Resolution::Minute => 60,
                    crate::rollup::sql::Resolution::Hour => 3600,
                },
                r.name(),
                format!(
                    "{} rollups (the newest periods, not rolled up yet, from finer rows)",
                    r.name()
                ),
            ),
        };
        let database = self.sink.borrow().database.clone();
        let chart = Chart {
            database: &database,
            kind: req.kind,
            name: &req.name,
            tags: &req.tags,
            host: req.host.as_deref(),
            from: req.from,
            to: req.to,
            source,
            settled: now.saturating_sub(self.rollup_lag()),
        };
        let group = match &req.group {
            None => None,
            Some(GroupBy::Host) => Some(Group::Host),
            Some(GroupBy::Tag(k)) => Some(Group::Tag(k)),
        };
        let mut statements = Vec::new();
        let mut order: Vec<String> = Vec::new();
        if let Some(g) = group {
            let sql = read::top_groups(&chart, g, req.top);
            let rows = self.rows(&sql).await?;
            statements.push(sql);
            order = rows
                .iter()
                .filter_map(|r| r.get("grp").and_then(Value::as_str).map(str::to_owned))
                .collect();
        }
        let sql = read::grouped(&chart, group.map(|g| (g, order.as_slice())));
        let rows = self.rows(&sql).await?;
        statements.push(sql);
        let columns = api_columns(req.kind);
        // Seconds a period holds: a raw row one flush interval (two
        // intervals of 500 ms share a second's row), a rollup its period.
        let span = match source {
            Source::Raw => self.flush_interval.as_secs_f64().max(1.0),
            _ => f64::from(step),
        };
        let flushed = f64::from(flushed_until);
        let mut partial = None;
        let mut series: Vec<(String, Vec<Value>)> = Vec::new();
        for row in &rows {
            let Some(t) = row.get("t").and_then(as_f64) else {
                continue;
            };
            let grp = row.get("grp").and_then(Value::as_str).unwrap_or("all");
            // A period not over yet is a rate over the seconds of it that
            // were flushed.
            let seconds = (flushed - t).clamp(1.0, span);
            if seconds < span {
                partial = Some(t);
            }
            let mut point = vec![number(t)];
            for c in columns {
                let read = |c: &str| row.get(c).and_then(as_f64).unwrap_or(f64::NAN);
                point.push(match *c {
                    "rate" => number(read("value") / seconds),
                    "sum" => number(read("value")),
                    c => number(read(c)),
                });
            }
            match series.iter_mut().find(|(g, _)| g == grp) {
                Some((_, points)) => points.push(Value::Array(point)),
                None => series.push((grp.to_owned(), vec![Value::Array(point)])),
            }
        }
        // The top groups' order (largest first), "other" last.
        let rank = |g: &str| match order.iter().position(|o| o == g) {
            Some(i) => i,
            None if g == "other" => usize::MAX,
            None => usize::MAX - 1,
        };
        series.sort_by_key(|(g, _)| rank(g));
        let series: Vec<Value> = series
            .into_iter()
            .map(|(g, points)| json!({"label": label(&req.group, &g), "points": points}))
            .collect();
        Ok(json!({
            "name": req.name,
            "type": kind_name(req.kind),
            "from": req.from,
            "to": req.to,
            "step": number(span),
            "resolution": resolution,
            "resolution_text": text,
            "columns": columns,
            "series": series,
            "partial": partial.map_or(Value::Null, number),
            "sql": statements,
        }))
    }

    /// `/api/events`: the newest `limit` (100) events of `range` or
    /// `from`/`to`, oldest first; `more` says older ones were left out.
    pub async fn events(&self, p: &Params, now: u32) -> Result<Value, ApiError> {
        p.only(&["range", "from", "to", "limit"])?;
        let (from, to) = time_range(p, now)?;
        let limit = p.number::<u32>("limit")?.unwrap_or(100);
        if limit == 0 || limit as usize > MAX_LIST {
            return Err(bad(format!("limit must be 1 to {MAX_LIST}, not {limit}")));
        }
        let database = self.sink.borrow().database.clone();
        let sql = read::events(&database, from, to, limit + 1);
        let mut rows = self.rows(&sql).await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let events: Vec<Value> = rows
            .into_iter()
            .rev()
            .map(|mut r| {
                json!({
                    "ts": r.get("t").and_then(as_f64).map_or(Value::Null, number),
                    "title": r.remove("title").unwrap_or(Value::Null),
                    "text": r.remove("text").unwrap_or(Value::Null),
                    "alert_type": r.remove("alert_type").unwrap_or(Value::Null),
                    "host": r.remove("host").unwrap_or(Value::Null),
                    "tags": r.remove("tags").unwrap_or(Value::Null),
                })
            })
            .collect();
        Ok(json!({"events": events, "more": more, "sql": sql}))
    }
}

/// `/api/metrics`: the census's metrics whose name holds `q` (any case),
/// at most `limit` (50).
pub fn metrics(census: &Census, p: &Params) -> Result<Value, ApiError> {
    p.only(&["q", "limit"])?;
    let limit = p.number::<usize>("limit")?.unwrap_or(50);
    if limit == 0 || limit > MAX_LIST {
        return Err(bad(format!("limit must be 1 to {MAX_LIST}, not {limit}")));
    }
    let q = p.get("q").unwrap_or("").to_lowercase();
    let found: Vec<_> = census
        .metrics
        .iter()
        .filter(|m| q.is_empty() || m.name.to_lowercase().contains(&q))
        .collect();
    let list: Vec<Value> = found
        .iter()
        .take(limit)
        .map(|m| json!({"name": m.name, "type": m.kind, "keys": m.keys, "tag_keys": m.tag_keys}))
        .collect();
    Ok(json!({"metrics": list, "total": found.len()}))
}

/// The answer's columns by type (see the README's "Admin API").
pub fn api_columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Counter => &["rate", "sum"],
        Kind::Gauge => &["last", "min", "max"],
        Kind::Timer => &["p50", "p90", "p99", "max", "count"],
        Kind::Set => &["uniques"],
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Timer => "timer",
        Kind::Set => "set",
    }
}

/// A series' label: `all`, `other`, a tag as `key:value` (`key:` for
/// rows without the tag), or `host:name`.
fn label(group: &Option<GroupBy>, value: &str) -> String {
    match (group, value) {
        (None, _) | (_, "other") => value.to_owned(),
        (Some(GroupBy::Host), h) => format!("host:{h}"),
        (Some(GroupBy::Tag(k)), "") => format!("{k}:"),
        (Some(GroupBy::Tag(_)), v) => v.to_owned(),
    }
}

/// A number of a JSONEachRow row: 64-bit integers come quoted.
fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        Value::Null => Some(f64::NAN),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
