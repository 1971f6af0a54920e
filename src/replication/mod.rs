//! Replicated ingest on NATS JetStream (docs/replication.md): being built
//! in steps. This step holds the check of the servers.
//!
//! - [`check`]: whether a server can hold what tallyd acknowledges (pure).

pub mod check;
