//! The explorer and its API against a real tallyd and a real ClickHouse
//! (18.16, and the modern engine in the chDB lane): exact values read back
//! through `/api/series`, hostile names and tag values as data and as
//! parameters, the admin token off loopback, and the pages in Debian's
//! headless Chromium, read from the DOM (`tests/explorer/browser.rs`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{clickhouse, config, send_tcp, settings, wait_for};
use serde_json::Value;
use tallyd::server;

#[path = "explorer/browser.rs"]
mod browser;

/// A GET on the admin listener: (status, body), with `token` as a bearer
/// token if given.
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    get_as(port, path, token, "127.0.0.1")
}

/// [`get`] with `host` as the `Host` header.
fn get_as(port: u16, path: &str, token: Option<&str>, host: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n").expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read");
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn json(port: u16, path: &str) -> Value {
    let (status, body) = get(port, path, None);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// `%XX` for every byte but letters and digits.
fn encode(s: &[u8]) -> String {
    s.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A number from the shared ClickHouse, `None` until its table exists.
fn number(sql: &str) -> Option<f64> {
    clickhouse().try_query(sql)?.trim().parse().ok()
}

fn now() -> u32 {
    u32::try_from(tallyd::clock::wall_clock().as_secs()).expect("now")
}

/// The sum of column `col` over every point of every series.
fn total(v: &Value, col: &str) -> f64 {
    let at = v["columns"]
        .as_array()
        .and_then(|c| c.iter().position(|c| c == col))
        .expect("column")
        + 1;
    v["series"]
        .as_array()
        .expect("series")
        .iter()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p[at].as_f64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_tags_are_data_never_sql() {
    let ch = clickhouse();
    let db = "explorer_hostile";
    let s = settings(ch, db);
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let tcp = running.tcp_addr.expect("tcp");
    // Names and tag values a StatsD line can carry: quotes, backslashes,
    // SQL, a long name. Each is counted a known number of times.
    let long = "n".repeat(250);
    let names = [
        "a'b".to_string(),
        "c\\d".to_string(),
        "x'; DROP TABLE explorer_hostile.counters; --".to_string(),
        "q\"u`o".to_string(),
        long.clone(),
    ];
    let mut text = String::new();
    for (i, name) in names.iter().enumerate() {
        for _ in 0..=i {
            text.push_str(&format!("{name}:3|c|#v:it's\\here\n"));
        }
    }
    // A hostile tag key to group by: its top value, then "other".
    text.push_str("grp.m:1|c|#q'\\k:v1\ngrp.m:1|c|#q'\\k:v1\ngrp.m:1|c|#q'\\k:v2\n");
    tokio::task::spawn_blocking(move || send_tcp(tcp, &text))
        .await
        .expect("send");
    let stored = wait_for(30, || {
        number(&format!("SELECT sum(value) FROM {db}.counters FINAL")) == Some(48.0)
    });
    assert!(stored, "the lines reached ClickHouse");

    for (i, name) in names.iter().enumerate() {
        let q = format!(
            "/api/series?name={}&tag={}&range=15m&group=v",
            encode(name.as_bytes()),
            encode(b"v:it's\\here")
        );
        let v = tokio::task::spawn_blocking(move || json(admin, &q))
            .await
            .expect("get");
        assert_eq!(total(&v, "sum"), 3.0 * (i as f64 + 1.0), "{name}: {v}");
        assert_eq!(v["series"][0]["label"], "v:it's\\here", "{name}");
    }
    let q = format!(
        "/api/series?name=grp.m&range=15m&top=1&group={}",
        encode(b"q'\\k")
    );
    let v = tokio::task::spawn_blocking(move || json(admin, &q))
        .await
        .expect("get");
    assert_eq!(v["series"][0]["label"], "q'\\k:v1", "{v}");
    assert_eq!(v["series"][1]["label"], "other", "{v}");
    let sums: Vec<f64> = (0..2)
        .map(|i| {
            v["series"][i]["points"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p[2].as_f64())
                .sum()
        })
        .collect();
    assert_eq!(sums, [2.0, 1.0], "{v}");
    // A page elsewhere whose name was rebound to 127.0.0.1 (DNS
    // rebinding) is refused.
    let (status, body) = tokio::task::spawn_blocking(move || {
        get_as(admin, "/api/status", None, "evil.example:8127")
    })
    .await
    .expect("get");
    assert_eq!(status, 403, "{body}");
    // As parameters only: nothing matches, nothing breaks.
    for (param, says) in [
        ("name=%FF%FE".to_string(), Some("not valid UTF-8")),
        ("name=a&tag=%C3%28".to_string(), Some("not valid UTF-8")),
        (format!("name={}", "z".repeat(5000)), Some("longer than")),
        ("name=x&grup=env".to_string(), Some("unknown parameter")),
        (format!("name=x&group={}", encode(b"'\\)) OR 1=1 --")), None),
        (
            format!("name=x&host={}", encode(b"\\'; DROP DATABASE x")),
            None,
        ),
        (
            format!("name=x&type=set&tag={}", encode(b"k:\0\n\t'")),
            None,
        ),
    ] {
        let path = format!("/api/series?{param}&range=1h");
        let (status, body) = tokio::task::spawn_blocking(move || get(admin, &path, None))
            .await
            .expect("get");
        match says {
            Some(text) => {
                assert_eq!(status, 400, "{body}");
                assert!(body.contains(text), "{body}");
            }
            None => {
                assert_eq!(status, 200, "{body}");
                let v: Value = serde_json::from_str(&body).expect("JSON");
                assert_eq!(v["series"], serde_json::json!([]), "{body}");
            }
        }
    }
    // The tables are all still there, and so is every row.
    assert_eq!(
        ch.number(&format!("SELECT sum(value) FROM {db}.counters FINAL")),
        48.0
    );
    assert_eq!(running.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_off_loopback_needs_its_token() {
    let ch = clickhouse();
    let mut s = settings(ch, "explorer_token");
    s.admin = "0.0.0.0:0".into();
    let refused = s.validate().expect_err("no token off loopback");
    assert!(refused.to_string().contains("admin_token"), "{refused}");

    s.admin_token = "s3cret-token".into();
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let answers = tokio::task::spawn_blocking(move || {
        [
            get(admin, "/api/status", None),
            get(admin, "/api/status", Some("wrong")),
            get(admin, "/metrics", None),
            get(admin, "/api/status", Some("s3cret-token")),
            get(admin, "/health", None),
            get(admin, "/", None),
        ]
    })
    .await
    .expect("get");
    assert_eq!(answers[0].0, 401, "{}", answers[0].1);
    assert!(answers[0].1.contains("Bearer"), "{}", answers[0].1);
    assert_eq!(answers[1].0, 401);
    assert_eq!(answers[2].0, 401);
    assert_eq!(answers[3].0, 200, "{}", answers[3].1);
    // Load balancers probe /health; the page holds no data.
    assert_eq!(answers[4].0, 200);
    assert_eq!(answers[5].0, 200);
    assert_eq!(
        running
            .telemetry
            .admin_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(running.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grouped_counter_and_a_timer_read_back_exact() {
    let ch = clickhouse();
    let db = "explorer_values";
    let s = settings(ch, db);
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let tcp = running.tcp_addr.expect("tcp");
    let t0 = now() - 300;
    let t0 = t0 - t0 % 60;
    let text = browser::data(t0);
    tokio::task::spawn_blocking(move || send_tcp(tcp, &text))
        .await
        .expect("send");
    // Each table is an INSERT of its own: wait for both.
    let stored = wait_for(30, || {
        number(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'shop.orders'"
        )) == Some(browser::ORDERS_TOTAL)
            && number(&format!("SELECT sum(count) FROM {db}.timers FINAL")) == Some(100.0)
    });
    assert!(stored, "the lines reached ClickHouse");
    let v = tokio::task::spawn_blocking(move || {
        json(
            admin,
            "/api/series?name=shop.orders&range=15m&group=region&top=3",
        )
    })
    .await
    .expect("get");
    assert_eq!(v["resolution"], "raw", "{v}");
    let labels: Vec<&str> = v["series"]
        .as_array()
        .expect("series")
        .iter()
        .filter_map(|s| s["label"].as_str())
        .collect();
    assert_eq!(labels, ["region:r1", "region:r2", "region:r3", "other"]);
    for (i, want) in browser::TOP_AND_OTHER.iter().enumerate() {
        assert_eq!(v["series"][i]["points"][0][0], f64::from(t0), "{v}");
        // rate (per second of a 1 s interval) and sum.
        assert_eq!(v["series"][i]["points"][0][1], *want, "{v}");
        assert_eq!(v["series"][i]["points"][0][2], *want, "{v}");
    }
    let v = tokio::task::spawn_blocking(move || {
        json(admin, "/api/series?name=shop.latency&type=timer&range=15m")
    })
    .await
    .expect("get");
    let p = &v["series"][0]["points"][0];
    let p99 = p[3].as_f64().expect("p99");
    assert!((p99 - 99.0).abs() <= 1.0, "p99 {p99} within 1 % of 99: {v}");
    assert_eq!(p[5], 100.0, "count: {v}");
    assert_eq!(p[4], 100.0, "max: {v}");

    // Now's samples, before any rollup has them: the minute and hour views
    // take their tail from the raw rows.
    let text = "shop.recent:5|c\nshop.recent:2|c\n".to_string();
    tokio::task::spawn_blocking(move || send_tcp(tcp, &text))
        .await
        .expect("send");
    let stored = wait_for(30, || {
        number(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'shop.recent'"
        )) == Some(7.0)
    });
    assert!(stored, "the lines reached ClickHouse");
    for (range, resolution) in [("1h", "minute"), ("7d", "hour")] {
        let path = format!("/api/series?name=shop.recent&range={range}");
        let v = tokio::task::spawn_blocking(move || json(admin, &path))
            .await
            .expect("get");
        assert_eq!(v["resolution"], resolution, "{v}");
        assert_eq!(total(&v, "sum"), 7.0, "{range}: {v}");
    }
    assert_eq!(running.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallyd_top_under_tmux_shows_the_exploding_metric_first() {
    let ch = clickhouse();
    let s = settings(ch, "explorer_top");
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin");
    let udp = running.udp_addr.expect("udp");
    // One metric grows a new tag value per line; two others stay narrow.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut d = String::from("checkout.latency:3|ms\nqueue.depth:7|g\n");
                for _ in 0..40 {
                    d.push_str(&format!("api.requests:1|c|#request_id:{n}\n"));
                    n += 1;
                }
                let _ = sock.send_to(d.as_bytes(), udp);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let dir = common::temp_dir("top");
    let socket = dir.join("tmux.sock");
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .expect("tmux runs")
    };
    let command = format!(
        "{} top --admin {admin} --every 500ms",
        env!("CARGO_BIN_EXE_tallyd")
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "140",
        "-y",
        "50",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let mut screen = String::new();
    let found = wait_for(30, || {
        screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned();
        let first = screen
            .lines()
            .skip_while(|l| !l.starts_with("TOP BY KEYS"))
            .nth(1)
            .is_some_and(|l| l.starts_with("api.requests ") && !l.contains(" 1   "));
        // And a rate: two polls apart.
        let udp_rate = screen
            .lines()
            .find(|l| l.starts_with("udp "))
            .and_then(|l| l.split_whitespace().nth(1))
            .is_some_and(|r| r != "0");
        first && udp_rate
    });
    tmux(&["kill-server"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sending.join();
    let trimmed: Vec<&str> = screen.lines().map(str::trim_end).collect();
    browser::keep(
        "tallyd-top.txt",
        format!("{}\n", trimmed.join("\n").trim_end()).as_bytes(),
    );
    assert!(found, "api.requests is not first by keys:\n{screen}");
    assert!(screen.contains("udp"), "{screen}");
    assert_eq!(running.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_show_known_values_in_headless_chromium() {
    let ch = clickhouse();
    let db = "explorer_browser";
    let mut s = settings(ch, db);
    // Three days back: raw rows kept, then rolled up into hours.
    s.aggregate.timestamp_window = "4d".into();
    s.retention.raw = "5d".into();
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let tcp = running.tcp_addr.expect("tcp");
    let t0 = now() - 300;
    let t0 = t0 - t0 % 60;
    let t1 = now() - 3 * 86_400;
    let t1 = t1 - t1 % 3600 + 600;
    let mut text = browser::data(t0);
    text.push_str(&format!("shop.daily:42|c|T{t1}\n"));
    text.push_str(&browser::waves(now()));
    text.push_str("_e{6,12}:deploy|web v1.2 out|t:info\n");
    // Provoked: a sample stamped in 2001 is dropped, and counted.
    text.push_str("shop.orders:1|c|T1000000000\n");
    tokio::task::spawn_blocking(move || send_tcp(tcp, &text))
        .await
        .expect("send");
    let rolled = wait_for(90, || {
        number(&format!(
            "SELECT sum(value) FROM {db}.counters_1h FINAL WHERE name = 'shop.daily'"
        )) == Some(42.0)
            && number(&format!(
                "SELECT sum(value) FROM {db}.counters FINAL WHERE name = 'shop.orders'"
            )) == Some(browser::ORDERS_TOTAL)
            && number(&format!("SELECT sum(count) FROM {db}.timers FINAL")) == Some(100.0)
            && number(&format!("SELECT count() FROM {db}.events")) == Some(1.0)
    });
    assert!(rolled, "the rows and the hour rollup reached ClickHouse");
    let base = format!("http://127.0.0.1:{admin}");
    let page = |path: &str, shot: Option<(&'static str, u32)>| {
        let url = format!("{base}{path}");
        tokio::task::spawn_blocking(move || browser::chromium(&url, shot))
    };

    // A counter rate, grouped by region: the top 3 and "other".
    let dom = page(
        "/?name=shop.orders&type=counter&range=15m&group=region&top=3",
        None,
    )
    .await
    .expect("chromium");
    assert_eq!(
        browser::attribute(&dom, "resolution", "data-resolution"),
        Some("raw")
    );
    let ts = t0.to_string();
    for (label, want) in ["region:r1", "region:r2", "region:r3", "other"]
        .iter()
        .zip(browser::TOP_AND_OTHER)
    {
        let row = [("data-series", *label), ("data-ts", ts.as_str())];
        assert_eq!(browser::cell(&dom, &row, "rate"), Some(want), "{label}");
        assert_eq!(browser::cell(&dom, &row, "sum"), Some(want), "{label}");
    }
    let sql = dom.split("id=\"sql\"").nth(1).unwrap_or("");
    assert!(
        sql.split("</pre>")
            .next()
            .is_some_and(|s| s.contains("SELECT")),
        "the SQL it ran is on the page"
    );
    // The event, listed and marked on the time axis.
    let events = dom.split("id=\"events\"").nth(1).unwrap_or("");
    assert!(events.contains("deploy"), "the event is listed: {dom}");
    assert!(
        dom.contains("class=\"event\""),
        "an event marker on the chart"
    );

    // A timer's p99, within the sketch's 1 %.
    let dom = page("/?name=shop.latency&type=timer&range=15m", None)
        .await
        .expect("chromium");
    let row = [("data-series", "all"), ("data-ts", ts.as_str())];
    let p99 = browser::cell(&dom, &row, "p99").expect("a p99 cell");
    assert!((p99 - 99.0).abs() <= 1.0, "p99 {p99}");
    assert_eq!(browser::cell(&dom, &row, "count"), Some(100.0));

    // Seven days come from the hour rollup, and the page says so.
    let dom = page("/?name=shop.daily&type=counter&range=7d", None)
        .await
        .expect("chromium");
    assert_eq!(
        browser::attribute(&dom, "resolution", "data-resolution"),
        Some("hour")
    );
    let hour = (t1 - t1 % 3600).to_string();
    let row = [("data-series", "all"), ("data-ts", hour.as_str())];
    assert_eq!(browser::cell(&dom, &row, "sum"), Some(42.0));
    assert_eq!(browser::cell(&dom, &row, "rate"), Some(42.0 / 3600.0));

    // The status page shows the drop that was provoked.
    let dom = page("/status", None).await.expect("chromium");
    assert_eq!(
        browser::attribute(&dom, "health", "data-status"),
        Some("ok")
    );
    assert_eq!(
        browser::cell(&dom, &[("data-reason", "timestamp_out_of_window")], "total"),
        Some(1.0),
        "{dom}"
    );

    // The README's screenshots (scripts/screenshots.sh keeps them).
    page(
        "/?name=web.requests&type=counter&range=15m&group=region&top=4",
        Some(("explorer.png", 1000)),
    )
    .await
    .expect("chromium");
    page("/status", Some(("status.png", 1400)))
        .await
        .expect("chromium");
    assert_eq!(running.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_says_when_clickhouse_fails_and_since_when() {
    let mut s = settings(clickhouse(), "explorer_down");
    // Nothing listens on port 1: every statement fails.
    s.clickhouse.url = "http://127.0.0.1:1".into();
    s.shutdown_timeout = "1s".into();
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let mut status = Value::Null;
    let down = tokio::task::spawn_blocking(move || {
        let seen = wait_for(30, || {
            status = json(admin, "/api/status");
            status["clickhouse"]["up"] == false
                && status["clickhouse"]["failing_seconds"].as_u64() >= Some(1)
        });
        (seen, status)
    })
    .await
    .expect("get");
    assert!(down.0, "{}", down.1);
    let error = down.1["clickhouse"]["last_error"].as_str().unwrap_or("");
    assert!(!error.is_empty(), "{}", down.1);
    let up = down.1["metrics"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "tallyd_clickhouse_up"))
        .map(|m| m["value"].clone());
    assert_eq!(up, Some(Value::from(0)));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metric_stays_listed_after_its_keys_leave_the_series_table() {
    let s = settings(clickhouse(), "explorer_recent");
    let running = server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let udp = running.udp_addr.expect("udp");
    let (listed, later) = tokio::task::spawn_blocking(move || {
        // Sent until a scan (at most one per 2 s) has seen it.
        let listed = wait_for(10, || {
            let lines = "sparse.metric:1|c|#k:a\nsparse.metric:1|c|#k:b\n";
            common::send_udp(udp, &[lines.into()]);
            json(admin, "/api/metrics?q=sparse")["metrics"][0]["keys"] == 2
        });
        // Idle for whole intervals: the keys leave the series table.
        std::thread::sleep(Duration::from_secs(4));
        let (_, metrics) = get(admin, "/metrics", None);
        assert!(
            metrics.lines().any(|l| l == "tallyd_series_keys 0"),
            "the keys left the series table"
        );
        (listed, json(admin, "/api/metrics?q=sparse"))
    })
    .await
    .expect("get");
    assert!(listed, "listed while live");
    assert_eq!(later["metrics"][0]["name"], "sparse.metric", "{later}");
    assert_eq!(later["metrics"][0]["keys"], 2, "{later}");
    running.shutdown().await;
}
