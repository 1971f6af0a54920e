//! `tallyd top`: the status page in a terminal. It polls the admin API's
//! `/api/status` (blocking std I/O, HTTP/1.0) and redraws a frame:
//! health first, then lines per second per listener, drops and parse
//! errors by reason, the WAL, the spool backlog, latencies, and the top
//! metrics by live keys (an exploding tag shows at the top) and by
//! samples per second. Rates are differences between two polls.
//!
//! [`frame`] is pure (two status answers in, text out).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// TOML configuration file: the admin listener to read, and its token
    /// (`admin_token_file`; or TALLYD_ADMIN_TOKEN)
    #[arg(long, short, env = "TALLYD_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// The admin listener to read [default: the configuration's, 127.0.0.1:8127]
    #[arg(long, env = "TALLYD_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// How often to redraw.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub every: String,
    /// Print one frame (after two polls, for rates) and exit.
    #[arg(long)]
    pub once: bool,
    /// Metrics in each top list.
    #[arg(long, default_value_t = 10)]
    pub rows: usize,
}

/// Runs `tallyd top` against the configured admin listener (its token
/// from `admin_token_file` or `TALLYD_ADMIN_TOKEN`); Ctrl-C ends it.
pub fn top(args: &TopArgs) -> ExitCode {
    let overrides = crate::config::Overrides {
        admin: args.admin.clone(),
        ..Default::default()
    };
    let config = match crate::config::Settings::load(args.config.as_deref(), &overrides)
        .and_then(|s| s.validate())
    {
        Ok(c) => c,
        Err(e) => {
            return super::fail_with(super::exit::CONFIG, &format!("configuration error: {e}"));
        }
    };
    let Some(addr) = config.admin else {
        return super::fail("the admin listener is off (admin = \"off\"): nothing to read");
    };
    if config.auth.tls_on.contains(&crate::auth::Listener::Admin) {
        // Never the token in clear to a listener that expects TLS.
        return super::fail(
            "the admin listener speaks TLS (tls.listeners names \"admin\"), and tallyd top speaks plain HTTP: read /api/status with an HTTPS client, or run top against a plain loopback admin listener",
        );
    }
    let every = match humantime::parse_duration(&args.every) {
        Ok(d) if d >= Duration::from_millis(100) => d,
        _ => {
            return super::fail(&format!(
                "--every {:?} is not a duration of at least 100ms",
                args.every
            ));
        }
    };
    let token = config.admin_token.as_deref();
    let mut prev: Option<Value> = None;
    loop {
        let cur = match fetch(addr, "/api/status", token) {
            Ok(v) => v,
            Err(e) if args.once => {
                return super::fail(&format!("cannot read http://{addr}/api/status: {e}"));
            }
            Err(e) => {
                // tallyd may be restarting: say so, and keep trying.
                let mut out = std::io::stdout().lock();
                let _ = write!(
                    out,
                    "\x1b[H\x1b[2Jtallyd top · cannot read http://{addr}/api/status: {e}\nretrying every {} (Ctrl-C ends)\n",
                    humantime::format_duration(every)
                );
                let _ = out.flush();
                prev = None;
                std::thread::sleep(every);
                continue;
            }
        };
        if !args.once || prev.is_some() {
            let text = frame(prev.as_ref(), &cur, args.rows);
            let mut out = std::io::stdout().lock();
            // Home, clear, then the frame.
            let clear = if args.once { "" } else { "\x1b[H\x1b[2J" };
            if write!(out, "{clear}{text}")
                .and_then(|_| out.flush())
                .is_err()
            {
                return ExitCode::SUCCESS;
            }
            if args.once {
                return ExitCode::SUCCESS;
            }
        }
        prev = Some(cur);
        std::thread::sleep(every);
    }
}

/// One GET of a JSON answer.
fn fetch(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Value, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("a malformed answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or(head);
        return Err(format!("{status}: {}", body.trim()));
    }
    serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))
}

/// The samples of `status` named `name`, as (labels, value).
fn samples<'a>(status: &'a Value, name: &'a str) -> impl Iterator<Item = (&'a Value, f64)> + 'a {
    status["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |m| m["name"] == name)
        .map(|m| (&m["labels"], m["value"].as_f64().unwrap_or(0.0)))
}

/// The sum of the samples of `name` with every label of `labels`.
fn value(status: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(status, name)
        .filter(|(l, _)| labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, v)| v)
        .sum()
}

/// Per second between two answers (0 without a previous one).
fn rate(prev: Option<&Value>, cur: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Some(prev) = prev else { return 0.0 };
    let dt = cur["time"].as_f64().unwrap_or(0.0) - prev["time"].as_f64().unwrap_or(0.0);
    if dt <= 0.0 {
        return 0.0;
    }
    ((value(cur, name, labels) - value(prev, name, labels)) / dt).max(0.0)
}

/// A count with thousands separators.
fn count(v: f64) -> String {
    let n = v.max(0.0).round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(v: f64) -> String {
    bytesize::ByteSize::b(v.max(0.0) as u64)
        .display()
        .iec()
        .to_string()
}

/// The frame of `cur` (rates against `prev`), `rows` metrics per list.
pub fn frame(prev: Option<&Value>, cur: &Value, rows: usize) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let health = cur["health"]["status"].as_str().unwrap_or("?");
    let _ = writeln!(
        o,
        "tallyd top · host {} · tallyd {} · {}",
        cur["host"].as_str().unwrap_or("?"),
        cur["version"].as_str().unwrap_or("?"),
        health.to_uppercase()
    );
    for p in cur["health"]["problems"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  ! {}", p.as_str().unwrap_or(""));
    }
    if cur["clickhouse"]["up"] == false {
        let _ = writeln!(
            o,
            "  ! ClickHouse has failed every statement for {} s (rows wait in the spool): {}",
            cur["clickhouse"]["failing_seconds"].as_u64().unwrap_or(0),
            cur["clickhouse"]["last_error"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(o, "\n{:<10} {:>12} {:>16}", "LISTENER", "LINES/S", "LINES");
    for l in ["udp", "tcp", "uds", "proto", "otlp"] {
        let label = &[("listener", l)][..];
        let _ = writeln!(
            o,
            "{l:<10} {:>12} {:>16}",
            count(rate(prev, cur, "tallyd_received_lines_total", label)),
            count(value(cur, "tallyd_received_lines_total", label))
        );
    }
    let _ = writeln!(
        o,
        "\n{:<34} {:>10} {:>14}",
        "DROPPED / REJECTED", "/S", "TOTAL"
    );
    let mut any = false;
    for (name, key) in [
        ("tallyd_dropped_total", "reason"),
        ("tallyd_parse_errors_total", "reason"),
    ] {
        // (reason, the drop's listener if it has one): parse errors are
        // summed over listeners.
        let mut reasons: Vec<(String, Option<String>, f64)> = Vec::new();
        for (labels, v) in samples(cur, name) {
            let reason = labels[key].as_str().unwrap_or("?").to_owned();
            let listener = match labels["listener"].as_str() {
                Some(l) if name == "tallyd_dropped_total" => Some(l.to_owned()),
                _ => None,
            };
            match reasons
                .iter_mut()
                .find(|(r, l, _)| *r == reason && *l == listener)
            {
                Some((_, _, total)) => *total += v,
                None => reasons.push((reason, listener, v)),
            }
        }
        for (reason, listener, total) in reasons.into_iter().filter(|(_, _, t)| *t > 0.0) {
            any = true;
            let mut labels = vec![(key, reason.as_str())];
            if let Some(l) = &listener {
                labels.push(("listener", l.as_str()));
            }
            let per = rate(prev, cur, name, &labels);
            let reason = match &listener {
                Some(l) => format!("{reason} ({l})"),
                None => reason,
            };
            let kind = if name == "tallyd_dropped_total" {
                "drop"
            } else {
                "parse"
            };
            let _ = writeln!(
                o,
                "{:<34} {:>10} {:>14}",
                format!("{kind}: {reason}"),
                count(per),
                count(total)
            );
        }
    }
    if !any {
        let _ = writeln!(o, "  none");
    }
    let used = value(cur, "tallyd_wal_used_bytes", &[]);
    let free = value(cur, "tallyd_wal_free_bytes", &[]);
    let fill = if used + free > 0.0 {
        100.0 * used / (used + free)
    } else {
        0.0
    };
    let _ = writeln!(
        o,
        "\nWAL    {} of {} used ({fill:.1} %), oldest unflushed {:.1} s",
        bytes(used),
        bytes(used + free),
        value(cur, "tallyd_wal_oldest_unflushed_seconds", &[])
    );
    let oldest = value(cur, "tallyd_backlog_oldest_timestamp_seconds", &[]);
    let age = if oldest > 0.0 {
        format!("{:.0} s", cur["time"].as_f64().unwrap_or(0.0) - oldest)
    } else {
        "-".into()
    };
    let _ = writeln!(
        o,
        "SPOOL  {} intervals, {} rows, {} waiting for ClickHouse, oldest {age}",
        count(value(cur, "tallyd_backlog_batches", &[])),
        count(value(cur, "tallyd_backlog_rows", &[])),
        bytes(value(cur, "tallyd_spool_bytes", &[])),
    );
    let blocked: Vec<&str> = samples(cur, "tallyd_table_blocked")
        .filter(|(_, v)| *v > 0.0)
        .filter_map(|(l, _)| l["table"].as_str())
        .collect();
    if !blocked.is_empty() {
        let _ = writeln!(o, "BLOCKED TABLES  {}", blocked.join(", "));
    }
    let _ = writeln!(
        o,
        "\n{:<12} {:>10} {:>10} {:>10}",
        "LATENCY", "P50 MS", "P99 MS", "MAX MS"
    );
    for op in ["flush", "insert", "wal_sync", "proto_ack"] {
        let q = |q: &str| {
            samples(cur, "tallyd_latency_seconds")
                .find(|(l, _)| l["op"] == op && l["quantile"] == q)
                .map_or("-".to_string(), |(_, v)| format!("{:.2}", v * 1000.0))
        };
        let _ = writeln!(
            o,
            "{op:<12} {:>10} {:>10} {:>10}",
            q("0.5"),
            q("0.99"),
            q("1")
        );
    }
    let list = |key: &str| -> Vec<(String, String, String)> {
        cur[key]
            .as_array()
            .into_iter()
            .flatten()
            .take(rows)
            .map(|m| {
                let n = if key == "top_keys" {
                    count(m["keys"].as_f64().unwrap_or(0.0))
                } else {
                    format!("{:.1}", m["per_second"].as_f64().unwrap_or(0.0))
                };
                (
                    m["name"].as_str().unwrap_or("").to_owned(),
                    m["type"].as_str().unwrap_or("").to_owned(),
                    n,
                )
            })
            .collect()
    };
    let (keys, busy) = (list("top_keys"), list("top_samples"));
    // Two lists side by side in 80 columns.
    let _ = writeln!(
        o,
        "\n{:<20} {:<7} {:>8}   {:<20} {:<7} {:>8}",
        "TOP BY KEYS", "TYPE", "KEYS", "TOP BY SAMPLES/S", "TYPE", "/S"
    );
    for i in 0..keys.len().max(busy.len()) {
        let cell = |l: &[(String, String, String)]| match l.get(i) {
            Some((n, t, v)) => format!("{:<20} {t:<7} {v:>8}", clip(n, 20)),
            None => format!("{:<20} {:<7} {:>8}", "", "", ""),
        };
        let _ = writeln!(o, "{}   {}", cell(&keys), cell(&busy).trim_end());
    }
    o
}

/// `s` cut to `max` characters (a `…` marks the cut).
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(time: f64, lines: f64, dropped: f64) -> Value {
        json!({
            "time": time, "host": "web-1", "version": "0.1.0",
            "health": {"status": "degraded", "problems": ["the WAL was full"]},
            "metrics": [
                {"name": "tallyd_received_lines_total", "labels": {"listener": "udp"}, "value": lines},
                {"name": "tallyd_dropped_total", "labels": {"reason": "wal_full"}, "value": dropped},
                {"name": "tallyd_dropped_total", "labels": {"reason": "udp_kernel", "listener": "statsd"}, "value": 4},
                {"name": "tallyd_latency_seconds", "labels": {"op": "flush", "quantile": "0.99"}, "value": 0.0125},
            ],
            "top_keys": [{"name": "exploding", "type": "counter", "keys": 12000},
                         {"name": "calm", "type": "gauge", "keys": 3}],
            "top_samples": [{"name": "calm", "type": "gauge", "samples": 10, "per_second": 5.0}],
        })
    }

    #[test]
    fn a_frame_shows_health_rates_drops_and_the_widest_metric_first() {
        let text = frame(
            Some(&status(10.0, 1000.0, 5.0)),
            &status(12.0, 5000.0, 9.0),
            10,
        );
        assert!(
            text.starts_with(
                "tallyd top · host web-1 · tallyd 0.1.0 · DEGRADED\n  ! the WAL was full\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\nudp               2,000            5,000\n"),
            "{text}"
        );
        assert!(
            text.contains("drop: wal_full                              2              9"),
            "{text}"
        );
        assert!(text.contains("drop: udp_kernel (statsd)"), "{text}");
        assert!(
            text.contains("flush                 -      12.50          -"),
            "{text}"
        );
        let keys = text
            .lines()
            .skip_while(|l| !l.starts_with("TOP BY KEYS"))
            .nth(1);
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
        assert!(
            keys.is_some_and(|l| l.starts_with("exploding ") && l.contains("12,000")),
            "{text}"
        );
    }
}
