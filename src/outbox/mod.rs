//! The outbox: a closed interval on its way to ClickHouse, and everything
//! that shapes it, with no I/O. The ledger ([`crate::ledger`]) persists
//! what this module makes and the sink ([`crate::sink`]) only transports it.
//!
//! - [`rows`]: a closed generation turned into one row per key and table
//!   ([`rows::build`]);
//! - [`merge`]: two unsent flushes folded into one ([`merge::flushes`]);
//! - [`rowbinary`]: the RowBinary codec of those rows (the exact bytes of
//!   each INSERT body);
//! - [`flush`]: the flush ([`flush::Flush`]): bodies, identity and
//!   deduplication token, concatenation, and its persisted form;
//! - [`gauges`]: gauge memory, which gauge deltas resolve against, and its
//!   persisted form.

pub mod flush;
pub mod gauges;
pub mod merge;
pub mod rowbinary;
pub mod rows;
