//! Ingest: sockets only. Each listener reads blocks of bytes (a datagram, a
//! TCP read of whole lines) and hands them to
//! [`Aggregator::ingest_block`](crate::aggregate::Aggregator::ingest_block);
//! parsing and aggregation live elsewhere.
//!
//! - [`udp`]: `SO_REUSEPORT` sockets, one blocking receive thread each.
//! - [`tcp`]: tokio tasks, newline framing, line and connection limits.
//! - [`proto`]: protobuf batches over TCP (acknowledged) and UDP.
//! - [`dedup`]: `(client_id, sequence)` idempotency for protobuf batches.

pub mod dedup;
pub mod proto;
pub mod tcp;
pub mod udp;
