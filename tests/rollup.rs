//! Rollups and retention with a real tallyd and a real ClickHouse (18.16,
//! and the modern engine in the chDB lane). Hours of data are sent in
//! seconds with `|T` timestamps; the minute and hour rollups must equal
//! what the raw rows give, exactly (sums, counts, min, max, last, uniques),
//! and timer percentiles must be within the sketch's 1 % of the exact
//! quantile of the samples, after: a kill -9 inside the rollup work, a
//! re-sent flush, a late sample 30 minutes old, a drained ClickHouse
//! outage and a WAL replay. Then retention drops raw days past their age
//! while the rollups stay, and a raw table of the previous release is
//! moved aside and dropped once expired.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{clickhouse, free_port, http, send_tcp, temp_dir, wait_for};

/// One test at a time: one of them stops the shared ClickHouse.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Daemon {
    child: Child,
    admin: u16,
    tcp: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Waits for the process to end by itself (a failpoint aborts it).
    fn wait_abort(mut self, secs: u64) {
        let ended = wait_for(secs, || self.child.try_wait().ok().flatten().is_some());
        assert!(ended, "tallyd did not reach its failpoint in {secs} s");
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn send(&self, lines: &[String]) {
        send_tcp(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.tcp)),
            &lines.concat(),
        );
    }

    fn metric(&self, name: &str) -> f64 {
        http(self.admin, "GET", "/metrics", "")
            .and_then(|m| {
                m.lines()
                    .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .reduce(|a, b| a + b)
            })
            .unwrap_or(0.0)
    }
}

/// Starts tallyd on `dir` (database `db`), with `failpoints`, `flush` as
/// its flush interval and `extra` flags, and waits for `/health` unless
/// it is to abort early.
fn start(dir: &Path, db: &str, failpoints: &str, flush: &str, extra: &[&str]) -> Daemon {
    std::fs::write(
        dir.join("tallyd.toml"),
        format!("[aggregate]\nflush_interval = \"{flush}\"\ntimestamp_window = \"3d\"\n[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nretry_max = \"300ms\"\ntimeout = \"5s\"\n[retention]\nraw = \"3d\"\n"),
    )
    .expect("config");
    let (admin, tcp) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .arg("run")
        .arg("--config")
        .arg(dir.join("tallyd.toml"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--host-id", "roll-host"])
        .args(["--clickhouse-url", &clickhouse().url()])
        .args(["--clickhouse-database", db])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--statsd-tcp", &format!("127.0.0.1:{tcp}")])
        .args([
            "--statsd-udp",
            "off",
            "--proto-udp",
            "off",
            "--proto-tcp",
            "off",
        ])
        .args(extra)
        .env("TALLYD_FAILPOINTS", failpoints)
        .stderr(if std::env::var_os("TALLYD_TEST_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn tallyd");
    let mut d = Daemon { child, admin, tcp };
    let mut exited = None;
    let up = wait_for(30, || {
        exited = d.child.try_wait().ok().flatten();
        exited.is_some() || http(admin, "GET", "/health", "").is_some()
    });
    assert!(
        up && exited.is_none(),
        "tallyd did not start (exited: {exited:?}; TALLYD_TEST_STDERR=1 shows its log)"
    );
    d
}

fn now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

const KEYS: u32 = 6;

/// What the test sent, for the checks that need the samples themselves.
#[derive(Default)]
struct Sent {
    /// Timer samples per (key, minute).
    timers: HashMap<(u32, u32), Vec<f64>>,
    counter_total: f64,
    lines: usize,
}

impl Sent {
    /// Lines of every type for every key at `ts` (Unix seconds).
    fn at(&mut self, ts: u32) -> Vec<String> {
        let mut out = Vec::new();
        for k in 0..KEYS {
            let c = f64::from(1 + (ts + k) % 5);
            let t = f64::from((ts.wrapping_mul(13) + k * 7) % 1000 + 1);
            out.push(format!("rc.c.k{k}:{c}|c|T{ts}\n"));
            out.push(format!(
                "rc.g.k{k}:{}|g|T{ts}\n",
                (ts.wrapping_mul(7) + k) % 100
            ));
            out.push(format!("rc.t.k{k}:{t}|ms|T{ts}\n"));
            out.push(format!("rc.s.k{k}:m{}|s|T{ts}\n", (ts / 60 + k) % 20));
            self.counter_total += c;
            self.timers.entry((k, ts - ts % 60)).or_default().push(t);
        }
        self.lines += out.len();
        out
    }

    fn span(&mut self, from: u32, to: u32, step: u32) -> Vec<String> {
        (from..to)
            .step_by(step as usize)
            .flat_map(|ts| self.at(ts))
            .collect()
    }
}

/// Each rollup compared with what the raw rows give, per series and
/// period: the lines that differ (empty when equal).
fn differences(db: &str) -> Vec<String> {
    let ch = clickhouse();
    let mut out = Vec::new();
    // Periods that are over, with time for their rollup (a minute's waits
    // 15 s after it ends, an hour's for its last minute's).
    let t = now();
    for (floor, suffix, cut) in [
        ("toStartOfMinute", "_1m", t - 120),
        ("toStartOfHour", "_1h", t - 3600 - 180),
    ] {
        let pairs = [
            (
                format!(
                    "SELECT name, tags, host, {floor}(ts) AS p, sum(value), sum(samples) FROM (SELECT * FROM {db}.counters FINAL) GROUP BY name, tags, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, host, p"
                ),
                format!(
                    "SELECT name, tags, host, ts AS p, sum(value), sum(samples) FROM {db}.counters{suffix} FINAL GROUP BY name, tags, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, host, p"
                ),
            ),
            (
                format!(
                    "SELECT name, tags, host, {floor}(ts) AS p, argMax(value, version), min(value), max(value), sum(value), count(), sum(samples) FROM (SELECT * FROM {db}.gauges FINAL) GROUP BY name, tags, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, host, p"
                ),
                format!(
                    "SELECT name, tags, host, ts AS p, argMax(last, last_version), min(min), max(max), sum(sum), sum(count), sum(samples) FROM {db}.gauges{suffix} FINAL GROUP BY name, tags, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, host, p"
                ),
            ),
            (
                format!(
                    "SELECT name, tags, kind, host, {floor}(ts) AS p, sum(count), sum(sum), min(min), max(max), sum(samples) FROM (SELECT * FROM {db}.timers FINAL) GROUP BY name, tags, kind, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, kind, host, p"
                ),
                format!(
                    "SELECT name, tags, kind, host, ts AS p, sum(count), sum(sum), min(min), max(max), sum(samples) FROM {db}.timers{suffix} FINAL GROUP BY name, tags, kind, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, kind, host, p"
                ),
            ),
            (
                format!(
                    "SELECT name, tags, host, {floor}(ts) AS p, length(groupUniqArrayArray(member_hashes)), sum(samples) FROM (SELECT * FROM {db}.sets FINAL) GROUP BY name, tags, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, host, p"
                ),
                format!(
                    "SELECT name, tags, host, ts AS p, length(groupUniqArrayArray(member_hashes)), sum(samples) FROM {db}.sets{suffix} FINAL GROUP BY name, tags, host, p HAVING p < toDateTime({cut}) ORDER BY name, tags, host, p"
                ),
            ),
        ];
        for (raw, rolled) in pairs {
            let (Some(a), Some(b)) = (ch.try_query(&raw), ch.try_query(&rolled)) else {
                out.push(format!("not readable yet: {rolled}"));
                continue;
            };
            let a: Vec<&str> = a.lines().collect();
            let b: Vec<&str> = b.lines().collect();
            if a.is_empty() {
                out.push(format!("no raw rows: {raw}"));
            }
            let (ra, rb): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) =
                (a.iter().collect(), b.iter().collect());
            for line in ra.symmetric_difference(&rb).take(3) {
                out.push(format!("{suffix} {line}"));
            }
        }
    }
    out
}

/// Waits until every counter sample sent is in the raw rows, once, and
/// every rollup equals its raw rows.
fn wait_equal(db: &str, sent: &Sent, what: &str) {
    let ch = clickhouse();
    let query = format!("SELECT sum(value) FROM {db}.counters FINAL");
    let mut total = 0.0;
    let all = wait_for(120, || {
        total = ch
            .try_query(&query)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        total >= sent.counter_total
    });
    assert!(
        all && total == sent.counter_total,
        "{what}: {total} of {} counted in the raw rows",
        sent.counter_total
    );
    let mut last = Vec::new();
    let equal = wait_for(180, || {
        last = differences(db);
        last.is_empty()
    });
    assert!(equal, "{what}: rollups differ from the raw rows: {last:#?}");
}

/// Every minute's timer percentiles within 1 % of the exact quantiles of
/// the samples sent (the first sample whose rank reaches q × n).
fn check_percentiles(db: &str, sent: &Sent) {
    let rows = clickhouse().query(&format!(
        "SELECT name, toUInt32(ts), p50, p90, p95, p99 FROM {db}.timers_1m FINAL ORDER BY name, ts"
    ));
    let mut checked = 0;
    for line in rows.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let key: u32 = f[0].trim_start_matches("rc.t.k").parse().expect("key");
        let minute: u32 = f[1].parse().expect("minute");
        let mut samples = sent.timers[&(key, minute)].clone();
        samples.sort_by(f64::total_cmp);
        for (i, q) in [0.5, 0.9, 0.95, 0.99].iter().enumerate() {
            let rank = ((q * samples.len() as f64).ceil() as usize).max(1);
            let exact = samples[rank - 1];
            let got: f64 = f[2 + i].parse().expect("percentile");
            assert!(
                (got - exact).abs() <= exact * 0.01 + 1e-9,
                "{line}: p{} {got} against {exact} of {samples:?}",
                q * 100.0
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no timer rollups");
}

#[test]
fn rollups_equal_the_raw_rows_through_crashes_resends_late_data_outages_and_replays() {
    let _serial = serial();
    let ch = clickhouse();
    let db = "rollups";
    let dir = temp_dir("rollups");
    let mut sent = Sent::default();
    let t = now();
    let base = t - t % 3600 - 3 * 3600;

    // A kill -9 inside the rollup work: the first minute's counters are
    // rolled up, its other tables not, and no run is recorded.
    let d = start(&dir, db, "after_rollup_table", "200ms", &[]);
    d.send(&sent.span(base, base + 3600, 37));
    d.wait_abort(120);
    assert!(
        ch.number(&format!("SELECT count() FROM {db}.counters_1m")) > 0.0,
        "the failpoint fired after the first statement"
    );

    // Back up: the rest of the hours, and everything computed.
    let d = start(&dir, db, "", "200ms", &[]);
    d.send(&sent.span(base + 3600, t - 25 * 60, 41));
    wait_equal(db, &sent, "after a kill -9 inside the rollup work");

    // A late sample 30 minutes old, into a minute already rolled up.
    let late = t - 30 * 60;
    let before = ch.number(&format!(
        "SELECT sum(value) FROM {db}.counters_1m FINAL WHERE ts = toDateTime({})",
        late - late % 60
    ));
    d.send(&sent.at(late));
    let moved = wait_for(60, || {
        ch.number(&format!(
            "SELECT sum(value) FROM {db}.counters_1m FINAL WHERE ts = toDateTime({})",
            late - late % 60
        )) > before
    });
    assert!(moved, "the late sample's minute is recomputed");
    wait_equal(db, &sent, "after a late sample");

    // A re-sent flush: in ClickHouse, not confirmed; then confirmed, its
    // spool file not removed. Each is sent again at the next start.
    drop(d);
    for failpoint in ["after_insert", "after_confirm"] {
        d_restart_resend(&dir, db, failpoint, &mut sent, base + 600);
    }
    let d = start(&dir, db, "", "200ms", &[]);
    wait_equal(db, &sent, "after re-sent flushes");

    // A drained outage: ClickHouse down while samples of past minutes
    // arrive; the spool drains when it is back.
    ch.stop();
    d.send(&sent.span(base + 1200, base + 1500, 29));
    std::thread::sleep(Duration::from_secs(2));
    assert!(ch.start(), "ClickHouse restarts");
    wait_equal(db, &sent, "after a drained outage");

    // A replay: samples in the WAL, kill -9 before their interval closes.
    drop(d);
    let d = start(&dir, db, "", "1h", &[]);
    d.send(&sent.span(base + 2400, base + 2700, 31));
    wait_for(10, || d.metric("tallyd_received_lines_total") >= 1.0);
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    let d = start(&dir, db, "", "200ms", &[]);
    wait_equal(db, &sent, "after a replay");

    // Every sample is in the raw rows once, and the rollups say the same
    // (the hours that are over).
    assert_eq!(
        ch.number(&format!("SELECT sum(value) FROM {db}.counters FINAL")),
        sent.counter_total
    );
    assert_eq!(
        ch.number(&format!("SELECT sum(value) FROM {db}.counters_1m FINAL")),
        sent.counter_total
    );
    assert_eq!(
        ch.number(&format!("SELECT sum(count) FROM {db}.timers_1m FINAL")),
        sent.timers.values().map(Vec::len).sum::<usize>() as f64
    );
    let over = now() - 3600 - 180;
    let over = over - over % 3600;
    assert_eq!(
        ch.number(&format!(
            "SELECT sum(value) FROM {db}.counters_1h FINAL WHERE ts < toDateTime({over})"
        )),
        ch.number(&format!(
            "SELECT sum(value) FROM (SELECT * FROM {db}.counters FINAL) WHERE ts < toDateTime({over})"
        ))
    );
    check_percentiles(db, &sent);
    // `tallyd query` picks the minutes for 5 hours, and they add up.
    let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .args(["query", "rc.c.k0", "--type", "counter", "--last", "5h"])
        .args(["--clickhouse-url", &ch.url(), "--clickhouse-database", db])
        .output()
        .expect("tallyd query");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "-- minute rollups"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ts\tvalue\tsamples"));
    let total: f64 = lines
        .map(|l| {
            l.split('\t')
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
                .expect("value")
        })
        .sum();
    assert_eq!(
        total,
        ch.number(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'rc.c.k0'"
        ))
    );
    // The completeness table names every flush the rollups came from.
    assert!(ch.number(&format!("SELECT count() FROM {db}.flushes")) > 0.0);
    assert_eq!(
        ch.number(&format!(
            "SELECT count() FROM {db}.flushes WHERE host != 'roll-host' OR counters + gauges + timers + sets = 0"
        )),
        0.0
    );
    drop(d);
}

/// A life that stops at `failpoint` while flushing samples of a past
/// minute (sent twice over: the re-send must count once).
fn d_restart_resend(dir: &Path, db: &str, failpoint: &str, sent: &mut Sent, ts: u32) {
    let d = start(dir, db, failpoint, "200ms", &[]);
    d.send(&sent.at(ts));
    d.wait_abort(60);
}

#[test]
fn retention_drops_raw_days_past_their_age_and_the_rollups_stay() {
    let _serial = serial();
    let ch = clickhouse();
    let db = "retention";
    let dir = temp_dir("retention");
    let mut sent = Sent::default();
    let t = now();
    let old = t - 50 * 3600;
    let old = old - old % 60;
    let d = start(&dir, db, "", "200ms", &[]);
    d.send(&sent.span(old, old + 600, 30));
    d.send(&sent.span(t - 3600, t - 3000, 30));
    wait_equal(db, &sent, "before retention");
    let old_minutes = ch.query(&format!(
        "SELECT ts, sum(value) FROM {db}.counters_1m FINAL WHERE ts < toDateTime({}) GROUP BY ts ORDER BY ts",
        old + 3600
    ));
    assert!(!old_minutes.is_empty());
    drop(d);

    // Raw rows are kept a day now: the day 50 hours back goes, whole.
    let d = start(&dir, db, "", "200ms", &["--retention-raw", "1d"]);
    let gone = wait_for(60, || {
        ch.number(&format!(
            "SELECT count() FROM {db}.counters WHERE ts < toDateTime({})",
            old + 3600
        )) == 0.0
    });
    assert!(gone, "the old day's raw rows are dropped");
    assert!(d.metric("tallyd_retention_partitions_dropped_total") >= 1.0);
    assert!(
        ch.number(&format!(
            "SELECT count() FROM {db}.counters WHERE ts >= toDateTime({})",
            t - 3600
        )) > 0.0,
        "today's raw rows stay"
    );
    assert_eq!(
        ch.query(&format!(
            "SELECT ts, sum(value) FROM {db}.counters_1m FINAL WHERE ts < toDateTime({}) GROUP BY ts ORDER BY ts",
            old + 3600
        )),
        old_minutes,
        "the minutes of the dropped day stay"
    );
    drop(d);
}

#[test]
fn a_raw_table_of_the_previous_release_is_moved_aside_and_dropped_once_expired() {
    let _serial = serial();
    let ch = clickhouse();
    let db = "legacy";
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS {db}"));
    // The previous release's counters: monthly partitions, sorted by series.
    ch.query(&format!(
        "CREATE TABLE {db}.counters (ts DateTime, name String, tags Array(String), host String, flush_id UInt64, value Float64, samples UInt64) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(ts) ORDER BY (name, tags, host, ts, flush_id)"
    ));
    let t = now();
    let expired = t - 70 * 86_400;
    ch.query(&format!(
        "INSERT INTO {db}.counters VALUES ({expired}, 'old', [], 'h', 1, 5, 1) ({}, 'recent', [], 'h', 2, 7, 1)",
        t - 3600
    ));
    let dir = temp_dir("legacy");
    // Rows of the old table are the only copy of their periods: kept as
    // long as hours are.
    let keep = ["--retention-minute", "30d", "--retention-hour", "60d"];
    let d = start(&dir, db, "", "200ms", &keep);
    d.send(&["fresh:3|c\n".to_string()]);
    let moved = wait_for(60, || {
        ch.try_query(&format!(
            "SELECT sorting_key FROM system.tables WHERE database = '{db}' AND name = 'counters'"
        ))
        .is_some_and(|k| k.starts_with("toStartOfMinute(ts)"))
    });
    assert!(moved, "the new layout is in place");
    assert!(
        wait_for(30, || ch
            .number(&format!("SELECT sum(value) FROM {db}.counters FINAL"))
            == 3.0),
        "new rows go to the new table"
    );
    // The expired month is dropped; the recent row stays readable aside.
    let dropped = wait_for(60, || {
        ch.try_query(&format!("SELECT sum(value) FROM {db}.counters_legacy"))
            .is_some_and(|v| v.trim() == "7")
    });
    assert!(dropped, "the expired month of the old table is dropped");
    assert_eq!(d.metric("tallyd_tables_moved_aside_total"), 1.0);
    // Once nothing in it is kept, the old table goes too.
    ch.query(&format!("TRUNCATE TABLE {db}.counters_legacy"));
    drop(d);
    let d = start(&dir, db, "", "200ms", &keep);
    // Polled with errors as "not yet": 18.16 fails a read of
    // system.tables that meets the table while it is being dropped
    // ("Table legacy.counters_legacy doesn't exist").
    let gone = wait_for(60, || {
        ch.try_query(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'counters_legacy'"
        ))
        .is_some_and(|n| n.trim() == "0")
    });
    assert!(gone, "an empty table of the earlier layout is dropped");
    drop(d);
}
