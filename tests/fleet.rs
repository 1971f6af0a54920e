//! The fleet tier with real processes: 20 edge tallyds forward to 2
//! aggregator tallyds (through test proxies that can lose acks or cut the
//! network), which write ClickHouse. The totals there must be exact: every
//! counter sum, timer count and sum, set member and event once, the newest
//! gauge newest, through lost acks, kill -9 of edges, a partition whose
//! backlog lands in its own intervals, kill -9 of an aggregator and an
//! aggregator down while the edges buffer. Exact with and without `FINAL`
//! where no aggregator is killed (an edge's re-sends are deduplicated by
//! the aggregator itself); under `FINAL`, and without it on the modern
//! engine, where one is (its own re-sent INSERT collapses as any tallyd's).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ClickHouse, clickhouse, free_port, http, send_udp, temp_dir, wait_for};

const EDGES: usize = 20;

struct Daemon {
    child: Child,
    admin: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// A metric of this process's /metrics, summed over labels.
    fn metric(&self, name: &str) -> u64 {
        http(self.admin, "GET", "/metrics", "")
            .map(|m| {
                m.lines()
                    .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            })
            .unwrap_or(0)
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts tallyd on `dir` and waits until /health answers.
fn start(dir: &Path, admin: u16, args: &[String]) -> Daemon {
    std::fs::write(
        dir.join("tallyd.toml"),
        "[wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n[clickhouse]\nretry_max = \"300ms\"\ntimeout = \"2s\"\n[forward]\ntimeout = \"2s\"\nretry_max = \"300ms\"\nmax_lag = \"3s\"\n",
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .env("TALLYD_OTLP_HTTP", "off")
        .env("TALLYD_OTLP_GRPC", "off")
        .arg("run")
        .arg("--config")
        .arg(dir.join("tallyd.toml"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--statsd-tcp", "off", "--proto-udp", "off"])
        .args(args)
        .stderr(if std::env::var_os("TALLYD_TEST_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn tallyd");
    let mut d = Daemon { child, admin };
    let mut exited = None;
    let up = wait_for(30, || {
        exited = d.child.try_wait().ok().flatten();
        exited.is_some() || http(admin, "GET", "/health", "").is_some()
    });
    assert!(
        up && exited.is_none(),
        "tallyd on {} did not start (exited: {exited:?}; TALLYD_TEST_STDERR=1 shows its log)",
        dir.display()
    );
    d
}

/// A TCP proxy in front of an aggregator: it passes bytes both ways, or
/// loses every answer (the aggregator took the batch, the edge never hears
/// so), or refuses every connection (a partition).
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

const PASS: u8 = 0;
const LOSE_ACKS: u8 = 1;
const CUT: u8 = 2;

impl Proxy {
    fn new(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, c) = (Arc::clone(&mode), Arc::clone(&conns));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if m.load(Relaxed) == CUT {
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone()) {
                    let mut list = c.lock().unwrap_or_else(|e| e.into_inner());
                    list.push(a);
                    list.push(b);
                }
                let (mut c_in, mut u_out) = (
                    client.try_clone().expect("clone"),
                    upstream.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut u_out);
                    let _ = u_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut u_in, mut c_out, m) = (upstream, client, Arc::clone(&m));
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match u_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if m.load(Relaxed) != PASS || c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = u_in.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy { port, mode, conns }
    }

    /// Sets the mode; every open connection is cut, so that the next batch
    /// goes through a connection in this mode.
    fn set(&self, mode: u8) {
        self.mode.store(mode, Relaxed);
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct Aggregator {
    dir: std::path::PathBuf,
    admin: u16,
    proto: u16,
    daemon: Option<Daemon>,
}

impl Aggregator {
    fn new(tag: &str, ch: &ClickHouse, database: &str) -> Aggregator {
        let mut a = Aggregator {
            dir: temp_dir(tag),
            admin: free_port(),
            proto: free_port(),
            daemon: None,
        };
        a.start(ch, database);
        a
    }

    fn start(&mut self, ch: &ClickHouse, database: &str) {
        let args: Vec<String> = [
            "--host-id",
            "aggregator",
            "--statsd-udp",
            "off",
            "--proto-tcp",
            &format!("127.0.0.1:{}", self.proto),
            "--clickhouse-url",
            &ch.url(),
            "--clickhouse-database",
            database,
            "--flush-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        self.daemon = Some(start(&self.dir, self.admin, &args));
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }
}

struct Edge {
    dir: std::path::PathBuf,
    admin: u16,
    udp: u16,
    args: Vec<String>,
    daemon: Option<Daemon>,
}

impl Edge {
    fn new(i: usize, upstreams: &str, host: &str) -> Edge {
        let mut e = Edge {
            dir: temp_dir(&format!("edge{i}")),
            admin: free_port(),
            udp: free_port(),
            args: Vec::new(),
            daemon: None,
        };
        e.args = [
            "--host-id".into(),
            format!("edge-{i}"),
            "--statsd-udp".into(),
            format!("127.0.0.1:{}", e.udp),
            "--proto-tcp".into(),
            "off".into(),
            "--forward-upstreams".into(),
            upstreams.into(),
            "--forward-host".into(),
            host.into(),
            "--flush-interval".into(),
            "200ms".into(),
        ]
        .to_vec();
        e.restart();
        e
    }

    fn restart(&mut self) {
        self.daemon = Some(start(&self.dir, self.admin, &self.args));
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.udp))
    }
}

/// What the fleet was sent, to be found in ClickHouse.
#[derive(Default)]
struct Sent {
    lines: Vec<u64>,
    counter: f64,
    timer_count: f64,
    timer_sum: f64,
    members: u64,
    events: u64,
    round: u64,
}

/// One round of mixed traffic to every edge; waits until each received it.
fn round(edges: &[Edge], sent: &mut Sent, marker: &str) {
    sent.round += 1;
    let r = sent.round;
    sent.lines.resize(edges.len(), 0);
    for (i, e) in edges.iter().enumerate() {
        let mut lines = Vec::new();
        for k in 0..20 {
            lines.push(format!("fl.c.{k}:1|c|#env:prod"));
            lines.push(format!("fl.c.{k}:3|c|@0.5|#env:prod"));
            lines.push(format!("fl.t.{}:{}|ms", k % 4, k + 1));
            lines.push(format!("fl.s:e{i}-r{r}-{k}|s"));
            lines.push(format!("fl.g.{i}:+1|g"));
            lines.push(format!("{marker}.{k}:1|c"));
        }
        lines.push(format!("fl.gabs:{r}|g"));
        lines.push(format!("_e{{5,2}}:round|r{r}|#edge:{i}"));
        sent.counter += 20.0 * 7.0;
        sent.timer_count += 20.0;
        sent.timer_sum += (1..=20).sum::<u64>() as f64;
        sent.members += 20;
        sent.events += 1;
        sent.lines[i] += lines.len() as u64;
        let datagrams: Vec<String> = lines.chunks(20).map(|c| c.join("\n")).collect();
        send_udp(e.addr(), &datagrams);
    }
    for (i, e) in edges.iter().enumerate() {
        assert!(
            wait_for(20, || e.daemon().metric("tallyd_received_lines_total")
                >= sent.lines[i]),
            "edge {i} received {} of {} lines",
            e.daemon().metric("tallyd_received_lines_total"),
            sent.lines[i]
        );
    }
}

/// Lines an edge received since its start (its counter starts over).
fn rebase(sent: &mut Sent, i: usize) {
    sent.lines[i] = 0;
}

/// The most active parts of any partition of `db`'s tables: 18.16 refuses
/// inserts at 300 (`parts_to_throw_insert`).
fn most_parts(ch: &ClickHouse, db: &str) -> f64 {
    ch.number(&format!(
        "SELECT max(c) FROM (SELECT count() AS c FROM system.parts WHERE database = '{db}' AND active GROUP BY table, partition)"
    ))
}

/// Waits until the fleet's counter total in ClickHouse reaches what was
/// sent (`fin`: "FINAL" or ""), then checks every total exactly.
fn check(ch: &ClickHouse, db: &str, sent: &Sent, fin: &str, gauge_hosts: &str) {
    let total = |fin: &str| {
        ch.try_query(&format!(
            "SELECT sum(value) FROM {db}.counters {fin} WHERE name LIKE 'fl.c.%'"
        ))
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(-1.0)
    };
    assert!(
        wait_for(120, || total(fin) >= sent.counter),
        "{db} {fin}: counters {} of {}",
        total(fin),
        sent.counter
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(total(fin), sent.counter, "{db} {fin}: counter sum");
    let q = |sql: &str| ch.query(&sql.replace("{db}", db).replace("{fin}", fin));
    assert_eq!(
        q("SELECT sum(count), sum(sum) FROM {db}.timers {fin} WHERE name LIKE 'fl.t.%' FORMAT TSV")
            .trim(),
        format!("{}\t{}", sent.timer_count, sent.timer_sum),
        "{db} {fin}: timer count and sum"
    );
    assert_eq!(
        q("SELECT uniqExact(h) FROM {db}.sets {fin} ARRAY JOIN member_hashes AS h WHERE name = 'fl.s'").trim(),
        sent.members.to_string(),
        "{db} {fin}: set members"
    );
    assert_eq!(
        q("SELECT count() FROM {db}.events {fin} WHERE title = 'round'").trim(),
        sent.events.to_string(),
        "{db} {fin}: events"
    );
    assert_eq!(
        q("SELECT argMax(value, (ts, version)) FROM {db}.gauges {fin} WHERE name = 'fl.gabs'")
            .trim(),
        sent.round.to_string(),
        "{db} {fin}: the newest gauge"
    );
    assert_eq!(
        q("SELECT uniqExact(host) FROM {db}.gauges {fin} WHERE name LIKE 'fl.g.%'").trim(),
        gauge_hosts,
        "{db} {fin}: the rows' hosts"
    );
}

#[test]
fn a_fleet_behind_lost_acks_killed_edges_and_a_partition_counts_everything_once() {
    let ch = clickhouse();
    let db = "fleet_keep";
    let began = std::time::Instant::now();
    let aggs: Vec<Aggregator> = (0..2)
        .map(|i| Aggregator::new(&format!("agg{i}"), ch, db))
        .collect();
    let proxies: Vec<Proxy> = aggs.iter().map(|a| Proxy::new(a.proto)).collect();
    let upstreams = proxies
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect::<Vec<_>>()
        .join(",");
    let mut edges: Vec<Edge> = (0..EDGES)
        .map(|i| Edge::new(i, &upstreams, "keep"))
        .collect();
    let mut sent = Sent::default();
    round(&edges, &mut sent, "fl.live");

    // Lost acks: the aggregators take batches, the edges never hear so and
    // send them again (answered DUPLICATE once the acks pass again).
    for p in &proxies {
        p.set(LOSE_ACKS);
    }
    round(&edges, &mut sent, "fl.live");
    std::thread::sleep(Duration::from_secs(2));
    for p in &proxies {
        p.set(PASS);
    }
    let duplicates = || -> u64 {
        edges
            .iter()
            .map(|e| e.daemon().metric("tallyd_forward_duplicates_total"))
            .sum()
    };
    assert!(
        wait_for(30, || duplicates() > 0),
        "a lost ack makes the edge send again, and the aggregator answers DUPLICATE"
    );

    // kill -9 of a third of the edges, right after a round reached them.
    round(&edges, &mut sent, "fl.live");
    for (i, e) in edges.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
        e.daemon.take().expect("running").kill9();
        e.restart();
        rebase(&mut sent, i);
    }

    // A partition: the edges buffer, and their backlog lands in its own
    // intervals (before the partition healed), not in the aggregators'.
    for p in &proxies {
        p.set(CUT);
    }
    round(&edges, &mut sent, "fl.partitioned");
    std::thread::sleep(Duration::from_secs(3));
    let healed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for p in &proxies {
        p.set(PASS);
    }
    round(&edges, &mut sent, "fl.live");
    check(ch, db, &sent, "", &EDGES.to_string());
    check(ch, db, &sent, "FINAL", &EDGES.to_string());
    let newest = ch.number(&format!(
        "SELECT max(toUInt32(ts)) FROM {db}.counters WHERE name LIKE 'fl.partitioned.%'"
    ));
    assert!(
        (newest as u64) < healed,
        "the partition's rows keep their intervals: newest {newest}, healed at {healed}"
    );

    // ClickHouse's INSERTs are the aggregators', whatever the edges.
    let edge_inserts: u64 = edges
        .iter()
        .map(|e| e.daemon().metric("tallyd_inserts_total"))
        .sum();
    assert_eq!(edge_inserts, 0, "edges write no ClickHouse");
    let agg_inserts: u64 = aggs
        .iter()
        .map(|a| a.daemon().metric("tallyd_inserts_total"))
        .sum();
    // At most one INSERT per table and aggregator interval (1 s), however
    // many edges: 20 edges writing themselves would make 20 times that.
    let bound = aggs.len() as u64 * 6 * (began.elapsed().as_secs() + 2);
    assert!(
        (1..=bound).contains(&agg_inserts),
        "{agg_inserts} INSERTs from 2 aggregators in {:?}",
        began.elapsed()
    );
    let parts = most_parts(ch, db);
    assert!(parts < 100.0, "{parts} parts in one partition");
}

#[test]
fn a_fleet_behind_a_killed_and_a_stopped_aggregator_counts_everything_once() {
    let ch = clickhouse();
    let db = "fleet_drop";
    let mut aggs: Vec<Aggregator> = (0..2)
        .map(|i| Aggregator::new(&format!("dagg{i}"), ch, db))
        .collect();
    let upstreams = aggs
        .iter()
        .map(|a| format!("127.0.0.1:{}", a.proto))
        .collect::<Vec<_>>()
        .join(",");
    let edges: Vec<Edge> = (0..EDGES)
        .map(|i| Edge::new(i, &upstreams, "drop"))
        .collect();
    let mut sent = Sent::default();
    round(&edges, &mut sent, "fl.live");

    // kill -9 of an aggregator mid-stream: what it acknowledged is in its
    // WAL, what it did not is sent again.
    round(&edges, &mut sent, "fl.live");
    aggs[0].daemon.take().expect("running").kill9();
    aggs[0].start(ch, db);

    // One aggregator down for 2 minutes (TALLYD_TEST_OUTAGE_SECS): new
    // intervals go to the live one (failover), flushes already planned with
    // the down one wait for it.
    aggs[1].daemon.take().expect("running").kill9();
    let failover = |ch: &ClickHouse| {
        ch.try_query(&format!(
            "SELECT sum(value) FROM {db}.counters FINAL WHERE name LIKE 'fl.failover.%'"
        ))
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
    };
    // The edges find it down with this round (its share of it waits).
    round(&edges, &mut sent, "fl.live");
    std::thread::sleep(Duration::from_secs(2));
    round(&edges, &mut sent, "fl.failover");
    let all = (EDGES * 20) as f64;
    assert!(
        wait_for(30, || failover(ch) == all),
        "while an aggregator is down, every key of new intervals reaches ClickHouse through the live one: {} of {all}",
        failover(ch)
    );
    let waiting: u64 = edges
        .iter()
        .map(|e| e.daemon().metric("tallyd_forward_waiting"))
        .sum();
    assert!(
        waiting > 0,
        "flushes planned with the down aggregator wait for it"
    );
    std::thread::sleep(Duration::from_secs(
        std::env::var("TALLYD_TEST_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    ));
    let buffered: u64 = edges
        .iter()
        .map(|e| e.daemon().metric("tallyd_backlog_batches"))
        .sum();
    assert!(buffered > 0, "the edges hold the down aggregator's share");
    aggs[1].start(ch, db);
    round(&edges, &mut sent, "fl.live");
    check(ch, db, &sent, "FINAL", "1");
    let parts = most_parts(ch, db);
    assert!(
        parts < 100.0,
        "{parts} parts in one partition, minutes into a 20-edge run"
    );
    // On the modern engine an aggregator's re-sent insert (a kill -9
    // between its INSERT and its spool's confirmation) is dropped by its
    // token: exact without FINAL too. 18.16 collapses it under FINAL only.
    if common::modern() {
        check(ch, db, &sent, "", "1");
    }
}
