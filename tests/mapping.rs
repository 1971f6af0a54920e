//! Mapping rules and tag dialects end to end: lines in, rows in ClickHouse
//! under the names and tags the rules make, merged where keys meet, exact
//! with and without FINAL.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::{clickhouse, config, send_tcp, settings, wait_for_lines};
use tallyd::config::Settings;

const RULES: &str = r#"
[statsd]
tag_dialects = ["influxdb"]

[[mapping]]
match = "debug.*"
drop = true

[[mapping]]
match = "app.*.requests"
name = "app.requests"
tags = { service = "$1" }

[[mapping]]
regex = 'jobs\.(?P<queue>[a-z]+)\.done'
name = "jobs.done"
drop_tags = ["request_id"]
tags = { queue = "${queue}", team = "ops" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_capture_drop_and_add_tags_and_keys_that_meet_merge_into_one_row() {
    let ch = clickhouse();
    let base = settings(ch, "mapping");
    let rules = Settings::from_toml(RULES, "rules").expect("rules parse");
    let s = Settings {
        mapping: rules.mapping,
        statsd: tallyd::config::StatsdSettings {
            tag_dialects: rules.statsd.tag_dialects,
            ..base.statsd.clone()
        },
        ..base
    };
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let tcp = running.tcp_addr.expect("tcp");
    let lines = [
        "app.checkout.requests:1|c",
        "app.checkout.requests:1|c",
        "app.cart.requests:2|c",
        // Sent under the name and tags the rule makes: the same key.
        "app.requests:5|c|#service:checkout",
        // InfluxDB tags: the same key once more.
        "app.requests,service=checkout:10|c",
        "debug.cache.misses:1|c",
        "debug.cache.misses:7|c|#a:b",
        "jobs.mail.done:1|c|#team:dev,request_id:9",
        "jobs.mail.done:2|c|#request_id:10",
        "jobs.mail.done:40|ms",
        "other:1|c",
    ];
    send_tcp(tcp, &(lines.join("\n") + "\n"));
    wait_for_lines(&running.telemetry, lines.len() as u64);
    assert_eq!(running.telemetry.dropped_mapping.load(Relaxed), 2);
    running.shutdown().await;

    let rows = |sql: &str| ch.query(sql).trim().to_owned();
    for final_ in ["FINAL", ""] {
        assert_eq!(
            rows(&format!(
                "SELECT name, arrayStringConcat(arraySort(tags), ','), value, samples \
                 FROM mapping.counters {final_} ORDER BY name, value FORMAT TSV"
            )),
            [
                "app.requests\tservice:cart\t2\t1",
                "app.requests\tservice:checkout\t17\t4",
                "jobs.done\tqueue:mail,team:ops\t3\t2",
                "other\t\t1\t1",
            ]
            .join("\n"),
            "one row per key ({final_:?})"
        );
    }
    assert_eq!(
        rows(
            "SELECT name, arrayStringConcat(arraySort(tags), ','), count FROM mapping.timers FORMAT TSV"
        ),
        "jobs.done\tqueue:mail,team:ops\t1"
    );
}
