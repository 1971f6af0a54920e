//! StatsD over UDP and TCP into a real ClickHouse, checked with exact totals.
//! Each test writes to its own database of this binary's private server.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::{clickhouse, config, send_tcp, send_udp, settings, wait_for, wait_for_lines};
use tallyd::server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_counters_arrive_exact_with_sample_rates() {
    let ch = clickhouse();
    let s = settings(ch, "udp_counters");
    let running = server::start(config(&s)).await.expect("start");
    let addr = running.udp_addr.expect("udp");
    // 2,000 datagrams of 20 lines: 40,000 lines over 100 keys.
    let datagrams: Vec<String> = (0..2000)
        .map(|d| {
            (0..20)
                .map(|l| format!("orders.k{}:{}|c|@0.5\n", (d * 20 + l) % 100, 1 + l % 3))
                .collect()
        })
        .collect();
    let expected: f64 = (0..2000 * 20)
        .map(|i| f64::from(1 + (i % 20) % 3) / 0.5)
        .sum();
    tokio::task::spawn_blocking(move || send_udp(addr, &datagrams))
        .await
        .expect("send");
    wait_for_lines(&running.telemetry, 40_000);
    assert_eq!(running.shutdown().await, 0, "nothing lost at shutdown");

    let db = "udp_counters";
    assert_eq!(
        ch.number(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name LIKE 'orders.%'"
        )),
        expected
    );
    assert_eq!(
        ch.number(&format!("SELECT sum(samples) FROM {db}.counters FINAL")),
        40_000.0
    );
    assert_eq!(
        ch.number(&format!("SELECT uniqExact(name) FROM {db}.counters FINAL")),
        100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_over_tcp_and_udp() {
    let ch = clickhouse();
    let s = settings(ch, "every_type");
    let running = server::start(config(&s)).await.expect("start");
    let (udp, tcp) = (
        running.udp_addr.expect("udp"),
        running.tcp_addr.expect("tcp"),
    );
    let mut tcp_text = String::new();
    for v in 1..=1000 {
        tcp_text.push_str(&format!("api.latency:{v}|ms|#route:/a,env:prod\r\n"));
    }
    tcp_text.push_str("queue.depth:40|g\nqueue.depth:+5|g\nqueue.depth:-3|g\n");
    tcp_text.push_str("users:alice|s\nusers:bob|s\nusers:alice|s\n");
    tcp_text.push_str("api.size:1:2:3:4|h\nbytes:10|d|@0.1\n");
    tcp_text.push_str("reqs:1|c|#env:prod,route:/a");
    send_tcp(tcp, &tcp_text);
    send_udp(
        udp,
        &[
            "reqs:2|c|#route:/a,env:prod\nreqs:4|c|#route:/a,env:prod,env:prod\nusers:carol|s"
                .to_string(),
        ],
    );
    wait_for_lines(&running.telemetry, 1000 + 3 + 3 + 2 + 1 + 3);
    assert_eq!(running.shutdown().await, 0);

    let db = "every_type";
    // Reordered and repeated tags are one series, stored sorted.
    assert_eq!(
        ch.query(&format!("SELECT tags, sum(value), sum(samples) FROM {db}.counters FINAL WHERE name = 'reqs' GROUP BY tags FORMAT TSV")),
        "['env:prod','route:/a']\t7\t3\n"
    );
    assert_eq!(
        ch.number(&format!(
            "SELECT argMax(value, version) FROM {db}.gauges FINAL WHERE name = 'queue.depth'"
        )),
        42.0
    );
    assert_eq!(
        ch.query(&format!("SELECT sum(count), sum(sum), min(min), max(max) FROM {db}.timers FINAL WHERE name = 'api.latency' FORMAT TSV")),
        "1000\t500500\t1\t1000\n"
    );
    for (q, want) in [("p50", 500.0), ("p90", 900.0), ("p99", 990.0)] {
        let got = ch.number(&format!(
            "SELECT {q} FROM {db}.timers FINAL WHERE name = 'api.latency'"
        ));
        assert!(
            (got - want).abs() / want <= 0.01,
            "{q} = {got}, want {want} within 1 %"
        );
    }
    // The merged p99 from bucket columns, as documented in the README.
    let merged = ch.number(&format!(
        "SELECT quantileExactWeighted(0.99)(v, toUInt64(round(c * 1000))) FROM {db}.timers FINAL ARRAY JOIN bucket_values AS v, bucket_counts AS c WHERE name = 'api.latency'"
    ));
    assert!(
        (merged - 990.0).abs() / 990.0 <= 0.01,
        "merged p99 = {merged}"
    );
    assert_eq!(
        ch.query(&format!("SELECT kind, count, sum FROM {db}.timers FINAL WHERE name IN ('api.size', 'bytes') ORDER BY kind FORMAT TSV")),
        "d\t10\t100\nh\t4\t10\n"
    );
    assert_eq!(
        ch.query(&format!(
            "SELECT cardinality, samples FROM {db}.sets FINAL WHERE name = 'users' FORMAT TSV"
        )),
        "3\t4\n"
    );
    assert_eq!(
        ch.number(&format!("SELECT uniqExact(h) FROM {db}.sets FINAL ARRAY JOIN member_hashes AS h WHERE has(member_hashes, sipHash64('carol'))")),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_weights_are_exact_and_percentiles_hold_from_1e_minus_9_to_1e15() {
    let ch = clickhouse();
    let s = settings(ch, "weights");
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    let mut lines = vec!["x:10|h|@0.4"; 2];
    lines.extend(["y:10|ms|@0.75"; 4]);
    lines.extend(["tiny:1|d|@1e-19"; 3]);
    lines.extend(["s:0.0001|d", "s:0.0004|d", "s:0.0004|d"]);
    lines.extend([
        "n:3600000000000|h",
        "n:7200000000000|h",
        "n:7200000000000|h",
    ]);
    lines.extend([
        "lo:0.000000001|d",
        "lo:0.000000002|d",
        "hi:1000000000000000|d",
    ]);
    lines.extend(["neg:-5|h", "neg:-1|h", "neg:0|h", "neg:2|h"]);
    send_udp(udp, &[lines.join("\n")]);
    wait_for_lines(&running.telemetry, lines.len() as u64);
    assert_eq!(running.shutdown().await, 0);
    let q = |sql: &str| ch.query(&format!("{sql} FORMAT TSV"));
    assert_eq!(
        q("SELECT count, sum, samples FROM weights.timers FINAL WHERE name = 'x'"),
        "5\t50\t2\n"
    );
    assert_eq!(
        q("SELECT round(count, 9), round(sum, 9) FROM weights.timers FINAL WHERE name = 'y'"),
        "5.333333333\t53.333333333\n"
    );
    assert_eq!(
        q(
            "SELECT count = 3e19, arraySum(bucket_counts) = 3e19 FROM weights.timers FINAL WHERE name = 'tiny'"
        ),
        "1\t1\n"
    );
    let within = |sql: &str, want: f64| {
        let got = ch.number(sql);
        assert!(
            (got - want).abs() <= 0.01 * want.abs(),
            "{sql}: {got}, want {want} within 1 %"
        );
    };
    let t = "FROM weights.timers FINAL WHERE name =";
    within(&format!("SELECT p50 {t} 's'"), 0.0004);
    within(&format!("SELECT p50 {t} 'n'"), 7.2e12);
    within(&format!("SELECT p99 {t} 'n'"), 7.2e12);
    within(&format!("SELECT p50 {t} 'lo'"), 1e-9);
    within(&format!("SELECT p99 {t} 'lo'"), 2e-9);
    within(&format!("SELECT p50 {t} 'hi'"), 1e15);
    within(&format!("SELECT p50 {t} 'neg'"), -1.0);
    within(&format!("SELECT min {t} 'neg'"), -5.0);
    // No bucket lies below its key's minimum (beyond the 1 %).
    assert_eq!(
        q(
            "SELECT countIf(arrayReduce('min', bucket_values) < min - 0.01 * abs(min)) FROM weights.timers FINAL"
        ),
        "0\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timers_table_of_an_earlier_release_is_moved_aside_with_its_rows() {
    let ch = clickhouse();
    let s = settings(ch, "migrate");
    ch.query("CREATE DATABASE IF NOT EXISTS migrate");
    ch.query("DROP TABLE IF EXISTS migrate.timers");
    // The timers table as the previous release created it.
    ch.query("CREATE TABLE migrate.timers (ts DateTime, name String, tags Array(String), host String, flush_id UInt64, kind String, count UInt64, sum Float64, min Float64, max Float64, p50 Float64, p90 Float64, p95 Float64, p99 Float64, samples UInt64, bucket_values Array(Float64), bucket_counts Array(UInt64)) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(ts) ORDER BY (name, tags, kind, host, flush_id)");
    ch.query("INSERT INTO migrate.timers VALUES (now(), 'old', [], 'h', 1, 'ms', 3, 6, 1, 3, 2, 3, 3, 3, 3, [1, 2, 3], [1, 1, 1])");
    // `tallyd schema --migrate` says what would change, and changes nothing.
    let plan = tallyd::sink::Sink::new(
        config(&s).sink,
        std::sync::Arc::new(tallyd::telemetry::Telemetry::default()),
    )
    .migration_plan()
    .await
    .expect("plan");
    // Sorted by series and partitioned by month: moved aside, whatever its
    // columns.
    let timers: Vec<&String> = plan.iter().filter(|p| p.contains("timers")).collect();
    assert_eq!(
        timers,
        ["RENAME TABLE `migrate`.`timers` TO `migrate`.`timers_legacy`"],
        "{plan:?}"
    );
    assert!(
        ch.query("SELECT type FROM system.columns WHERE database = 'migrate' AND table = 'timers' AND name = 'count' FORMAT TSV")
            == "UInt64\n"
    );
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    send_udp(udp, &["old:10|ms|@0.5".to_string()]);
    wait_for_lines(&running.telemetry, 1);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.query("SELECT type FROM system.columns WHERE database = 'migrate' AND table = 'timers' AND name IN ('count', 'bucket_counts') ORDER BY name FORMAT TSV"),
        "Array(Float64)\nFloat64\n"
    );
    // The old table, sorted by series and partitioned by month, was moved
    // aside with its rows; the new one has the new row.
    assert_eq!(
        ch.query("SELECT sum(count), sum(sum), sum(arraySum(bucket_counts)) FROM migrate.timers FINAL WHERE name = 'old' FORMAT TSV"),
        "2\t20\t2\n"
    );
    assert_eq!(
        ch.query("SELECT sum(count), sum(sum), sum(arraySum(bucket_counts)) FROM migrate.timers_legacy FINAL WHERE name = 'old' FORMAT TSV"),
        "3\t6\t3\n"
    );
    assert_eq!(
        ch.query("SELECT max(version) FROM migrate.tallyd_schema FORMAT TSV"),
        format!("{}\n", tallyd::sink::schema::SCHEMA_VERSION)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_service_checks_are_stored_one_row_each() {
    let ch = clickhouse();
    let s = settings(ch, "dsd_events");
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    let tcp = running.tcp_addr.expect("tcp");
    let lines = [
        "_e{21,37}:An exception occurred|Cannot parse CSV file\\nfrom 10.0.0.17|d:1700000000|h:web-1|k:csv|p:low|s:python|t:error|#env:prod,b",
        "_e{3,5}:a|b|c|d|e",
        "_sc|redis.can_connect|2|d:1700000100|h:db-1|#env:prod|m:timed out | after 10s",
        "_sc|app.ok|0",
        "_e{9,5}:too short|x",
        "_sc|bad.status|7",
        "c:1|c",
    ];
    send_udp(udp, &[lines.join("\n")]);
    send_tcp(tcp, "_e{2,2}:hi|yo|t:success\n");
    wait_for_lines(&running.telemetry, lines.len() as u64 + 1);
    let t = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);
    let q = |sql: &str| ch.query(&format!("{sql} FORMAT TSV"));
    assert_eq!(
        q("SELECT title, text, hostname, aggregation_key, priority, source_type, alert_type, tags, toUnixTimestamp(event_ts) FROM dsd_events.events FINAL ORDER BY title"),
        "An exception occurred\tCannot parse CSV file\\nfrom 10.0.0.17\tweb-1\tcsv\tlow\tpython\terror\t['b','env:prod']\t1700000000\n\
         a|b\tc|d|e\t\t\tnormal\t\tinfo\t[]\t"
            .to_string()
            + &q("SELECT toUnixTimestamp(ts) FROM dsd_events.events FINAL WHERE title = 'a|b'")
            + "hi\tyo\t\t\tnormal\t\tsuccess\t[]\t"
            + &q("SELECT toUnixTimestamp(ts) FROM dsd_events.events FINAL WHERE title = 'hi'")
    );
    assert_eq!(
        q(
            "SELECT name, status, hostname, tags, message, toUnixTimestamp(check_ts) FROM dsd_events.service_checks FINAL ORDER BY name"
        ),
        "app.ok\t0\t\t[]\t\t".to_string()
            + &q(
                "SELECT toUnixTimestamp(ts) FROM dsd_events.service_checks FINAL WHERE name = 'app.ok'"
            )
            + "redis.can_connect\t2\tdb-1\t['env:prod']\ttimed out | after 10s\t1700000100\n"
    );
    let text = t.render();
    for reason in ["invalid_event", "invalid_service_check"] {
        assert!(
            text.contains(&format!(
                "tallyd_parse_errors_total{{listener=\"udp\",reason=\"{reason}\"}} 1\n"
            )),
            "{reason}"
        );
    }
    assert_eq!(t.udp.events.load(Relaxed) + t.tcp.events.load(Relaxed), 3);
    assert_eq!(t.udp.service_checks.load(Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamped_samples_land_in_their_own_interval_and_far_ones_are_refused() {
    let ch = clickhouse();
    let s = settings(ch, "stamped");
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let past = now - 120;
    let lines = [
        format!("st.c:1|c|T{past}"),
        format!("st.c:2|c|#env:prod|T{past}"),
        format!("st.c:4|c|T{past}"),
        "st.c:8|c".to_string(),
        format!("st.g:7|g|T{past}"),
        "st.g:9|g".to_string(),
        format!("st.t:10|ms|T{past}"),
        format!("st.c:1000|c|T{}", now - 7200),
    ];
    send_udp(udp, &[lines.join("\n")]);
    wait_for_lines(&running.telemetry, lines.len() as u64);
    let t = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(t.dropped_timestamp.load(Relaxed), 1);
    let q = |sql: &str| ch.query(&format!("{sql} FORMAT TSV"));
    // The stamped samples are one row at their own second; the live one
    // is in today's interval, under another flush id.
    assert_eq!(
        q(&format!(
            "SELECT toUnixTimestamp(ts) = {past}, tags, sum(value) FROM stamped.counters FINAL WHERE name = 'st.c' GROUP BY ts, tags ORDER BY ts, tags"
        )),
        "1\t[]\t5\n1\t['env:prod']\t2\n0\t[]\t8\n"
    );
    assert_eq!(
        q("SELECT uniqExact(flush_id) FROM stamped.counters FINAL WHERE name = 'st.c'"),
        "2\n"
    );
    // The newest gauge value is the live one, whichever row landed last.
    assert_eq!(
        q("SELECT argMax(value, version) FROM stamped.gauges WHERE name = 'st.g'"),
        "9\n"
    );
    assert_eq!(
        q(&format!(
            "SELECT toUnixTimestamp(ts) = {past}, count, sum FROM stamped.timers FINAL WHERE name = 'st.t'"
        )),
        "1\t1\t10\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_made_before_a_server_upgrade_gets_the_deduplication_window() {
    let ch = clickhouse();
    let s = settings(ch, "upgraded");
    ch.query("CREATE DATABASE IF NOT EXISTS upgraded");
    ch.query("DROP TABLE IF EXISTS upgraded.counters");
    // The table as tallyd makes it for an 18.16 server: no window.
    ch.query("CREATE TABLE upgraded.counters (ts DateTime, name String, tags Array(String), host String, flush_id UInt64, value Float64, samples UInt64) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(ts) ORDER BY (name, tags, host, flush_id)");
    let running = server::start(config(&s)).await.expect("start");
    send_udp(running.udp_addr.expect("udp"), &["up.c:3|c".to_string()]);
    wait_for_lines(&running.telemetry, 1);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.number("SELECT sum(value) FROM upgraded.counters FINAL WHERE name = 'up.c'"),
        3.0
    );
    if common::modern() {
        // 22.2+: the token only drops a re-sent insert with the window.
        assert!(
            ch.query("SELECT engine_full FROM system.tables WHERE database = 'upgraded' AND name = 'counters'")
                .contains("non_replicated_deduplication_window = 1000"),
            "the window was not added"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_are_counted_and_neighbours_still_count() {
    let ch = clickhouse();
    let s = settings(ch, "malformed");
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    let datagram = "good:1|c\nno_value\ngood:1|x\ngood:abc|c\n\u{1}bad:1|c\ngood:1|c|@7\ngood:2|c\n_e{1,1}:a|b\n";
    send_udp(udp, &vec![datagram.to_string(); 10]);
    wait_for_lines(&running.telemetry, 80);
    let t = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);

    assert_eq!(
        ch.query("SELECT sum(value), sum(samples) FROM malformed.counters FINAL WHERE name = 'good' FORMAT TSV"),
        "30\t20\n"
    );
    let errors: Vec<u64> = t.udp.parse_errors.iter().map(|c| c.load(Relaxed)).collect();
    assert_eq!(errors.iter().sum::<u64>(), 50);
    assert_eq!(t.udp.events.load(Relaxed), 10);
    let text = t.render();
    for reason in [
        "missing_value",
        "unknown_type",
        "invalid_value",
        "invalid_name",
        "invalid_sample_rate",
    ] {
        assert!(
            text.contains(&format!(
                "tallyd_parse_errors_total{{listener=\"udp\",reason=\"{reason}\"}} 10\n"
            )),
            "{reason} in\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dogstatsd_fields_of_every_version_count_unknown_ones_are_skipped_and_no_sum_is_inf() {
    let ch = clickhouse();
    let s = settings(ch, "dsd_fields");
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let datagram = format!(
        "dd:1|c|card:low\ndd:1|c|e:some-value\ndd:1|c|zz:new|\ndd:1|c|T{now}|c:abc|@1\no:1e308|c\no:1e308|c\n"
    );
    send_udp(udp, &[datagram]);
    wait_for_lines(&running.telemetry, 6);
    let t = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.query("SELECT sum(value), sum(samples) FROM dsd_fields.counters FINAL WHERE name = 'dd' FORMAT TSV"),
        "4\t4\n"
    );
    assert_eq!(
        ch.query("SELECT value = 1e308, samples, isInfinite(value) FROM dsd_fields.counters FINAL WHERE name = 'o' FORMAT TSV"),
        "1\t1\t0\n"
    );
    assert_eq!(t.udp.skipped_fields.load(Relaxed), 2);
    assert_eq!(t.dropped_overflow.load(Relaxed), 1);
    assert_eq!(
        t.udp
            .parse_errors
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_per_key_compacts_every_increment() {
    let ch = clickhouse();
    let mut s = settings(ch, "compaction");
    s.aggregate.flush_interval = "1h".into();
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let text: String = (0..10_000).map(|_| "hot.counter:1|c\n").collect();
    send_tcp(tcp, &text);
    wait_for_lines(&running.telemetry, 10_000);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.query(
            "SELECT count(), sum(value), sum(samples) FROM compaction.counters FINAL FORMAT TSV"
        ),
        "1\t10000\t10000\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_depth_flushes_before_the_interval_ends() {
    let ch = clickhouse();
    let mut s = settings(ch, "max_depth");
    s.aggregate.flush_interval = "1h".into();
    s.aggregate.max_depth = 500;
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let text: String = (0..500)
        .map(|i| format!("depth.k{}:1|c\n", i % 7))
        .collect();
    send_tcp(tcp, &text);
    let landed = tokio::task::spawn_blocking(move || {
        wait_for(20, || {
            clickhouse()
                .try_query("SELECT sum(samples) FROM max_depth.counters FINAL")
                .as_deref()
                == Some("500\n")
        })
    })
    .await
    .expect("poll");
    assert!(landed, "rows did not land before the 1 h interval ended");
    assert_eq!(running.telemetry.flushes_by_depth.load(Relaxed), 1);
    assert_eq!(running.shutdown().await, 0);
    assert_eq!(
        ch.number("SELECT sum(value) FROM max_depth.counters FINAL"),
        500.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intervals_close_on_second_boundaries() {
    let ch = clickhouse();
    let s = settings(ch, "per_second");
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    send_udp(udp, &["tick:1|c".to_string()]);
    let landed = tokio::task::spawn_blocking(|| {
        wait_for(5, || {
            clickhouse()
                .try_query("SELECT count() FROM per_second.counters")
                .as_deref()
                == Some("1\n")
        })
    })
    .await
    .expect("poll");
    assert!(landed, "no row within 5 s with a 1 s interval");
    // The row's ts is the start of a whole-second interval, close to now.
    let age = ch.number("SELECT now() - any(ts) FROM per_second.counters");
    assert!((0.0..10.0).contains(&age), "ts is {age} s old");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limit_drops_new_keys_and_counts_them() {
    let ch = clickhouse();
    let mut s = settings(ch, "key_limit");
    s.aggregate.max_keys = 10;
    s.aggregate.flush_interval = "1h".into();
    let running = server::start(config(&s)).await.expect("start");
    let text: String = (0..30).map(|i| format!("k{i}:1|c\n")).collect();
    send_tcp(running.tcp_addr.expect("tcp"), &text);
    wait_for_lines(&running.telemetry, 30);
    let t = std::sync::Arc::clone(&running.telemetry);
    running.shutdown().await;
    assert_eq!(t.dropped_key_limit.load(Relaxed), 20);
    assert_eq!(
        ch.number("SELECT count() FROM key_limit.counters FINAL"),
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_serves_health_and_metrics() {
    let ch = clickhouse();
    let mut s = settings(ch, "admin");
    // One interval for the whole test: the live key is still live when read.
    s.aggregate.flush_interval = "1h".into();
    let running = server::start(config(&s)).await.expect("start");
    let port = running.admin_addr.expect("admin").port();
    send_tcp(running.tcp_addr.expect("tcp"), "a:1|c\nbroken\n");
    wait_for_lines(&running.telemetry, 2);
    let (health, metrics) = tokio::task::spawn_blocking(move || {
        (
            common::http(port, "GET", "/health", ""),
            common::http(port, "GET", "/metrics", ""),
        )
    })
    .await
    .expect("get");
    assert_eq!(health.as_deref(), Some("ok\n"));
    let metrics = metrics.expect("metrics");
    assert!(
        metrics.contains("tallyd_received_lines_total{listener=\"tcp\"} 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("tallyd_live_keys 1\n"), "{metrics}");
    assert!(metrics.contains("tallyd_series_keys 1\n"), "{metrics}");
    assert!(
        metrics.contains("tallyd_dropped_total{reason=\"udp_kernel\",listener=\"statsd\"} 0\n"),
        "{metrics}"
    );
    running.shutdown().await;
}

/// A batch as the sink gets it from the flush stage.
fn queued(batch: &tallyd::outbox::rows::Batch) -> tallyd::sink::Queued {
    tallyd::sink::Queued::in_memory(tallyd::outbox::flush::Flush::seal(batch.clone(), 1), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_sent_twice_is_counted_once() {
    use tallyd::outbox::rows::{Batch, CounterRow};
    use tallyd::sink::Sink;
    let ch = clickhouse();
    let s = settings(ch, "resend");
    let c = config(&s);
    let sink = Sink::new(c.sink.clone(), Default::default());
    sink.ensure_schema().await.expect("schema");
    let row = |v: f64| CounterRow {
        ts: 1_700_000_000,
        name: "resent".into(),
        tags: vec!["a:1".into()],
        host: "h".into(),
        flush_id: 42,
        value: v,
        samples: 3,
    };
    let batch = Batch {
        flush_id: 42,
        ts: 1_700_000_000,
        counters: vec![row(5.0)],
        ..Batch::default()
    };
    sink.write(&queued(&batch)).await;
    sink.write(&queued(&batch)).await;
    let other = Batch {
        flush_id: 43,
        counters: vec![CounterRow {
            flush_id: 43,
            ..row(2.0)
        }],
        ..batch.clone()
    };
    sink.write(&queued(&other)).await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM resend.counters FINAL WHERE name = 'resent'"),
        7.0
    );
    assert_eq!(
        ch.number("SELECT sum(samples) FROM resend.counters FINAL"),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_gauge_landing_late_does_not_win() {
    use tallyd::outbox::rows::{Batch, GaugeRow};
    use tallyd::sink::Sink;
    let ch = clickhouse();
    let c = config(&settings(ch, "late_gauge"));
    let sink = Sink::new(c.sink.clone(), Default::default());
    sink.ensure_schema().await.expect("schema");
    let batch = |version: u64, value: f64| Batch {
        flush_id: version,
        gauges: vec![GaugeRow {
            ts: 1_700_000_000,
            name: "temp".into(),
            tags: vec![],
            host: "h".into(),
            value,
            version,
            samples: 1,
        }],
        ..Batch::default()
    };
    // The newer flush lands first; a retried older one lands after it.
    sink.write(&queued(&batch(200, 21.5))).await;
    sink.write(&queued(&batch(100, 99.0))).await;
    assert_eq!(
        ch.number("SELECT argMax(value, version) FROM late_gauge.gauges WHERE name = 'temp'"),
        21.5
    );
    assert_eq!(
        ch.number("SELECT argMax(value, version) FROM late_gauge.gauges FINAL WHERE name = 'temp'"),
        21.5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_and_counted() {
    use std::io::{Read, Write};
    let ch = clickhouse();
    let mut s = settings(ch, "conn_limit");
    s.statsd.tcp_max_connections = 2;
    let running = server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let t = std::sync::Arc::clone(&running.telemetry);
    tokio::task::spawn_blocking(move || {
        let mut a = std::net::TcpStream::connect(tcp).expect("first");
        let mut b = std::net::TcpStream::connect(tcp).expect("second");
        assert!(wait_for(10, || t.tcp_connections.load(Relaxed) == 2));
        let mut c = std::net::TcpStream::connect(tcp).expect("the kernel accepts the third");
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        assert_eq!(
            c.read(&mut buf).map_err(|e| e.kind()),
            Ok(0),
            "the third connection is closed at once"
        );
        assert_eq!(t.tcp_connections_refused.load(Relaxed), 1);
        a.write_all(b"limited:1|c\n").expect("first still works");
        b.write_all(b"limited:2|c\n").expect("second still works");
    })
    .await
    .expect("client");
    wait_for_lines(&running.telemetry, 2);
    running.shutdown().await;
    assert_eq!(
        ch.number("SELECT sum(value) FROM conn_limit.counters FINAL"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    use std::io::Read;
    let ch = clickhouse();
    let mut s = settings(ch, "idle");
    s.statsd.tcp_idle_timeout = "300ms".into();
    s.proto.idle_timeout = "300ms".into();
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let addrs = [
        running.tcp_addr.expect("tcp"),
        running.proto_tcp_addr.expect("proto tcp"),
    ];
    tokio::task::spawn_blocking(move || {
        for addr in addrs {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let mut rest = Vec::new();
            assert_eq!(c.read_to_end(&mut rest).expect("closed by tallyd"), 0);
        }
    })
    .await
    .expect("client");
    assert_eq!(
        running
            .telemetry
            .connections_idle_closed
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    running.shutdown().await;
}

/// Past `net.core.rmem_max`: with CAP_NET_ADMIN (the test command runs as
/// root) tallyd gets the buffer configured, as systemd's socket unit does;
/// without it, the kernel's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_privileged_tallyd_gets_the_udp_buffer_configured_past_the_kernels_cap() {
    let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .expect("rmem_max")
        .trim()
        .parse()
        .expect("a number");
    let wanted = cap * 2;
    // Whether this process may force a buffer (CAP_NET_ADMIN in the initial
    // namespace, which uid 0 in a container may lack): ask on a probe.
    let probe =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    let privileged =
        rustix::net::sockopt::set_socket_recv_buffer_size_force(&probe, wanted).is_ok();
    let ch = clickhouse();
    let mut s = settings(ch, "rcvbuf_force");
    s.statsd.udp_recv_buffer = format!("{wanted}B");
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    let metrics = tokio::task::spawn_blocking(move || common::http(admin, "GET", "/metrics", ""))
        .await
        .expect("get")
        .expect("metrics");
    // SO_RCVBUF reads back twice the bytes granted.
    let granted = if privileged { wanted } else { cap };
    assert!(
        metrics.contains(&format!(
            "tallyd_udp_receive_buffer_bytes {}\n",
            2 * granted
        )),
        "{metrics}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_udp_receive_buffer_the_kernel_gave() {
    let ch = clickhouse();
    let mut s = settings(ch, "rcvbuf");
    s.statsd.udp_recv_buffer = "64KiB".into();
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let admin = running.admin_addr.expect("admin").port();
    // What the kernel gives a socket asking for the same buffer.
    let probe =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    probe.set_recv_buffer_size(64 * 1024).expect("set");
    let want = probe.recv_buffer_size().expect("get");
    assert!(want >= 64 * 1024, "{want}");
    let metrics = tokio::task::spawn_blocking(move || common::http(admin, "GET", "/metrics", ""))
        .await
        .expect("get")
        .expect("metrics");
    assert!(
        metrics.contains(&format!("tallyd_udp_receive_buffer_bytes {want}\n")),
        "{metrics}"
    );
    running.shutdown().await;
}
