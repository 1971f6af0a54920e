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
    js.create_key_value(kv::Config {
        bucket: name.clone(),
        history: 1,
        max_age,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot make or read the KV bucket {name}: {e}"))
}

/// The cuts of a stream's shards.
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
}

/// The leases of a stream's shards.
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
}
