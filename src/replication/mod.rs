//! Replicated ingest on NATS JetStream (docs/replication.md): being built
//! in steps. This step holds the check of the servers.
//!
//! - [`check`]: whether a server can hold what tallyd acknowledges (pure).
//! - [`publish`]: acknowledged batches to the stream (format 1).
//! - [`cut`]: cuts (the fence) and leases in JetStream KV.

pub mod check;
pub mod cut;
pub mod publish;
