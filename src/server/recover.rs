//! Start-up phase 2: the ledger and the WAL recovered from the data dir
//! (off the tokio workers), and the replay of what they hold (see the
//! durable order in [`crate::ledger`]).

use super::*;

/// What start-up phase 2 recovered from the data dir.
pub(super) struct Opened {
    pub(super) ledger: Arc<Ledger>,
    pub(super) recovered: Recovered,
    pub(super) wal: Option<Arc<Wal>>,
    pub(super) recovery: Recovery,
}

/// Start-up phase 2: opens the ledger and the WAL (off the tokio workers)
/// and reads what they hold.
pub(super) async fn recover(config: &Config, fs: Arc<dyn Fs>) -> Result<Opened, StartError> {
    let data_dir_err = |source| StartError::DataDir {
        dir: config.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(data_dir_err)?;
    let (ledger, recovered) = {
        // The window in flushes at the configured interval.
        let flushes =
            config.proto.dedup_window.as_nanos() / config.flush_interval.as_nanos().max(1);
        let (dir, window, fs) = (
            config.data_dir.clone(),
            u64::try_from(flushes).unwrap_or(u64::MAX),
            Arc::clone(&fs),
        );
        let budget = config.spool_max_size;
        let max_clients = config.proto.max_clients;
        blocking(move || Ledger::open(&dir, window, max_clients, budget, fs))
            .await
            .and_then(|r| r)
            .map_err(data_dir_err)?
    };
    let stale = config.otlp.max_staleness.as_nanos() / config.flush_interval.as_nanos().max(1);
    ledger
        .temporality
        .set_window(u64::try_from(stale).unwrap_or(u64::MAX));
    let (wal, mut recovery) = match &config.wal {
        Some(wc) => {
            let (wc, fs) = (wc.clone(), Arc::clone(&fs));
            let (wal, recovery) =
                blocking(move || Wal::open_with(wc, fs))
                    .await
                    .map_err(|e| crate::wal::WalError::Io {
                        path: "(recovery thread)".into(),
                        source: e,
                    })??;
            (Some(Arc::new(wal)), recovery)
        }
        None => (
            None,
            Recovery {
                next_generation: 1,
                ..Recovery::default()
            },
        ),
    };
    let ledger = Arc::new(
        ledger
            .with_wal(wal.clone())
            .with_drain_batch(config.spool_drain_batch)
            .with_hard_limit(config.spool_hard_limit),
    );
    // Generations recorded in the spool before a crash are not rebuilt.
    if let Some(newest) = recovered.flushes.iter().map(|f| f.generation).max() {
        recovery.next_generation = recovery.next_generation.max(newest + 1);
    }
    Ok(Opened {
        ledger,
        recovered,
        wal,
        recovery,
    })
}

/// The keying of `digest` from the data dir (see [`super::keying`]);
/// `None` (logged) when it cannot be read.
async fn replayed_keying(
    ledger: &Ledger,
    digest: u64,
) -> Option<Arc<crate::aggregate::mapping::Keying>> {
    let (fs, dir) = (ledger.fs(), ledger.data_dir().to_owned());
    let loaded = super::blocking(move || super::keying::load(&*fs, &dir, digest))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match loaded {
        Ok(Some(k)) => Some(Arc::new(k)),
        Ok(None) | Err(_) => {
            let why = loaded.err().unwrap_or_else(|| "no such file".into());
            tracing::warn!(keying = format!("{digest:016x}"), %why, "the dialects and mapping rules of a replayed interval cannot be read; it is replayed under those in force");
            None
        }
    }
}

/// Queues the spooled flushes again (as they are), then rebuilds each WAL
/// generation that was not recorded and queues it (see the durable order in
/// [`crate::ledger`]).
pub(super) async fn replay(
    flusher: &mut Flusher,
    recovered: Recovered,
    recovery: Recovery,
    telemetry: &Telemetry,
    dedup: &crate::ledger::dedup::Dedup,
) -> std::io::Result<()> {
    let spooled: std::collections::BTreeSet<u64> =
        recovered.flushes.iter().map(|f| f.generation).collect();
    let hosts: std::collections::BTreeSet<&str> =
        recovered.flushes.iter().map(|f| f.host.as_str()).collect();
    if hosts.iter().any(|h| *h != flusher.host) {
        tracing::warn!(pending = ?hosts, configured = %flusher.host, "spooled flushes were recorded for another host_id; they are re-sent under the identity they were recorded with");
    }
    let started = std::time::Instant::now();
    // 1. Every protobuf batch in the WAL goes back into the dedup state, and
    //    the generations already in the spool are released; only then may
    //    the sink take spooled flushes (sending and completing one must not
    //    leave its generation in the WAL to be rebuilt).
    for r in &recovery.generations {
        for (kind, block) in &r.blocks {
            match kind {
                Kind::Proto => {
                    if let Some(batch) = decode_recorded(block) {
                        dedup.observe(batch.client_id, batch.sequence);
                    }
                }
                Kind::Otlp => {
                    for m in decode_otlp(block).map(|r| r.marks).unwrap_or_default() {
                        flusher.ledger.temporality.observe(m);
                    }
                }
                Kind::Statsd | Kind::Start => {}
            }
        }
        if spooled.contains(&r.generation) {
            flusher.release_checked(r.generation).await?;
        }
    }
    flusher.ledger.park_recovered();
    crate::ledger::publish_backlog(&flusher.ledger, telemetry);
    // 2. The other generations are rebuilt and flushed, oldest first.
    let mut stats = BlockStats::default();
    let mut scratch = Scratch::default();
    let count = recovery.generations.len();
    let mut keyings = std::collections::HashMap::new();
    for r in recovery.generations {
        if spooled.contains(&r.generation) {
            continue;
        }
        // The live start when the WAL has it: the same `ts` and `|T`
        // window as live.
        let started = r.started.unwrap_or((flusher.clock)());
        let mut generation = flusher.aggregator.generation(r.generation, started);
        generation.replayed = r.started.is_none();
        // The keying it was received under (see `keying`).
        if let Some(digest) = r.keying.filter(|d| *d != generation.keying.digest) {
            let keying = match keyings.get(&digest) {
                Some(k) => Option::clone(k),
                None => {
                    let k = replayed_keying(&flusher.ledger, digest).await;
                    keyings.insert(digest, k.clone());
                    k
                }
            };
            match keying {
                Some(k) => generation.keying = k,
                None => {
                    telemetry.keying_missing.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for (kind, block) in &r.blocks {
            match kind {
                Kind::Statsd => {
                    flusher
                        .aggregator
                        .apply_block(&generation, block, &mut scratch, &mut stats)
                }
                Kind::Start => {}
                Kind::Proto => {
                    if let Some(batch) = decode_recorded(block) {
                        flusher.aggregator.apply_batch(
                            &generation,
                            &batch,
                            &mut scratch,
                            &mut stats,
                        );
                    }
                }
                Kind::Otlp => {
                    let batches = decode_otlp(block).map(|r| r.batches).unwrap_or_default();
                    for b in batches {
                        if let Some(batch) = decode_recorded(&b) {
                            flusher.aggregator.apply_batch(
                                &generation,
                                &batch,
                                &mut scratch,
                                &mut stats,
                            );
                        }
                    }
                }
            }
        }
        flusher.flush_replayed(generation, r.intent).await?;
    }
    telemetry
        .replayed_samples
        .fetch_add(stats.samples, Ordering::Relaxed);
    // What the replay dropped (limits apply as to live traffic) is counted.
    for (counter, n) in [
        (&telemetry.dropped_memory, stats.dropped_memory),
        (&telemetry.dropped_key_limit, stats.dropped_key_limit),
        (&telemetry.dropped_set_members, stats.dropped_set_members),
        (&telemetry.dropped_mapping, stats.dropped_mapping),
    ] {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    if count > 0 || !spooled.is_empty() {
        tracing::info!(
            generations = count,
            spooled_flushes = recovered.flushes.len(),
            records = recovery.records,
            bytes = recovery.bytes,
            samples = stats.samples,
            dropped_memory = stats.dropped_memory,
            dropped_key_limit = stats.dropped_key_limit,
            took = ?started.elapsed(),
            "replayed the write-ahead log"
        );
    }
    Ok(())
}

/// A protobuf batch read back from the WAL.
fn decode_recorded(block: &[u8]) -> Option<BatchView<'_>> {
    match BatchView::decode(block) {
        Ok(batch) => Some(batch),
        // It decoded when it was accepted: only damage gets here.
        Err(e) => {
            tracing::error!(error = %e, "a protobuf batch in the WAL does not decode; skipped");
            None
        }
    }
}

/// A WAL record of an OTLP request (see [`crate::ingest::otlp::convert::Record`]).
fn decode_otlp(block: &[u8]) -> Option<crate::ingest::otlp::convert::Record> {
    match prost::Message::decode(block) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "an OTLP record in the WAL does not decode; skipped");
            None
        }
    }
}
