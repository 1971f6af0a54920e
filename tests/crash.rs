//! Crash tests: the built binary is killed (kill -9, or an abort at a named
//! failpoint) again and again on one data dir, with and without ClickHouse,
//! and the totals in ClickHouse must still be exact under FINAL: nothing that
//! tallyd received is lost, nothing is counted twice.

mod common;

use std::net::UdpSocket;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use common::{clickhouse, free_port, http, proto_batch, send_tcp, temp_dir, wait_for};

struct Daemon {
    child: Child,
    admin: u16,
}

/// A failed test must not leave a daemon behind (it would hold the test
/// harness's output open).
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One crash test at a time: one of them stops the shared ClickHouse.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Ports {
    udp: u16,
    tcp: u16,
    admin: u16,
    proto: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            udp: free_port(),
            tcp: free_port(),
            admin: free_port(),
            proto: free_port(),
        }
    }
}

/// The test config; a test may leave `[aggregate]` keys for the next start
/// in `<dir>/aggregate.toml` (`flush_interval` among them, 200 ms if not),
/// and whole sections in `<dir>/extra.toml`.
fn config_file(dir: &Path) -> PathBuf {
    let file = dir.join("tallyd.toml");
    let aggregate = std::fs::read_to_string(dir.join("aggregate.toml")).unwrap_or_default();
    let extra = std::fs::read_to_string(dir.join("extra.toml")).unwrap_or_default();
    let interval = if aggregate.contains("flush_interval") {
        ""
    } else {
        "flush_interval = \"200ms\"\n"
    };
    std::fs::write(
        &file,
        format!("[aggregate]\n{interval}{aggregate}[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nretry_max = \"300ms\"\ntimeout = \"2s\"\n{RETAIN}{extra}"),
    )
    .expect("write config");
    file
}

/// Rows of any age are kept: some tests write intervals of 2023.
const RETAIN: &str = "[retention]\nraw = \"36500d\"\nminute = \"36500d\"\nhour = \"36500d\"\n";

/// Starts tallyd without waiting for it to be ready.
fn spawn(dir: &Path, ports: &Ports, failpoints: &str, extra: &[&str]) -> Daemon {
    let ch = clickhouse();
    let database = if extra.contains(&"--clickhouse-database") {
        &[][..]
    } else {
        &["--clickhouse-database", "crash"][..]
    };
    let host = if extra.contains(&"--host-id") {
        &[][..]
    } else {
        &["--host-id", "crash-host"][..]
    };
    let child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .arg("run")
        .args(host)
        .args(database)
        .args(["--clickhouse-url", &ch.url()])
        .arg("--config")
        .arg(config_file(dir))
        .arg("--data-dir")
        .arg(dir)
        .args(["--statsd-udp", &format!("127.0.0.1:{}", ports.udp)])
        .args(["--statsd-tcp", &format!("127.0.0.1:{}", ports.tcp)])
        .args(["--admin", &format!("127.0.0.1:{}", ports.admin)])
        .args([
            "--proto-tcp",
            &format!("127.0.0.1:{}", ports.proto),
            "--proto-udp",
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
    Daemon {
        child,
        admin: ports.admin,
    }
}

fn start(dir: &Path, ports: &Ports, failpoints: &str, extra: &[&str]) -> Daemon {
    let mut d = spawn(dir, ports, failpoints, extra);
    let healthy = wait_for(20, || {
        http(d.admin, "GET", "/health", "").as_deref() == Some("ok\n")
    });
    assert!(
        healthy,
        "tallyd did not become healthy: /health {:?}, exited {:?} (TALLYD_TEST_STDERR=1 shows its log)",
        http(d.admin, "GET", "/health", ""),
        d.exited()
    );
    d
}

impl Daemon {
    /// A counter of this process's /metrics, summed over labels.
    fn metric(&self, name: &str) -> u64 {
        http(self.admin, "GET", "/metrics", "")
            .map(|m| {
                m.lines()
                    .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn wait_received(&self, lines: u64) {
        assert!(
            wait_for(20, || self.metric("tallyd_received_lines_total") >= lines),
            "tallyd received {} of {lines} lines",
            self.metric("tallyd_received_lines_total")
        );
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn term(self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(term.success());
        assert_eq!(self.wait_exit(), Some(0));
    }

    fn wait_exit(mut self) -> Option<i32> {
        self.child.wait().expect("wait").code()
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGHUP: the config file is read again.
    fn reload(&self) {
        let hup = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(hup.success());
    }

    /// Waits (20 s at most) for the process to abort at `failpoint` on its
    /// own, as a normal tick or drain reaches it.
    fn wait_for_failpoint(mut self, failpoint: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.exited() {
                assert_eq!(status.signal(), Some(6), "{failpoint}: not its abort");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{failpoint} was not reached within 20 s");
    }

    /// SIGTERM, expecting the final flush to hit a failpoint and abort.
    fn term_into_failpoint(self, failpoint: &str) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(term.success());
        assert_ne!(
            self.wait_exit(),
            Some(0),
            "{failpoint} did not abort tallyd"
        );
    }
}

/// What the test sent and expects to find.
#[derive(Default)]
struct Expected {
    counter: f64,
    samples: u64,
}

/// Sends a known burst over UDP (paced) and TCP; returns the lines sent.
fn burst(ports: &Ports, round: u32, exp: &mut Expected) -> u64 {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in 0..100 {
        let datagram: String = (0..10).map(|_| "crash.c:1|c\n").collect();
        sock.send_to(datagram.as_bytes(), ("127.0.0.1", ports.udp))
            .expect("send");
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let tcp: String = (0..500)
        .map(|_| "crash.c:2|c\ncrash.t:5|ms\n")
        .collect::<String>()
        + &format!("crash.g:{round}|g\n");
    send_tcp(
        format!("127.0.0.1:{}", ports.tcp).parse().expect("addr"),
        &tcp,
    );
    exp.counter += 1000.0 + 1000.0;
    exp.samples += 1000 + 500;
    1000 + 1000 + 1
}

/// Starts tallyd and stops it cleanly: it replays and flushes whatever the
/// WAL holds, so the next start has nothing to replay.
fn clean_cycle(dir: &Path, ports: &Ports) {
    let d = start(dir, ports, "", &[]);
    d.term();
}

/// Sends unique keys (`noise.N:1|c`) until stopped, to crash tallyd while it
/// is ingesting. Their totals are unknown, but none may ever exceed 1.
fn noise(port: u16, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        while !stop.load(Relaxed) {
            let n = sent.fetch_add(1, Relaxed);
            let _ = sock.send_to(format!("noise.{n}:1|c").as_bytes(), ("127.0.0.1", port));
            std::thread::sleep(Duration::from_micros(200));
        }
    })
}

fn random_ms(seed: &mut u64, max: u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed % max
}

#[test]
fn kill_9_and_crashes_lose_nothing_and_count_nothing_twice() {
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("crash");
    let ports = Ports::new();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("crash test seed {seed}");
    let mut exp = Expected::default();
    let noise_sent = Arc::new(AtomicU64::new(0));
    let mut round = 0;

    // 1-3: kill -9 at random moments after a burst (before, during or after
    // the flushes of a 200 ms interval), while noise is still arriving.
    for _ in 0..3 {
        round += 1;
        let d = start(&dir, &ports, "", &[]);
        let lines = burst(&ports, round, &mut exp);
        d.wait_received(lines);
        let stop = Arc::new(AtomicBool::new(false));
        let noise = noise(ports.udp, Arc::clone(&stop), Arc::clone(&noise_sent));
        std::thread::sleep(Duration::from_millis(random_ms(&mut seed, 600)));
        d.kill9();
        stop.store(true, Relaxed);
        noise.join().expect("noise");
    }

    // 4 and 5: abort at a failpoint in the final flush (a 1 h interval keeps
    // the burst in one interval): right after the insert, before its
    // checkpoint; right after the flush intent, before the insert.
    for failpoint in ["after_insert", "after_intent"] {
        clean_cycle(&dir, &ports);
        round += 1;
        let d = start(&dir, &ports, failpoint, &["--flush-interval", "1h"]);
        let lines = burst(&ports, round, &mut exp);
        d.wait_received(lines);
        let term = Command::new("kill")
            .args(["-TERM", &d.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(term.success());
        assert_ne!(d.wait_exit(), Some(0), "{failpoint} did not abort tallyd");
    }

    // 6: ClickHouse goes down; tallyd is killed while it cannot flush, comes
    // back while ClickHouse is still down, then ClickHouse returns.
    round += 1;
    let d = start(&dir, &ports, "", &[]);
    let lines = burst(&ports, round, &mut exp);
    d.wait_received(lines);
    ch.stop();
    std::thread::sleep(Duration::from_millis(500));
    d.kill9();
    round += 1;
    let d = start(&dir, &ports, "", &[]);
    let lines = burst(&ports, round, &mut exp);
    d.wait_received(lines);
    assert!(ch.start(), "ClickHouse restarts on its port");

    // The end: a clean stop flushes the rest.
    d.term();

    assert_eq!(
        ch.query("SELECT sum(value), sum(samples) FROM crash.counters FINAL WHERE name = 'crash.c' FORMAT TSV"),
        format!("{}\t{}\n", exp.counter, exp.samples),
        "seed {seed}"
    );
    assert_eq!(
        ch.query(
            "SELECT sum(count), sum(sum) FROM crash.timers FINAL WHERE name = 'crash.t' FORMAT TSV"
        ),
        format!("{}\t{}\n", 500 * round, 2500 * round),
        "seed {seed}"
    );
    assert_eq!(
        ch.number("SELECT argMax(value, version) FROM crash.gauges FINAL WHERE name = 'crash.g'"),
        f64::from(round),
        "seed {seed}"
    );
    let doubled = ch.number("SELECT count() FROM (SELECT name, sum(value) AS s FROM crash.counters FINAL WHERE name LIKE 'noise.%' GROUP BY name) WHERE s != 1");
    assert_eq!(doubled, 0.0, "a noise key was counted twice (seed {seed})");
    let noise_stored =
        ch.number("SELECT uniqExact(name) FROM crash.counters FINAL WHERE name LIKE 'noise.%'");
    assert!(noise_stored > 0.0 && noise_stored <= noise_sent.load(Relaxed) as f64);
}

#[test]
fn wal_verify_passes_a_clean_log_and_fails_a_corrupt_one() {
    let _serial = serial();
    let dir = temp_dir("verify");
    let ports = Ports::new();
    let d = start(&dir, &ports, "", &["--flush-interval", "1h"]);
    let lines = burst(&ports, 1, &mut Expected::default());
    d.wait_received(lines);
    d.kill9();
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .env("TALLYD_OTLP_HTTP", "off")
            .env("TALLYD_OTLP_GRPC", "off")
            .args(["wal", "verify", "--data-dir"])
            .arg(&dir)
            .output()
            .expect("run")
    };
    let out = verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("no corruption found"), "{text}");
    // Flip a bit in the first record of a segment holding part of the UDP
    // burst (100 datagrams, one record each, spread over the UDP workers'
    // streams), so that valid records follow it.
    let records = |l: &str| -> u64 {
        l.split(": ")
            .find_map(|part| part.split_once(" records"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    };
    let line = text
        .lines()
        .find(|l| records(l) >= 2)
        .expect("a UDP segment with records");
    let seg = PathBuf::from(line.split(": stream").next().expect("path"));
    let mut bytes = std::fs::read(&seg).expect("read");
    bytes[32 + 24] ^= 0x01;
    std::fs::write(&seg, bytes).expect("write");
    let out = verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("corrupt record at offset 32"), "{text}");
}

#[test]
fn an_acknowledged_batch_survives_kill_9_before_its_flush() {
    let _serial = serial();
    use tallyd::client::ProtoClient;
    use tallyd::protocol::proto::pb::ack::Status;
    use tallyd::protocol::proto::pb::event::Value;
    use tallyd::protocol::proto::{Batch, Event};
    let ch = clickhouse();
    let dir = temp_dir("acked");
    let ports = Ports::new();
    let proto: std::net::SocketAddr = format!("127.0.0.1:{}", ports.proto).parse().expect("addr");
    let batch = Batch {
        client_id: "acked".into(),
        sequence: 1,
        events: (0..1000)
            .map(|_| Event {
                name: "acked.c".into(),
                tags: vec![],
                value: Some(Value::Counter(3.0)),
                sample_rate: 0.0,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    // A 1 h interval: the acked batch is only in the WAL when tallyd dies.
    let d = start(
        &dir,
        &ports,
        "",
        &["--flush-interval", "1h", "--clickhouse-database", "acked"],
    );
    let ack = ProtoClient::new(proto).send(&batch).expect("ack");
    assert_eq!(ack.status, Status::Ok as i32);
    d.kill9();

    let d = start(&dir, &ports, "", &["--clickhouse-database", "acked"]);
    let again = ProtoClient::new(proto).send(&batch).expect("ack");
    assert_eq!(
        again.status,
        Status::Duplicate as i32,
        "the dedup state came back from the WAL"
    );
    d.term();
    assert_eq!(
        ch.number("SELECT sum(value) FROM acked.counters FINAL WHERE name = 'acked.c'"),
        3000.0
    );
}

/// A generation rebuilt from the WAL after kill -9 gets the interval start
/// it had live (its WAL start record), not the time of the replay.
#[test]
fn a_replayed_interval_has_its_live_ts() {
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("replay-ts");
    let ports = Ports::new();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let before = now();
    // A 1 h interval: the lines are only in the WAL when tallyd dies.
    let d = start(
        &dir,
        &ports,
        "",
        &[
            "--flush-interval",
            "1h",
            "--clickhouse-database",
            "replay_ts",
        ],
    );
    let tcp: std::net::SocketAddr = format!("127.0.0.1:{}", ports.tcp).parse().expect("addr");
    send_tcp(tcp, &"ts.c:1|c\n".repeat(10));
    d.wait_received(10);
    let killed = now();
    d.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let d = start(&dir, &ports, "", &["--clickhouse-database", "replay_ts"]);
    d.term();
    let row = ch.query("SELECT toUInt32(ts), sum(value) FROM replay_ts.counters FINAL WHERE name = 'ts.c' GROUP BY ts FORMAT TSV");
    let (ts, value) = row.trim().split_once('\t').expect("one row");
    assert_eq!(value, "10");
    let ts: u64 = ts.parse().expect("ts");
    assert!(
        (before..=killed).contains(&ts),
        "ts {ts} is not the live interval's start (between {before} and {killed})"
    );
}

#[test]
fn recreated_container_new_hostname_no_double_count() {
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("hostname");
    let ports = Ports::new();
    let db = [
        "--clickhouse-database",
        "hostname",
        "--flush-interval",
        "1h",
    ];
    // The pod's first life: its flush lands, then it dies before completing.
    let d = start(
        &dir,
        &ports,
        "after_insert",
        &[&db[..], &["--host-id", "pod-a"]].concat(),
    );
    let lines: String = (0..1000).map(|_| "host.c:1|c\n").collect();
    send_tcp(
        format!("127.0.0.1:{}", ports.tcp).parse().expect("addr"),
        &lines,
    );
    d.wait_received(1000);
    d.term_into_failpoint("after_insert");
    // Recreated on the same volume under a new hostname.
    let d = start(
        &dir,
        &ports,
        "",
        &[&db[..], &["--host-id", "pod-b"]].concat(),
    );
    d.term();
    assert_eq!(
        ch.query("SELECT sum(value), groupUniqArray(host) FROM hostname.counters FINAL WHERE name = 'host.c' FORMAT TSV"),
        "1000\t['pod-a']\n"
    );
}

#[test]
fn replayed_flush_is_byte_identical() {
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("identical");
    let ports = Ports::new();
    let db = ["--clickhouse-database", "identical"];
    let tcp: std::net::SocketAddr = format!("127.0.0.1:{}", ports.tcp).parse().expect("addr");
    // A gauge is set and flushed, then tallyd stops cleanly.
    let d = start(&dir, &ports, "", &db);
    send_tcp(tcp, "id.g:10|g\n");
    assert!(wait_for(10, || ch
        .try_query("SELECT count() FROM identical.gauges WHERE name = 'id.g'")
        .as_deref()
        == Some("1\n")));
    d.term();
    // After a restart, a delta lands, and tallyd dies before completing.
    let d = start(
        &dir,
        &ports,
        "after_insert",
        &[&db[..], &["--flush-interval", "1h"]].concat(),
    );
    send_tcp(
        tcp,
        "id.g:+5|g\nid.c:3|c\n_e{4,2}:boom|hi|t:error\n_sc|id.sc|1|m:slow\n",
    );
    d.wait_received(4);
    d.term_into_failpoint("after_insert");
    // The next start re-sends the flush from the spool.
    let d = start(&dir, &ports, "", &db);
    d.term();
    // Both sends of the flush are in the table (no FINAL), row for row the
    // same; on 22.2+ the deduplication token drops the second at insert.
    let copies = if common::modern() { "1\t1\n" } else { "2\t1\n" };
    assert_eq!(
        ch.query("SELECT count(), uniqExact(ts, name, tags, host, value, version, samples) FROM identical.gauges WHERE name = 'id.g' AND version = (SELECT max(version) FROM identical.gauges WHERE name = 'id.g') FORMAT TSV"),
        copies
    );
    assert_eq!(
        ch.query("SELECT count(), uniqExact(ts, name, tags, host, flush_id, value, samples) FROM identical.counters WHERE name = 'id.c' FORMAT TSV"),
        copies
    );
    for sql in [
        "SELECT value FROM identical.gauges FINAL WHERE name = 'id.g' ORDER BY version DESC LIMIT 1",
        "SELECT argMax(value, version) FROM identical.gauges WHERE name = 'id.g'",
        "SELECT argMax(value, version) FROM identical.gauges FINAL WHERE name = 'id.g'",
    ] {
        assert_eq!(ch.number(sql), 15.0, "{sql}");
    }
    assert_eq!(
        ch.number("SELECT sum(value) FROM identical.counters FINAL WHERE name = 'id.c'"),
        3.0
    );
    // Events and service checks: the same identical copies, one row under
    // FINAL.
    assert_eq!(
        ch.query("SELECT count(), uniqExact(ts, host, flush_id, seq, event_ts, title, text, alert_type) FROM identical.events FORMAT TSV"),
        copies
    );
    assert_eq!(
        ch.query("SELECT count(), uniqExact(ts, host, flush_id, seq, name, status, message) FROM identical.service_checks FORMAT TSV"),
        copies
    );
    assert_eq!(
        ch.query("SELECT (SELECT count() FROM identical.events FINAL), (SELECT count() FROM identical.service_checks FINAL) FORMAT TSV"),
        "1\t1\n"
    );
}

/// Where a crash life meets its failpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    /// The final flush of a SIGTERM.
    Shutdown,
    /// A normal tick: a reload cuts the interval from 1 h to 200 ms.
    Tick,
}

/// Failpoints a flush of a running tallyd with ClickHouse up reaches, at a
/// tick or at shutdown (a merge or a join needs a spool over its budget, a
/// drain: see `the_spool_failpoints_over_budget_and_in_a_drain`; a cut,
/// replicated ingest: tests/replication.rs).
fn flush_failpoints() -> Vec<&'static str> {
    tallyd::failpoint::ALL
        .into_iter()
        .filter(|f| {
            !matches!(
                *f,
                "after_merge_write"
                    | "after_join_write"
                    | "after_rollup_table"
                    | "after_rollup"
                    | "after_cut"
                    | "after_cut_insert"
            )
        })
        .collect()
}

#[test]
fn every_failpoint_in_turn_under_mixed_udp_and_proto_traffic() {
    let _serial = serial();
    use tallyd::client::ProtoClient;
    use tallyd::protocol::proto::pb::ack::Status;
    let ch = clickhouse();
    let dir = temp_dir("failpoints");
    let ports = Ports::new();
    // The interval comes from the config file, so that a reload can cut it.
    let db = ["--clickhouse-database", "failpoints"];
    let long = "flush_interval = \"1h\"\n";
    std::fs::write(dir.join("aggregate.toml"), long).expect("aggregate.toml");
    let proto: std::net::SocketAddr = format!("127.0.0.1:{}", ports.proto).parse().expect("addr");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("failpoint test seed {seed}");
    let mut order = flush_failpoints();
    for i in (1..order.len()).rev() {
        order.swap(i, random_ms(&mut seed, i as u64 + 1) as usize);
    }
    let lives: Vec<(&str, When)> = order
        .iter()
        .map(|f| (*f, When::Shutdown))
        .chain(order.iter().map(|f| (*f, When::Tick)))
        .collect();
    let mut exp = Expected::default();
    let noise_sent = Arc::new(AtomicU64::new(0));
    let mut previous: Vec<tallyd::protocol::proto::Batch> = Vec::new();
    let mut round = 0u32;
    for (failpoint, when) in lives {
        round += 1;
        // A clean life replays what the crash left (a failpoint would fire
        // in the replay itself); the last life's batches are duplicates.
        std::fs::write(dir.join("aggregate.toml"), long).expect("aggregate.toml");
        let d = start(&dir, &ports, "", &db);
        let mut client = ProtoClient::new(proto);
        for b in &previous {
            let ack = client.send(b).expect("ack");
            assert_eq!(
                ack.status,
                Status::Duplicate as i32,
                "{failpoint} {when:?} round {round}"
            );
        }
        d.term();
        let d = start(&dir, &ports, failpoint, &db);
        let mut client = ProtoClient::new(proto);
        let batches: Vec<_> = (0..5)
            .map(|i| proto_batch("mixed", u64::from(round) * 10 + i, "mixed.c", 100, 1.0))
            .collect();
        // Out of order, as a pipelining client may deliver them.
        for i in [3usize, 0, 4, 1, 2] {
            let ack = client.send(&batches[i]).expect("ack");
            assert_eq!(ack.status, Status::Ok as i32);
        }
        let lines = burst(&ports, round, &mut exp);
        d.wait_received(lines + 500);
        let stop = Arc::new(AtomicBool::new(false));
        let noise = noise(ports.udp, Arc::clone(&stop), Arc::clone(&noise_sent));
        std::thread::sleep(Duration::from_millis(random_ms(&mut seed, 200)));
        match when {
            When::Shutdown => d.term_into_failpoint(failpoint),
            When::Tick => {
                std::fs::write(dir.join("aggregate.toml"), "flush_interval = \"200ms\"\n")
                    .expect("aggregate.toml");
                config_file(&dir);
                d.reload();
                d.wait_for_failpoint(failpoint);
            }
        }
        stop.store(true, Relaxed);
        noise.join().expect("noise");
        previous = batches;
    }
    std::fs::write(dir.join("aggregate.toml"), long).expect("aggregate.toml");
    let d = start(&dir, &ports, "", &db);
    d.term();
    for fin in ["", "FINAL"] {
        // Without FINAL a re-sent flush may still be there twice on 18.16
        // (no insert token): only the collapsed totals are exact there.
        if fin.is_empty() && !common::modern() {
            continue;
        }
        assert_eq!(
            ch.query(&format!("SELECT sum(value), sum(samples) FROM failpoints.counters {fin} WHERE name = 'crash.c' FORMAT TSV")),
            format!("{}\t{}\n", exp.counter, exp.samples),
            "seed {seed} {fin}"
        );
        assert_eq!(
            ch.number(&format!(
                "SELECT sum(value) FROM failpoints.counters {fin} WHERE name = 'mixed.c'"
            )),
            500.0 * f64::from(round),
            "seed {seed} {fin}"
        );
    }
    assert_eq!(
        ch.number(
            "SELECT argMax(value, version) FROM failpoints.gauges FINAL WHERE name = 'crash.g'"
        ),
        f64::from(round),
        "seed {seed}"
    );
    let doubled = ch.number("SELECT count() FROM (SELECT name, sum(value) AS s FROM failpoints.counters FINAL WHERE name LIKE 'noise.%' GROUP BY name) WHERE s != 1");
    assert_eq!(doubled, 0.0, "a noise key was counted twice (seed {seed})");
}

/// The spool's own durable writes: a merge over `spool.max_size` while
/// ClickHouse is down, and a drain's join once it is back, each cut by a
/// crash right after its new file is written; then every acknowledged
/// batch is counted once.
#[test]
fn the_spool_failpoints_over_budget_and_in_a_drain() {
    let _serial = serial();
    use tallyd::client::ProtoClient;
    use tallyd::protocol::proto::pb::ack::Status;
    let ch = clickhouse();
    let dir = temp_dir("spool-failpoints");
    let ports = Ports::new();
    let db = ["--clickhouse-database", "spoolfp"];
    // A queue of one and a spool budget of one byte: with ClickHouse down,
    // the third flush is parked, and the interval after it, kept open for
    // 2 s (`spool.coarsen`), is merged into it.
    std::fs::write(dir.join("aggregate.toml"), "flush_queue = 1\n").expect("aggregate.toml");
    std::fs::write(
        dir.join("extra.toml"),
        "[spool]\nmax_size = \"1B\"\ncoarsen = \"2s\"\n",
    )
    .expect("extra.toml");
    let proto: std::net::SocketAddr = format!("127.0.0.1:{}", ports.proto).parse().expect("addr");
    let mut sequence = 0u64;
    let mut unacked: Vec<tallyd::protocol::proto::Batch> = Vec::new();
    // Sends one batch a tick or so until the process aborts at `failpoint`;
    // a batch without its ack is kept for the next life (a client retry).
    let mut life = |failpoint: &str, unacked: &mut Vec<tallyd::protocol::proto::Batch>| {
        // Not waiting for readiness: a drain may reach its failpoint first.
        let mut d = spawn(&dir, &ports, failpoint, &db);
        let mut client = ProtoClient::new(proto);
        let retries = std::mem::take(unacked);
        for b in retries {
            match client.send(&b) {
                Ok(ack) => assert!(
                    ack.status == Status::Ok as i32 || ack.status == Status::Duplicate as i32
                ),
                Err(_) => unacked.push(b),
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = d.exited() {
                assert_eq!(status.signal(), Some(6), "{failpoint}: not its abort");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{failpoint} not reached"
            );
            sequence += 1;
            let b = proto_batch("spooler", sequence, "spool.c", 100, 1.0);
            match client.send(&b) {
                Ok(ack) if ack.status == Status::Ok as i32 => {}
                _ => {
                    unacked.push(b);
                    client = ProtoClient::new(proto);
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        drop(d);
    };
    tallyd_down(|| life("after_merge_write", &mut unacked));
    life("after_join_write", &mut unacked);
    let d = start(&dir, &ports, "", &db);
    let mut client = ProtoClient::new(proto);
    for b in std::mem::take(&mut unacked) {
        let ack = client.send(&b).expect("ack");
        assert!(ack.status == Status::Ok as i32 || ack.status == Status::Duplicate as i32);
    }
    d.term();
    for fin in ["", "FINAL"] {
        if fin.is_empty() && !common::modern() {
            continue;
        }
        assert_eq!(
            ch.number(&format!(
                "SELECT sum(value) FROM spoolfp.counters {fin} WHERE name = 'spool.c'"
            )),
            100.0 * sequence as f64,
            "{fin}"
        );
    }
}

/// Runs `f` with this binary's ClickHouse stopped.
fn tallyd_down(f: impl FnOnce()) {
    clickhouse().stop();
    f();
    assert!(clickhouse().start(), "ClickHouse restarts on its port");
}

/// A data dir as the release before the outbox left it (instance file
/// version 1, a `gauges` snapshot file, dedup version 1, spool files
/// version 2, one of them sent): read, its sent flush re-sent under the
/// token it was sent with, its unsent one sent, delta gauges resolved
/// against its saved value, its protobuf client remembered.
#[test]
fn a_data_dir_of_the_release_before_the_outbox_is_replayed() {
    use tallyd::client::ProtoClient;
    use tallyd::outbox::flush::Flush;
    use tallyd::outbox::rows::{Batch, CounterRow};
    use tallyd::protocol::proto::pb::ack::Status;
    use tallyd::protocol::statsd::MetricType;
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("upgrade-outbox");
    let ports = Ports::new();
    let db = ["--clickhouse-database", "upgrade2"];
    ch.query("CREATE DATABASE IF NOT EXISTS upgrade2");
    let window = common::modern().then_some(1000);
    for statement in tallyd::sink::schema::ddl("upgrade2", window, None, false) {
        ch.query(&statement);
    }
    let instance = 0x00c0_ffee_u64;
    // Flush ids of that release: ticks of 2^20 us, then the 20-bit tag.
    let old_id = |secs: u64| ((secs * 1_000_000) >> 20) << 20 | (instance & 0xf_ffff);
    let (sent_id, unsent_id) = (old_id(1_700_000_000), old_id(1_700_000_001));
    std::fs::write(
        dir.join("instance"),
        format!("tallyd-instance 1\n{instance:016x}\n{unsent_id}\n"),
    )
    .expect("instance");
    let key = tallyd::aggregate::key::KeyBuf::default()
        .build(MetricType::Gauge, b"up2.g", b"")
        .to_vec();
    std::fs::write(
        dir.join("gauges"),
        tallyd::outbox::gauges::encode(unsent_id, [(&key[..], 41.0)].into_iter()),
    )
    .expect("gauges");
    let bits = format!("{:016x}", 0b11111u64) + &"0".repeat(15 * 16);
    std::fs::write(
        dir.join("dedup"),
        format!("tallyd-dedup 1\n{} 5 {bits} 1700000000\n", "6f6c6432"),
    )
    .expect("dedup");
    // Spool files as version 2 wrote them.
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).expect("spool");
    let flush = |id: u64, generation: u64, value: f64| {
        let batch = Batch {
            generation,
            host: "crash-host".into(),
            flush_id: id,
            ts: 1_700_000_000,
            counters: vec![CounterRow {
                ts: 1_700_000_000,
                name: "up2.c".into(),
                tags: vec![],
                host: "crash-host".into(),
                flush_id: id,
                value,
                samples: 1,
            }],
            samples: 1,
            ..Batch::default()
        };
        let f = Flush::seal(batch, instance);
        let mut bytes = f.encode();
        // Version 4 with its intervals taken out is version 2's layout.
        let at = 56 + f.host.len();
        bytes.drain(at..at + 4 + 4 * f.intervals.len());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[16..]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(spool.join(format!("{id:020}.flush")), bytes).expect("spool file");
    };
    flush(sent_id, 1, 7.0);
    std::fs::write(spool.join(format!("{sent_id:020}.sent")), b"").expect("marker");
    flush(unsent_id, 2, 11.0);
    // The sent one landed, under that release's token.
    let token = format!("tallyd-{instance:016x}-{sent_id}-counters");
    let settings = if common::modern() {
        format!(" SETTINGS insert_deduplication_token = '{token}'")
    } else {
        String::new()
    };
    ch.query(&format!(
        "INSERT INTO upgrade2.counters{settings} VALUES (1700000000, 'up2.c', [], 'crash-host', {sent_id}, 7, 1)"
    ));

    let d = start(&dir, &ports, "", &db);
    send_tcp(
        format!("127.0.0.1:{}", ports.tcp).parse().expect("addr"),
        "up2.g:+1|g\n",
    );
    d.wait_received(1);
    let proto: std::net::SocketAddr = format!("127.0.0.1:{}", ports.proto).parse().expect("addr");
    let mut client = ProtoClient::new(proto);
    let statuses: Vec<i32> = [5u64, 6]
        .iter()
        .map(|&seq| {
            client
                .send(&proto_batch("old2", seq, "up2.p", 1, 1.0))
                .expect("ack")
                .status
        })
        .collect();
    assert_eq!(
        statuses,
        [Status::Duplicate as i32, Status::Ok as i32],
        "the dedup state of that release"
    );
    d.term();
    for fin in ["", "FINAL"] {
        if fin.is_empty() && !common::modern() {
            continue;
        }
        assert_eq!(
            ch.number(&format!(
                "SELECT sum(value) FROM upgrade2.counters {fin} WHERE name = 'up2.c'"
            )),
            18.0,
            "the sent flush once, the unsent one once ({fin})"
        );
    }
    assert_eq!(
        ch.number("SELECT argMax(value, version) FROM upgrade2.gauges WHERE name = 'up2.g'"),
        42.0,
        "a delta resolves against the saved value"
    );
    assert!(
        ch.number("SELECT min(flush_id) FROM upgrade2.counters WHERE name = 'up2.p'")
            > unsent_id as f64,
        "new flush ids are above that release's"
    );
    assert!(
        !dir.join("gauges").exists(),
        "the snapshot file goes once the log is written"
    );
    assert!(dir.join("gauges.log").exists());
}

#[test]
fn a_data_dir_of_the_previous_release_is_replayed() {
    use tallyd::client::ProtoClient;
    use tallyd::protocol::proto::pb::ack::Status;
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("upgrade");
    let ports = Ports::new();
    let db = ["--clickhouse-database", "upgrade", "--flush-interval", "1h"];
    // Unflushed records in the WAL (its format did not change).
    let d = start(&dir, &ports, "", &db);
    let lines: String = (0..100).map(|_| "up.c:2|c\n").collect();
    send_tcp(
        format!("127.0.0.1:{}", ports.tcp).parse().expect("addr"),
        &lines,
    );
    d.wait_received(100);
    d.kill9();
    // The rest as the previous release left it: no instance file and no
    // spool; a checkpoint (version 0) whose intent says generation 1 was
    // sent as flush 1700000000000000 and landed; the last flush id; the
    // dedup state (version 0: client "old" accepted up to sequence 5).
    for f in ["instance", "dedup", "gauges"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("spool"));
    std::fs::write(
        dir.join("wal/checkpoint"),
        "confirmed 0\nintent 1 1700000000000000 1700000000\n",
    )
    .expect("checkpoint");
    std::fs::write(dir.join("flush_id"), "1800000000000000\n").expect("flush_id");
    let seen = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    std::fs::write(dir.join("dedup"), format!("6f6c64 5 {seen}\n")).expect("dedup");
    ch.query("CREATE DATABASE IF NOT EXISTS upgrade");
    for statement in tallyd::sink::schema::ddl("upgrade", None, None, false) {
        ch.query(&statement);
    }
    ch.query("INSERT INTO upgrade.counters VALUES (1700000000, 'up.c', [], 'crash-host', 1700000000000000, 200, 100)");

    let d = start(&dir, &ports, "", &["--clickhouse-database", "upgrade"]);
    let proto: std::net::SocketAddr = format!("127.0.0.1:{}", ports.proto).parse().expect("addr");
    let mut client = ProtoClient::new(proto);
    let statuses: Vec<i32> = [5u64, 4, 6]
        .iter()
        .map(|&seq| {
            client
                .send(&proto_batch("old", seq, "after.c", 1, 1.0))
                .expect("ack")
                .status
        })
        .collect();
    assert_eq!(
        statuses,
        [
            Status::Duplicate as i32,
            Status::Duplicate as i32,
            Status::Ok as i32
        ]
    );
    d.term();
    assert_eq!(
        ch.query("SELECT sum(value), sum(samples) FROM upgrade.counters FINAL WHERE name = 'up.c' FORMAT TSV"),
        "200\t100\n",
        "the interval the previous release sent was re-sent under its flush id"
    );
    assert_eq!(
        ch.query("SELECT sum(value), min(flush_id) > 1800000000000000 FROM upgrade.counters FINAL WHERE name = 'after.c' FORMAT TSV"),
        "1\t1\n"
    );
}

#[test]
fn a_changed_core_count_replays_the_old_wal_streams() {
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("geometry");
    let ports = Ports::new();
    let db = ["--clickhouse-database", "geometry"];
    let d = start(
        &dir,
        &ports,
        "",
        &[&db[..], &["--flush-interval", "1h", "--udp-workers", "2"]].concat(),
    );
    let mut exp = Expected::default();
    let lines = burst(&ports, 1, &mut exp);
    d.wait_received(lines);
    d.kill9();
    // The container comes back with more cores: more UDP streams.
    let d = start(
        &dir,
        &ports,
        "",
        &[&db[..], &["--udp-workers", "5"]].concat(),
    );
    let lines = burst(&ports, 2, &mut exp);
    d.wait_received(lines);
    d.term();
    assert_eq!(
        ch.query("SELECT sum(value), sum(samples) FROM geometry.counters FINAL WHERE name = 'crash.c' FORMAT TSV"),
        format!("{}\t{}\n", exp.counter, exp.samples)
    );
    assert!(
        !std::fs::read_dir(dir.join("wal"))
            .expect("wal dir")
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("previous-"))),
        "the old streams were removed once drained"
    );
}

#[test]
fn replay_of_a_crafted_flood_stays_within_max_memory() {
    let _serial = serial();
    let ch = clickhouse();
    let dir = temp_dir("replaymem");
    let ports = Ports::new();
    let db = ["--clickhouse-database", "replaymem"];
    // 1,000 histogram keys built for the largest sketch (32 MiB unbounded;
    // 2.4 MB of lines, which the test's WAL holds), left in the WAL by a
    // kill -9.
    let d = start(
        &dir,
        &ports,
        "",
        &[&db[..], &["--flush-interval", "1h"]].concat(),
    );
    let flood = common::crafted_timer_flood(1000);
    send_tcp(
        format!("127.0.0.1:{}", ports.tcp).parse().expect("addr"),
        &flood,
    );
    d.wait_received(1000);
    d.kill9();
    // The replay goes through the same budget as live traffic.
    std::fs::write(dir.join("aggregate.toml"), "max_memory = \"4MiB\"\n").expect("write");
    let d = start(&dir, &ports, "", &db);
    let peak_kib = common::proc_status_kib(&d.child.id().to_string(), "VmHWM:");
    let dropped = d.metric("tallyd_dropped_total{reason=\"memory\"}");
    d.term();
    assert!(dropped > 0, "the replay dropped nothing");
    assert!(
        peak_kib < 64 * 1024,
        "peak RSS {peak_kib} KiB during replay"
    );
    // Each kept key turns both its stores dense (2,048 buckets of 8 bytes
    // each, counted as they grow): at most 4 MiB / 32 KiB keys.
    let stored = ch.number("SELECT count() FROM replaymem.timers FINAL WHERE name LIKE 'flood.t%'");
    assert!(stored > 0.0 && stored <= 128.0, "{stored} timer keys kept");
}
