//! Test harness: a private ClickHouse server per test binary (temp dir, free
//! loopback port, stopped when the test process ends), a tiny HTTP client
//! for queries, and helpers to start tallyd in-process.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tallyd::config::{Config, Settings};

/// A private ClickHouse server: Debian's clickhouse-server (18.16), or,
/// with `TALLYD_TEST_ENGINE=chdb`, the modern engine embedded by PyPI's
/// chdb behind `tests/modern/chdb_front.py` (26.9 with chdb 4.4).
pub struct ClickHouse {
    pub port: u16,
    /// Served by the chdb front rather than clickhouse-server.
    pub chdb: bool,
    /// The HTTPS port, when started with a certificate (else 0).
    pub https_port: u16,
    /// More server arguments (ports a cluster needs), kept across restarts.
    args: String,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

const INSTALL_HINT: &str = "the tests need Debian's clickhouse-server package: run ./scripts/test.sh (it installs it), or `apt-get install clickhouse-server`, or point TALLYD_TEST_CLICKHOUSE at a clickhouse-server binary";

fn server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TALLYD_TEST_CLICKHOUSE") {
        return PathBuf::from(p);
    }
    for p in ["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("clickhouse-server not found: {INSTALL_HINT}");
}

/// The server shared by the tests of this binary (started on first use).
pub fn clickhouse() -> &'static ClickHouse {
    static SERVER: OnceLock<ClickHouse> = OnceLock::new();
    SERVER.get_or_init(|| {
        if modern() {
            ClickHouse::start_chdb()
        } else {
            ClickHouse::start_new()
        }
    })
}

/// Whether this run's tests talk to the modern engine (chdb).
pub fn modern() -> bool {
    std::env::var("TALLYD_TEST_ENGINE").is_ok_and(|e| e == "chdb")
}

/// A fresh directory `tallyd-test-{tag}-{pid}-{n}` under the temp dir. Test
/// dirs outlive their test (a crash test reopens them, a failing test leaves
/// them to read), so the first call of each test binary removes those of
/// test processes that have ended.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(remove_dirs_of_ended_tests);
    let dir = std::env::temp_dir().join(format!(
        "tallyd-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Removes `tallyd-test-*-{pid}-{n}` dirs whose process is gone.
fn remove_dirs_of_ended_tests() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("tallyd-test-")) else {
            continue;
        };
        let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A loopback port free for both TCP and UDP, below the kernel's ephemeral
/// range (32768 and up on Linux). A port the kernel hands out for `:0` is
/// one it may hand out again as the local port of any outgoing connection
/// before the daemon under test binds it; tests running side by side make
/// many such connections. Ports are taken in turn from a per-process start,
/// so two tests of one binary never pick the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN)
}

/// A private ClickHouse whose config.xml also holds `extra`, started with
/// `args` after `--` (e.g. `--tcp_port=N`), on a free HTTP port.
pub fn clickhouse_with(extra: &str, args: &str) -> ClickHouse {
    ClickHouse::start_full(extra, args)
}

/// A private ClickHouse that also serves HTTPS with `cert` and `key` (PEM).
pub fn clickhouse_tls(cert: &Path, key: &Path) -> ClickHouse {
    ClickHouse::start_with(&format!(
        "  <openSSL><server><certificateFile>{}</certificateFile><privateKeyFile>{}</privateKeyFile><verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile></server></openSSL>\n",
        cert.display(),
        key.display()
    ))
}

/// As [`clickhouse_tls`], and HTTPS clients must show a certificate signed
/// by `client_ca`.
pub fn clickhouse_mtls(cert: &Path, key: &Path, client_ca: &Path) -> ClickHouse {
    ClickHouse::start_with(&format!(
        "  <openSSL><server><certificateFile>{}</certificateFile><privateKeyFile>{}</privateKeyFile><caConfig>{}</caConfig><verificationMode>strict</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile></server></openSSL>\n",
        cert.display(),
        key.display(),
        client_ca.display()
    ))
}

impl ClickHouse {
    fn start_new() -> ClickHouse {
        ClickHouse::start_with("")
    }

    fn start_chdb() -> ClickHouse {
        let dir = temp_dir("chdb");
        for _ in 0..10 {
            let s = ClickHouse {
                port: free_port(),
                chdb: true,
                https_port: 0,
                args: String::new(),
                dir: dir.clone(),
                child: Mutex::new(None),
            };
            if s.start() {
                return s;
            }
        }
        panic!("the chdb front did not start; see {}", dir.display());
    }

    /// A server whose config.xml also holds `extra`; with an `<openSSL>`
    /// block it serves HTTPS too.
    fn start_with(extra: &str) -> ClickHouse {
        ClickHouse::start_full(extra, "--tcp_port=0")
    }

    fn start_full(extra: &str, args: &str) -> ClickHouse {
        let dir = temp_dir("clickhouse");
        std::fs::write(
            dir.join("config.xml"),
            format!("<yandex>\n  <logger><level>warning</level><log>server.log</log><errorlog>server.err.log</errorlog></logger>\n  <mark_cache_size>5368709</mark_cache_size>\n  <listen_host>127.0.0.1</listen_host>\n  <users_config>users.xml</users_config>\n  <default_profile>default</default_profile>\n  <default_database>default</default_database>\n{extra}</yandex>\n"),
        )
        .expect("write config");
        let tls = extra.contains("<openSSL>");
        std::fs::write(
            dir.join("users.xml"),
            "<yandex>\n  <profiles><default></default></profiles>\n  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>\n  <quotas><default></default></quotas>\n</yandex>\n",
        )
        .expect("write users");
        let server = ClickHouse {
            port: 0,
            chdb: false,
            https_port: 0,
            args: args.to_owned(),
            dir,
            child: Mutex::new(None),
        };
        for _ in 0..10 {
            let s = ClickHouse {
                port: free_port(),
                https_port: if tls { free_port() } else { 0 },
                ..server.clone_dir()
            };
            if s.start() {
                return s;
            }
        }
        panic!(
            "ClickHouse did not start on any of 10 ports; see {}",
            server.dir.display()
        );
    }

    fn clone_dir(&self) -> ClickHouse {
        ClickHouse {
            port: self.port,
            chdb: self.chdb,
            https_port: self.https_port,
            args: self.args.clone(),
            dir: self.dir.clone(),
            child: Mutex::new(None),
        }
    }

    /// Starts the server on its port; false if the port was taken.
    pub fn start(&self) -> bool {
        let command = if self.chdb {
            format!(
                "python3 '{front}' {port} '{dir}/data' >server.out 2>&1",
                front = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/modern/chdb_front.py")
                    .display(),
                port = self.port,
                dir = self.dir.display(),
            )
        } else {
            format!(
                "'{bin}' --config-file=config.xml -- --http_port={port} {https} {args} --path='{dir}/data/' >server.out 2>&1",
                bin = server_binary().display(),
                port = self.port,
                https = if self.https_port == 0 {
                    String::new()
                } else {
                    format!("--https_port={}", self.https_port)
                },
                dir = self.dir.display(),
                args = self.args,
            )
        };
        // A shell minds the server: it stops it when this test process
        // ends (however it ends) or when the shell gets SIGTERM. The exit
        // code it leaves tells `start` the server died; once the test
        // process is gone, its temp dir may be too, and nobody reads it.
        let script = format!(
            "cd '{dir}' && {command} & ch=$!; \
             trap 'kill $ch 2>/dev/null; wait $ch; exit 0' TERM; \
             while kill -0 {pid} 2>/dev/null && kill -0 $ch 2>/dev/null; do sleep 0.2; done; \
             kill $ch 2>/dev/null; wait $ch; rc=$?; \
             {{ echo $rc > '{dir}/exit_code'; }} 2>/dev/null",
            dir = self.dir.display(),
            pid = std::process::id(),
        );
        let _ = std::fs::remove_file(self.dir.join("exit_code"));
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sh");
        *self.child.lock().expect("lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http(self.port, "GET", "/ping", "").is_some_and(|r| r.starts_with("Ok.")) {
                return true;
            }
            if self.dir.join("exit_code").exists() {
                self.stop();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "ClickHouse did not answer within 30 s; see {}/server.out",
            self.dir.display()
        );
    }

    /// Stops the server (its data stays for a later `start`).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last `lines` lines of the server's error log, for a failure's
    /// message (empty for the chdb front).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.err.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs a query, returns the body (TSV). Panics with the server's error.
    pub fn query(&self, sql: &str) -> String {
        match http(self.port, "POST", "/", sql) {
            Some(body) if !body.contains("DB::Exception") => body,
            other => panic!("query failed: {sql}\n{other:?}"),
        }
    }

    /// Runs a query for polling: `None` on any error (e.g. no table yet).
    pub fn try_query(&self, sql: &str) -> Option<String> {
        http(self.port, "POST", "/", sql).filter(|body| !body.contains("DB::Exception"))
    }

    /// A single number.
    pub fn number(&self, sql: &str) -> f64 {
        let text = self.query(sql);
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {text:?} from {sql}"))
    }
}

/// A minimal HTTP/1.0 request; the body of a 200 answer, else the error text.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
        Some(body.to_owned())
    } else {
        Some(format!("HTTP error: {head}\n{body} DB::Exception"))
    }
}

/// Settings for an in-process tallyd on ephemeral loopback ports, writing to
/// its own database of the shared server.
pub fn settings(ch: &ClickHouse, database: &str) -> Settings {
    let mut s = Settings {
        host_id: "test-host".into(),
        data_dir: temp_dir("data").display().to_string(),
        admin: "127.0.0.1:0".into(),
        log_level: "warn".into(),
        ..Settings::default()
    };
    s.statsd.udp = "127.0.0.1:0".into();
    s.statsd.tcp = "127.0.0.1:0".into();
    s.statsd.udp_workers = 2;
    s.proto.tcp = "127.0.0.1:0".into();
    s.proto.udp = "127.0.0.1:0".into();
    s.otlp.http = "off".into();
    s.otlp.grpc = "off".into();
    s.clickhouse.url = ch.url();
    s.clickhouse.database = database.into();
    s.clickhouse.retry_max = "500ms".into();
    s.wal.size = "16MiB".into();
    s.wal.segment_size = "1MiB".into();
    s
}

pub fn config(s: &Settings) -> Config {
    s.validate().expect("valid test config")
}

/// Sends each datagram to `addr`, pausing now and then so that loopback
/// never overflows the receive buffer.
pub fn send_udp(addr: SocketAddr, datagrams: &[String]) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    for (i, d) in datagrams.iter().enumerate() {
        sock.send_to(d.as_bytes(), addr).expect("send");
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Writes `text` over one TCP connection and closes it.
pub fn send_tcp(addr: SocketAddr, text: &str) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(text.as_bytes()).expect("write");
}

/// Polls `f` until it returns true, for up to `secs` seconds.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Waits until tallyd's receive counters show `lines` lines, so that a
/// shutdown right after cannot race the kernel queue.
pub fn wait_for_lines(t: &tallyd::telemetry::Telemetry, lines: u64) {
    let got = || t.udp.lines.load(Ordering::Relaxed) + t.tcp.lines.load(Ordering::Relaxed);
    assert!(
        wait_for(20, || got() >= lines),
        "tallyd received {} of {lines} lines",
        got()
    );
}

/// A protobuf batch of `count` counter events `name` of `value` each.
pub fn proto_batch(
    client: &str,
    sequence: u64,
    name: &str,
    count: usize,
    value: f64,
) -> tallyd::protocol::proto::Batch {
    use tallyd::protocol::proto::pb::event::Value;
    use tallyd::protocol::proto::{Batch, Event};
    Batch {
        client_id: client.into(),
        sequence,
        events: (0..count)
            .map(|_| Event {
                name: name.into(),
                tags: vec![],
                value: Some(Value::Counter(value)),
                sample_rate: 0.0,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// `keys` histogram lines, each with 64 values in distinct sketch buckets
/// and one at the top of the range, on both signs: the largest sketch a
/// line can make (two dense stores of 2,048 buckets, 32 KiB per key).
pub fn crafted_timer_flood(keys: usize) -> String {
    let pos: String = (1..=64).map(|k| format!(":{}", 1.1f64.powi(k))).collect();
    let neg: String = (1..=64).map(|k| format!(":-{}", 1.1f64.powi(k))).collect();
    // 19 more positive values: the timer's queue takes 1e300 into the
    // sketch while the line is applied, not at the flush.
    let after = ":2".repeat(19);
    (0..keys)
        .map(|k| format!("flood.t{k}{pos}:1e300{after}{neg}:-1e300|h\n"))
        .collect()
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`), 0 if unreadable.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A CA and a server certificate for 127.0.0.1 (and localhost) made with
/// the `openssl` command in `dir`: (ca.crt, server.crt, server.key); also
/// a client certificate of the same CA (client.crt, client.key, with
/// `extendedKeyUsage=clientAuth`).
pub fn certificates(dir: &Path) -> (String, String, String) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=tallyd test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // A client certificate from the same CA.
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=tallyd",
    ]);
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\n").expect("cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "2",
        "-extfile",
        "client.cnf",
    ]);
    let path = |f: &str| dir.join(f).display().to_string();
    (path("ca.crt"), path("server.crt"), path("server.key"))
}
