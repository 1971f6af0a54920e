//! Cuts and leases (docs/replication.md, format 1), in JetStream KV.
//!
//! - A **cut** says where a shard's interval ends (its last stream
//!   sequence) and when it starts. It is written to the bucket
//!   `<stream>_cuts`, key `shard.<n>`, before the interval is flushed. The
//!   write is a compare-and-set against the revision last read, so two
//!   tallyds that both believe they are active cannot both cut: the second
//!   is [`Written::Fenced`]. Safety rests on this.
//! - A **lease** says which tallyd should be working a shard (liveness). It
//!   lives in `<stream>_leases`, key `shard.<n>`, in a bucket whose
//!   `max_age` is the lease. It is taken with `create` (only if absent)
//!   and renewed with a compare-and-set; a key that is not renewed in time
//!   ages out, and a standby takes it.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

/// A shard's interval end, as stored (format 1, JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// The format: 1.
    pub v: u32,
    /// The interval's last stream sequence (inclusive).
    pub seq: u64,
    /// The interval's start, Unix milliseconds.
    pub start: u64,
    pub interval_ms: u64,
    /// Chunks of the shard's state after this interval, and the id of the
    /// attempt that wrote them (keys `state.<shard>.<seq>.<id>.<i>`,
    /// [`super::state::key`]).
    pub state: u32,
    pub state_id: u64,
    /// The state before it: the previous cut's `seq`, `state` and
    /// `state_id` (all 0 before the first cut: an empty state).
    pub base_seq: u64,
    pub base_state: u32,
    pub base_id: u64,
}

/// What a compare-and-set write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored, at this revision.
    Stored(u64),
    /// Another writer's came first: drop what was built on the old one.
    Fenced,
}

/// Whether an update lost its compare-and-set. async-nats 0.50 maps
/// JetStream's error 10071 to `WrongLastRevision`, but a clustered 2.11+
/// server answers a concurrent update with 10164 ("wrong last sequence"),
/// which it passes on as `Other`: both are a lost race.
fn lost(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision
        || (e.kind() == kv::UpdateErrorKind::Other && e.to_string().contains("wrong last sequence"))
}

fn key(shard: u32) -> String {
    format!("shard.{shard}")
}

async fn bucket(
    js: &jetstream::Context,
    name: String,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, String> {
    let config = kv::Config {
        bucket: name.clone(),
        history: 1,
        max_age,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let Ok(store) = js.get_key_value(&name).await else {
        return js
            .create_key_value(config)
            .await
            .map_err(|e| format!("cannot make the KV bucket {name}: {e}"));
    };
    // A bucket made under other settings (a changed lease or replica
    // count): brought to these.
    let mut stream = store.stream.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| format!("cannot read the KV bucket {name}: {e}"))?;
    if info.config.max_age != max_age || info.config.num_replicas != replicas {
        let mut updated = info.config.clone();
        updated.max_age = max_age;
        updated.num_replicas = replicas;
        js.update_stream(updated)
            .await
            .map_err(|e| format!("cannot update the KV bucket {name}: {e}"))?;
    }
    Ok(store)
}

/// The cuts of a stream's shards, and their states.
#[derive(Clone)]
pub struct Cuts(kv::Store);

impl Cuts {
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
    ) -> Result<Cuts, String> {
        bucket(js, format!("{stream}_cuts"), replicas, Duration::ZERO)
            .await
            .map(Cuts)
    }

    /// The shard's last cut and its revision; `None` before the first.
    pub async fn last(&self, shard: u32) -> Result<Option<(Cut, u64)>, String> {
        let Some(entry) = self.0.entry(key(shard)).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if entry.value.is_empty() {
            return Ok(None);
        }
        let cut: Cut = serde_json::from_slice(&entry.value)
            .map_err(|e| format!("shard {shard}'s cut does not decode: {e}"))?;
        Ok(Some((cut, entry.revision)))
    }

    /// Writes the shard's next cut, after the one at `revision` (`None`:
    /// the first).
    pub async fn write(
        &self,
        shard: u32,
        cut: Cut,
        revision: Option<u64>,
    ) -> Result<Written, String> {
        let value = serde_json::to_vec(&cut).map_err(|e| e.to_string())?.into();
        match revision {
            None => match self.0.create(key(shard), value).await {
                Ok(r) => Ok(Written::Stored(r)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Written::Fenced),
                Err(e) => Err(e.to_string()),
            },
            Some(rev) => match self.0.update(key(shard), value, rev).await {
                Ok(r) => Ok(Written::Stored(r)),
                Err(e) if lost(&e) => Ok(Written::Fenced),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Stores the shard's state as of stream sequence `seq` under the
    /// attempt `id`; returns its chunks. Written before the cut that names
    /// it, each chunk with `create`: never over another's.
    pub async fn put_state(
        &self,
        shard: u32,
        seq: u64,
        id: u64,
        state: &[u8],
    ) -> Result<u32, String> {
        let parts = super::state::chunks(state);
        for (i, part) in (0u32..).zip(&parts) {
            let key = super::state::key(shard, seq, id, i);
            self.0
                .create(&key, bytes::Bytes::copy_from_slice(part))
                .await
                .map_err(|e| format!("cannot store {key}: {e}"))?;
        }
        Ok(u32::try_from(parts.len()).unwrap_or(u32::MAX))
    }

    /// The shard's state as of `seq` by attempt `id`, in `chunks` chunks
    /// (none: empty).
    pub async fn state(
        &self,
        shard: u32,
        seq: u64,
        id: u64,
        chunks: u32,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for i in 0..chunks {
            let key = super::state::key(shard, seq, id, i);
            match self.0.get(&key).await {
                Ok(Some(part)) => out.extend_from_slice(&part),
                Ok(None) => return Err(format!("{key} is missing")),
                Err(e) => return Err(format!("cannot read {key}: {e}")),
            }
        }
        Ok(out)
    }

    /// Removes a state no cut needs any more, with one purge of its keys'
    /// subjects (which, unlike a KV delete, leaves no marker behind).
    /// Best effort: a leftover is only bytes.
    pub async fn drop_state(&self, shard: u32, seq: u64, id: u64) {
        let filter = format!(
            "$KV.{}.{}.>",
            self.0.name,
            super::state::prefix(shard, seq, id)
        );
        let _ = self.0.stream.purge().filter(filter).await;
    }
}

/// The leases of a stream's shards.
#[derive(Clone)]
pub struct Leases(kv::Store);

impl Leases {
    /// The bucket of leases that age out after `lease`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        lease: Duration,
    ) -> Result<Leases, String> {
        bucket(js, format!("{stream}_leases"), replicas, lease)
            .await
            .map(Leases)
    }

    /// Takes the shard's lease for `holder` if nobody holds it: its
    /// revision, or `None` while another holds it.
    pub async fn take(&self, shard: u32, holder: &str) -> Result<Option<u64>, String> {
        match self.0.create(key(shard), holder.to_owned().into()).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Renews a lease held at `revision`: the new revision, or `None` when
    /// it was lost (aged out and taken by another).
    pub async fn renew(
        &self,
        shard: u32,
        holder: &str,
        revision: u64,
    ) -> Result<Option<u64>, String> {
        match self
            .0
            .update(key(shard), holder.to_owned().into(), revision)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if lost(&e) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Gives a lease held at `revision` back, so that a standby need not
    /// wait for it to age out (at a stop). A lease lost meanwhile is left.
    pub async fn release(&self, shard: u32, revision: u64) {
        let _ = self
            .0
            .delete_expect_revision(key(shard), Some(revision))
            .await;
    }
}
