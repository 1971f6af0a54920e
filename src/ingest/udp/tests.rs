//! Unit tests of [`super`].

use super::*;
use crate::aggregate::Aggregator;

/// A recorder without a WAL over `a`.
fn recorder(a: &Arc<Aggregator>) -> Recorder {
    Recorder::new(Arc::clone(a), None)
}

fn aggregator() -> Aggregator {
    let limits = crate::aggregate::AggregateLimits {
        max_keys: 100,
        max_set_members: 100,
        max_depth: u64::MAX,
        max_memory: u64::MAX,
        timestamp_window: Duration::from_secs(3600),
        interval: Duration::from_secs(1),
    };
    Aggregator::new(limits, Default::default(), Duration::ZERO)
}

/// A socket (a 4 MiB buffer, the workers' read timeout) holding
/// `datagrams` copies of `payload`, and their sender.
fn queued(datagrams: usize, payload: &[u8]) -> (UdpSocket, UdpSocket) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    set_receive_buffer(&socket, 4 << 20).expect("buffer");
    socket.set_read_timeout(Some(POLL)).expect("timeout");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    for _ in 0..datagrams {
        sender
            .send_to(payload, socket.local_addr().expect("addr"))
            .expect("send");
    }
    (socket, sender)
}

#[test]
fn drops_are_read_for_our_inodes_only() {
    let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  123: 0100007F:1FBD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n\
  124: 0100007F:1FBD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 5\n\
  125: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9999 2 0000000000000000 100\n";
    assert_eq!(drops_in_table(table, &[4242, 4243]), 22);
}

#[test]
fn workers_share_one_socket_and_its_drops_count_once() {
    let sockets = bind("127.0.0.1:0".parse().expect("addr"), 3, 1 << 20).expect("bind");
    let ports: Vec<u16> = sockets
        .iter()
        .map(|s| s.local_addr().expect("addr").port())
        .collect();
    assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
    assert_eq!(sockets.len(), 3);
    assert_eq!(inodes(&sockets).len(), 1);
    assert_eq!(kernel_drops(&inodes(&sockets)), Some(0));
}

#[test]
fn queued_datagrams_are_taken_together_and_no_line_runs_into_the_next() {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    for d in ["x:1|c", "", "x:2|c\ny:1|c", "y:1|c\n"] {
        sender
            .send_to(d.as_bytes(), socket.local_addr().expect("addr"))
            .expect("send");
    }
    let mut batch = Batch::new();
    batch.recv(&socket, RecvFlags::empty()).expect("one waits");
    while !batch.is_full() && batch.recv(&socket, RecvFlags::DONTWAIT).is_ok() {}
    assert_eq!(batch.joined(), b"x:1|c\n\nx:2|c\ny:1|c\ny:1|c\n\n");
    assert_eq!(batch.datagrams, [0..5, 6..6, 7..18, 19..25]);
    let a = aggregator();
    let mut stats = BlockStats::default();
    a.ingest_datagrams(
        batch.joined(),
        &batch.datagrams,
        &mut Scratch::default(),
        &mut stats,
    );
    assert_eq!((stats.blocks, stats.bytes, stats.samples), (4, 22, 4));
    assert_eq!(stats.parse_error_total(), 0);
    batch.clear();
    assert!(batch.joined().is_empty() && batch.datagrams.is_empty());
}

#[test]
fn a_unix_datagram_over_65535_bytes_is_dropped_whole_and_counted() {
    let (socket, sender) = std::os::unix::net::UnixDatagram::pair().expect("pair");
    // Whole lines past the 65,535 bytes a datagram may hold: a cut one
    // would count 1 for `b`, not 2.
    let big = "a:1|c\n".repeat(MAX_DATAGRAM / 6) + "b:10|c|@0.5\n";
    assert!(big.len() > MAX_DATAGRAM);
    sender.send(big.as_bytes()).expect("send");
    sender.send(b"x:1|c").expect("send");
    let mut batch = Batch::new();
    while !batch.is_full() && batch.recv(&socket, RecvFlags::DONTWAIT).is_ok() {}
    assert_eq!(batch.too_large, 1);
    assert_eq!(batch.joined(), b"x:1|c\n");
    batch.clear();
    assert_eq!(batch.too_large, 0);
}

#[test]
fn a_call_wakes_one_helper_once_and_calls_made_meanwhile_are_one() {
    let crew = Crew::new();
    let (ms, hour) = (Duration::from_millis(1), Duration::from_secs(3600));
    assert!(!crew.wait(ms), "no call: a timeout");
    crew.call();
    crew.call();
    assert!(crew.wait(hour), "taken");
    assert!(!crew.wait(ms), "taken once");
    // A helper parked in `wait` is woken by a call.
    let crew = Arc::new(Crew::new());
    let parked = {
        let crew = Arc::clone(&crew);
        std::thread::spawn(move || crew.wait(hour))
    };
    while !parked.is_finished() {
        crew.call();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(parked.join().expect("helper"));
}

#[test]
fn a_called_helper_takes_the_whole_backlog_then_waits_again() {
    // Three batches' worth, queued before the helper looks.
    let datagrams = 3 * BATCH_DATAGRAMS;
    let (socket, sender) = queued(datagrams, b"x:1|c\ny:2|c");
    let a = Arc::new(aggregator());
    let telemetry = Arc::new(Telemetry::default());
    // Only a call wakes this helper (its poll is an hour): the backlog
    // must go on the one call.
    let crew = Arc::new(Crew::new());
    let stop = Arc::new(AtomicBool::new(false));
    crew.call();
    let helper = {
        let (a, telemetry, crew, stop) = (a.clone(), telemetry.clone(), crew.clone(), stop.clone());
        let socket = socket.try_clone().expect("clone");
        std::thread::spawn(move || {
            let role = Role::Helper(&crew, Duration::from_secs(3600));
            let ingest = statsd_ingest(0, recorder(&a), Arc::clone(&telemetry), |t| &t.udp);
            receive(&socket, 0, &telemetry, &stop, role, ingest)
        })
    };
    let blocks = || telemetry.udp.blocks.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while blocks() < datagrams as u64 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let taken = blocks();
    // Back in the crew: a datagram now waits for the next call.
    sender
        .send_to(b"x:1|c", socket.local_addr().expect("addr"))
        .expect("send");
    std::thread::sleep(Duration::from_millis(50));
    let waited = blocks();
    crew.call();
    while blocks() == waited && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    crew.call();
    helper.join().expect("helper");
    assert_eq!(taken, datagrams as u64);
    assert_eq!((waited, blocks()), (taken, taken + 1));
    let sum = |name: &[u8]| {
        let mut key = crate::aggregate::key::KeyBuf::default();
        let key = key.build(crate::protocol::statsd::MetricType::Counter, name, b"");
        match a.current().get(key).as_deref() {
            Some(crate::aggregate::acc::Acc::Counter { sum, .. }) => sum.to_owned(),
            other => panic!("{other:?}"),
        }
    };
    let sent = datagrams as f64;
    assert_eq!((sum(b"x"), sum(b"y")), (sent + 1.0, 2.0 * sent));
}

#[test]
fn a_lead_that_finds_a_full_batch_queued_calls_a_helper() {
    let datagrams = BATCH_DATAGRAMS + 10;
    let (socket, _sender) = queued(datagrams, b"x:1|c");
    let a = Arc::new(aggregator());
    let telemetry = Arc::new(Telemetry::default());
    let crew = Arc::new(Crew::new());
    let stop = Arc::new(AtomicBool::new(false));
    let lead = {
        let (a, telemetry, crew, stop) = (a.clone(), telemetry.clone(), crew.clone(), stop.clone());
        std::thread::spawn(move || {
            let role = Role::Lead {
                crew: &crew,
                streams: 0..2,
            };
            let ingest = statsd_ingest(0, recorder(&a), Arc::clone(&telemetry), |t| &t.udp);
            receive(&socket, 0, &telemetry, &stop, role, ingest)
        })
    };
    assert!(crew.wait(Duration::from_secs(30)), "called");
    stop.store(true, Ordering::Relaxed);
    lead.join().expect("lead");
    assert_eq!(
        telemetry.udp.blocks.load(Ordering::Relaxed),
        datagrams as u64
    );
}

#[test]
fn a_flood_of_empty_datagrams_still_ends_a_batch() {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    for _ in 0..BATCH_DATAGRAMS + 10 {
        sender
            .send_to(b"", socket.local_addr().expect("addr"))
            .expect("send");
    }
    let mut batch = Batch::new();
    while !batch.is_full() && batch.recv(&socket, RecvFlags::DONTWAIT).is_ok() {}
    assert_eq!(batch.datagrams.len(), BATCH_DATAGRAMS);
    let mut buf = [0u8; 4];
    assert_eq!(socket.recv(&mut buf).expect("the rest wait"), 0);
}

#[test]
fn one_flows_datagrams_reach_every_workers_handle() {
    let sockets = bind("127.0.0.1:0".parse().expect("addr"), 2, 1 << 20).expect("bind");
    let addr = sockets[0].local_addr().expect("addr");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    for _ in 0..2 {
        sender.send_to(b"x:1|c", addr).expect("send");
    }
    // Both datagrams come from one source port; each worker's handle
    // can take one (with per-worker SO_REUSEPORT sockets, one worker
    // would have both and the other none).
    let mut buf = [0u8; 16];
    for s in &sockets {
        assert_eq!(s.recv(&mut buf).expect("a datagram for each worker"), 5);
    }
}
