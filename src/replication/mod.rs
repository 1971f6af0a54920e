//! Replicated ingest on NATS JetStream (docs/replication.md): an
//! acknowledged batch is stored by a quorum of the stream's servers before
//! `OK`, and the tallyd holding its shard's lease aggregates it from there.
//!
//! - [`check`]: whether a server can hold what tallyd acknowledges (pure).
//! - [`publish`]: acknowledged batches to the stream (format 1).
//! - [`link`]: the servers checked and the stream reached, at start and
//!   after, until it is usable.
//! - [`cut`]: cuts (the fence), shard states and leases in JetStream KV.
//! - [`state`]: a shard's state at a cut, its bytes (pure).
//! - [`shard`]: a shard's state between cuts, loaded and snapshotted.
//! - [`consume`]: aggregation from the stream, and its durable order.

pub mod check;
pub mod consume;
pub mod cut;
pub mod link;
pub mod publish;
pub mod shard;
pub mod state;
