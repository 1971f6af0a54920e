//! A replicated cluster, as users scale past one ClickHouse: ZooKeeper
//! (Debian's `zookeeper` package, one node on a free loopback port, in a
//! temp dir) and two 18.16 servers as two replicas of one shard. tallyd
//! makes the schema ON CLUSTER (replicated tables, Distributed `*_all`),
//! writes to the first replica, and fails over to the second when the first
//! is killed (lines sent meanwhile reach the second while the first is
//! still down). Totals must be exact on both replicas, with and without
//! `FINAL`. An upgrade's migration reaches every server's Distributed
//! table. Skipped, loudly, when Java or ZooKeeper is missing
//! (`scripts/test.sh` installs both).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use tallyd::config::Settings;
use tallyd::server;

/// The tests take turns: with two clusters at once (two ZooKeepers, four
/// servers) a run of this file hung twice on a 2-core machine.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A one-node ZooKeeper, killed when dropped.
struct ZooKeeper {
    child: Child,
    port: u16,
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts ZooKeeper, or says why it cannot.
fn zookeeper() -> Result<ZooKeeper, String> {
    if Command::new("java").arg("-version").output().is_err() {
        return Err("java is not installed".into());
    }
    if !Path::new("/usr/share/java/zookeeper.jar").exists() {
        return Err("Debian's zookeeper package is not installed".into());
    }
    let jars: Vec<String> = std::fs::read_dir("/usr/share/java")
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jar"))
        .map(|p| p.display().to_string())
        .collect();
    let dir = temp_dir("zookeeper");
    let port = free_port();
    std::fs::write(
        dir.join("zoo.cfg"),
        format!(
            "tickTime=500\ndataDir={}/data\nclientPort={port}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=ruok\n",
            dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("zk.log")).map_err(|e| e.to_string())?;
    let child = Command::new("java")
        .arg("-cp")
        .arg(jars.join(":"))
        .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
        .arg(dir.join("zoo.cfg"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let zk = ZooKeeper { child, port };
    let ok = wait_for(60, || {
        use std::io::{Read, Write};
        std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                // Not ZooKeeper yet (another server took the free port in
                // between) must not hang the poll.
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
                s.write_all(b"ruok")?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer == "imok")
            })
            .unwrap_or(false)
    });
    if ok {
        Ok(zk)
    } else {
        Err(format!(
            "ZooKeeper did not answer; see {}/zk.log",
            dir.display()
        ))
    }
}

/// Replica `n` (1 or 2) of shard 01 of cluster `tallyd_cluster`, whose
/// replicas listen for TCP on `tcp`.
fn replica(n: usize, zk: u16, tcp: [u16; 2]) -> ClickHouse {
    let extra = format!(
        "  <zookeeper><node><host>127.0.0.1</host><port>{zk}</port></node></zookeeper>\n  <macros><shard>01</shard><replica>r{n}</replica></macros>\n  <remote_servers><tallyd_cluster><shard><internal_replication>true</internal_replication><replica><host>127.0.0.1</host><port>{}</port></replica><replica><host>127.0.0.1</host><port>{}</port></replica></shard></tallyd_cluster></remote_servers>\n  <interserver_http_host>127.0.0.1</interserver_http_host>\n  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>\n",
        tcp[0], tcp[1]
    );
    clickhouse_with(
        &extra,
        &format!(
            "--tcp_port={} --interserver_http_port={}",
            tcp[n - 1],
            free_port()
        ),
    )
}

/// ZooKeeper and the shard's two replicas, or `None` (said loudly, as a
/// skip of `test`) when Java or ZooKeeper is missing.
fn cluster(test: &str) -> Option<(ZooKeeper, ClickHouse, ClickHouse)> {
    let zk = match zookeeper() {
        Ok(zk) => zk,
        Err(why) => {
            eprintln!(
                "\n\n*** SKIPPED {test}: {why} (scripts/test.sh installs default-jre-headless and zookeeper) ***\n\n"
            );
            return None;
        }
    };
    let tcp = [free_port(), free_port()];
    let (r1, r2) = (replica(1, zk.port, tcp), replica(2, zk.port, tcp));
    Some((zk, r1, r2))
}

/// Settings for a tallyd that writes `database` to `first`, then `second`,
/// on the cluster, flushing every 100 ms.
fn writing_to(first: &ClickHouse, second: &ClickHouse, database: &str) -> Settings {
    let mut s = settings(first, database);
    s.clickhouse.replicas = vec![second.url()];
    s.clickhouse.cluster = "tallyd_cluster".into();
    s.aggregate.flush_interval = "100ms".into();
    s
}

/// Sends `rounds` datagrams of 20 `cluster.c:1|c` lines, 20 ms apart.
async fn send_rounds(udp: std::net::SocketAddr, rounds: usize) {
    send_lines(udp, rounds, "cluster.c:1|c").await;
}

/// Sends `rounds` datagrams of 20 copies of `line`, 20 ms apart.
async fn send_lines(udp: std::net::SocketAddr, rounds: usize, line: &str) {
    for _ in 0..rounds {
        send_udp(udp, &[vec![line; 20].join("\n")]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_over_and_both_replicas_hold_exact_totals() {
    let _one = ONE_CLUSTER.lock().await;
    let Some((zk, r1, r2)) =
        cluster("a_killed_replica_fails_over_and_both_replicas_hold_exact_totals")
    else {
        return;
    };
    let mut s = writing_to(&r1, &r2, "clustered");
    s.clickhouse.timeout = "2s".into();
    s.clickhouse.retry_max = "300ms".into();
    let running = server::start(config(&s)).await.expect("start");
    let udp = running.udp_addr.expect("udp");
    send_rounds(udp, 50).await;
    // The replica in use dies while traffic goes on; tallyd moves to the
    // other. Then it comes back and catches up from its peer.
    tokio::task::block_in_place(|| r1.stop());
    send_rounds(udp, 50).await;
    // Only an insert into the second replica itself can bring it these
    // while the first is down: that is the failover.
    send_lines(udp, 10, "cluster.down:1|c").await;
    // Polled with errors as "not yet": 18.16 has failed this read once in
    // CI, while the first replica was down, with "Table clustered.counters
    // doesn't exist".
    let down =
        || r2.try_query("SELECT sum(value) FROM clustered.counters WHERE name = 'cluster.down'");
    assert!(
        tokio::task::block_in_place(|| wait_for(60, || down().as_deref() == Some("200\n"))),
        "the second replica got {:?} of 200 while the first was down",
        down()
    );
    assert!(
        tokio::task::block_in_place(|| r1.start()),
        "the replica restarts on its ports"
    );
    send_rounds(udp, 50).await;
    wait_for_lines(&running.telemetry, 160 * 20);
    let t = std::sync::Arc::clone(&running.telemetry);
    assert_eq!(running.shutdown().await, 0);
    assert!(
        t.clickhouse_retries.load(Relaxed) > 0,
        "no insert was retried"
    );
    let total = format!("{}\n", 150 * 20);
    for r in [&r1, &r2] {
        r.query("SYSTEM SYNC REPLICA clustered.counters");
        // Not one row twice, even without FINAL: a retry to the other
        // replica is the same block, which replication drops.
        assert_eq!(
            r.query("SELECT sum(value) FROM clustered.counters WHERE name = 'cluster.c'"),
            total,
            "replica {}",
            r.url()
        );
        assert_eq!(
            r.query("SELECT sum(value) FROM clustered.counters FINAL WHERE name = 'cluster.c'"),
            total
        );
        for from in ["clustered.counters", "clustered.counters FINAL"] {
            assert_eq!(
                r.query(&format!(
                    "SELECT sum(value) FROM {from} WHERE name = 'cluster.down'"
                )),
                "200\n"
            );
        }
    }
    assert_eq!(
        r2.query("SELECT sum(value) FROM clustered.counters_all WHERE name = 'cluster.c'"),
        total,
        "the Distributed table reads one replica per shard"
    );
    drop(zk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_on_a_cluster_reaches_every_servers_distributed_table() {
    let _one = ONE_CLUSTER.lock().await;
    let Some((zk, r1, r2)) =
        cluster("a_migration_on_a_cluster_reaches_every_servers_distributed_table")
    else {
        return;
    };
    let s = writing_to(&r1, &r2, "migrated");
    // tallyd makes the tables on the cluster; then they lose `samples`, as
    // tables of a release without it: the replicated table (both replicas)
    // and each server's Distributed copy.
    let running = server::start(config(&s)).await.expect("start");
    assert_eq!(running.shutdown().await, 0);
    // Polled: a server busy with a replicated ALTER may not answer one
    // read in time (`None`), which is not the column's state.
    let has_samples = |r: &ClickHouse, table: &str| {
        r.try_query(&format!(
            "SELECT count() FROM system.columns WHERE database = 'migrated' AND table = '{table}' AND name = 'samples'"
        ))
    };
    // A replicated ALTER may outlast the HTTP read (it waits for the other
    // replica): the state is what counts, and a repeat after it is an error.
    // Each try may wait out the HTTP read (30 s); a failure shows the last
    // answer and both servers' error logs (seen once in CI: the replicated
    // table kept the column for 120 s).
    let drop_samples = |r: &ClickHouse, table: &str| {
        let alter = format!("ALTER TABLE migrated.{table} DROP COLUMN samples");
        let mut answer = None;
        let dropped = wait_for(240, || {
            answer = http(r.port, "POST", "/", &alter);
            has_samples(r, table).as_deref() == Some("0\n")
        });
        assert!(
            dropped,
            "{table} on {} kept samples; the last ALTER answered {answer:?}\nr1's log:\n{}\nr2's log:\n{}",
            r.url(),
            r1.log_tail(30),
            r2.log_tail(30)
        );
    };
    drop_samples(&r1, "counters");
    for r in [&r1, &r2] {
        drop_samples(r, "counters_all");
    }
    let running = server::start(config(&s)).await.expect("restart");
    send_lines(running.udp_addr.expect("udp"), 5, "migrated.c:1|c").await;
    wait_for_lines(&running.telemetry, 5 * 20);
    assert_eq!(running.shutdown().await, 0);
    // A read through a Distributed table may go to either replica.
    for r in [&r1, &r2] {
        r.query("SYSTEM SYNC REPLICA migrated.counters");
    }
    for r in [&r1, &r2] {
        // The replicated table by replication; the Distributed copies
        // beside the flush.
        for table in ["counters", "counters_all"] {
            assert!(
                wait_for(60, || has_samples(r, table).as_deref() == Some("1\n")),
                "{table} on {}",
                r.url()
            );
        }
        assert_eq!(
            r.query("SELECT sum(value), sum(samples) FROM migrated.counters_all FINAL WHERE name = 'migrated.c'"),
            "100\t100\n",
            "read through {}'s Distributed table",
            r.url()
        );
    }
    drop(zk);
}
