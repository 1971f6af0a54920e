//! Replicated ingest on NATS JetStream (docs/replication.md): being built
//! in steps. This step holds the check of the servers.
//!
//! - [`check`]: whether a server can hold what tallyd acknowledges (pure).
//! - [`publish`]: acknowledged batches to the stream (format 1).

pub mod check;
pub mod publish;
