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

mod crash {
    //! A reload that changes the rules, then kill -9 and a replay.

    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    use super::common::{clickhouse, free_port, http, send_tcp, temp_dir, wait_for};

    const A: &str =
        "[[mapping]]\nmatch = \"app.*.hits\"\nname = \"app.hits\"\ntags = { svc = \"$1\" }\n";
    const B: &str = "[[mapping]]\nmatch = \"app.*.hits\"\nname = \"svc.${1}.hits\"\n";

    fn write_config(path: &Path, url: &str, rules: &str) {
        let text = format!(
            "log_level = \"info\"\n[aggregate]\nflush_interval = \"1h\"\nmax_depth = 100000000\n[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nurl = \"{url}\"\ndatabase = \"mapping_crash\"\nretry_max = \"200ms\"\n{rules}"
        );
        std::fs::write(path, text).expect("write config");
    }

    fn spawn(file: &Path, data: &Path, tcp: u16, admin: u16) -> Child {
        let child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .env("TALLYD_OTLP_HTTP", "off")
            .env("TALLYD_OTLP_GRPC", "off")
            .arg("run")
            .arg("--config")
            .arg(file)
            .arg("--data-dir")
            .arg(data)
            .args([
                "--statsd-udp",
                "off",
                "--statsd-tcp",
                &format!("127.0.0.1:{tcp}"),
            ])
            .args(["--proto-tcp", "off", "--proto-udp", "off"])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        assert!(wait_for(20, || http(admin, "GET", "/health", "")
            .as_deref()
            == Some("ok\n")));
        child
    }

    fn signal(child: &Child, signal: &str) {
        let pid = child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status();
        assert!(sent.expect("kill").success());
    }

    fn samples(admin: u16) -> u64 {
        http(admin, "GET", "/metrics", "")
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("tallyd_samples_total "))?;
                line.split(' ').nth(1)?.parse().ok()
            })
            .unwrap_or(0)
    }

    #[test]
    fn an_interval_replayed_after_a_reload_and_kill_9_keeps_the_rules_it_was_received_under() {
        let ch = clickhouse();
        let dir = temp_dir("mapping-crash");
        let (file, data) = (dir.join("tallyd.toml"), dir.join("data"));
        let (tcp, admin) = (free_port(), free_port());
        write_config(&file, &ch.url(), A);
        let mut child = spawn(&file, &data, tcp, admin);
        let addr = format!("127.0.0.1:{tcp}").parse().expect("addr");
        send_tcp(addr, &"app.web.hits:1|c\n".repeat(30));
        assert!(wait_for(10, || samples(admin) == 30));
        // Rules B from the next interval: this one (1 h long) keeps A.
        write_config(&file, &ch.url(), B);
        signal(&child, "-HUP");
        let keying = data.join("keying");
        let files = || std::fs::read_dir(&keying).map_or(0, |d| d.count());
        assert!(
            wait_for(10, || files() == 2),
            "the reload did not record rules B"
        );
        send_tcp(addr, &"app.web.hits:1|c\n".repeat(12));
        assert!(wait_for(10, || samples(admin) == 42));
        child.kill().expect("kill -9");
        child.wait().expect("wait");

        // The file says B now; the replayed interval was received under A.
        let mut child = spawn(&file, &data, tcp, admin);
        send_tcp(addr, &"app.web.hits:1|c\n".repeat(5));
        assert!(wait_for(10, || samples(admin) == 5));
        signal(&child, "-TERM");
        assert_eq!(child.wait().expect("wait").code(), Some(0));
        for final_ in ["FINAL", ""] {
            assert_eq!(
                ch.query(&format!(
                    "SELECT name, arrayStringConcat(tags, ','), sum(value) FROM mapping_crash.counters \
                     {final_} GROUP BY name, tags ORDER BY name FORMAT TSV"
                )),
                "app.hits\tsvc:web\t42\nsvc.web.hits\t\t5\n",
                "counted once, each under the rules it was received under ({final_:?})"
            );
        }
    }
}
