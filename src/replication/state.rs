//! A shard's state at a cut (docs/replication.md), format 1: what a
//! takeover needs besides the stream, namely the per-client
//! deduplication windows ([`crate::ledger::dedup`]) and the gauge memory
//! that gauge deltas resolve against ([`crate::outbox::gauges`]). Pure:
//! the consumer stores it in the cuts bucket, in chunks of [`CHUNK`]
//! bytes under the keys [`key`] names.
//!
//! ```text
//! 0   8  magic "TALLYRS1"
//! 8   4  CRC32C of bytes 12..end
//! 12  4  D: bytes of the deduplication state
//! 16  D  the deduplication state: the `dedup` file's text, version 3
//! …      the gauge memory: a `gauges.log`, version 1, to the end
//! ```
//!
//! Integers are little-endian.

const MAGIC: &[u8; 8] = b"TALLYRS1";

/// Bytes of one chunk: a KV value stays well under a NATS server's
/// default `max_payload` (1 MiB).
pub const CHUNK: usize = 256 << 10;

/// The KV key of chunk `i` of shard `shard`'s state as of stream sequence
/// `seq`, written by the attempt `id` (a random number each cut draws, so
/// that two tallyds cutting at one sequence never write one key).
pub fn key(shard: u32, seq: u64, id: u64, i: u32) -> String {
    format!("{}.{i}", prefix(shard, seq, id))
}

/// What every chunk key of that state starts with (before `.<i>`).
pub fn prefix(shard: u32, seq: u64, id: u64) -> String {
    format!("state.{shard}.{seq}.{id:016x}")
}

/// A number for [`key`]'s `id`, from the process's random hash keys.
pub fn attempt_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The state's bytes.
pub fn encode(dedup: &str, gauges: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + dedup.len() + gauges.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 4]);
    let len = u32::try_from(dedup.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&dedup.as_bytes()[..len as usize]);
    out.extend_from_slice(gauges);
    let crc = crc32c::crc32c(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The deduplication text and the gauge log of `b`, or why it is not a
/// state of this format.
pub fn decode(b: &[u8]) -> Result<(String, Vec<u8>), String> {
    if b.len() < 16 || &b[..8] != MAGIC {
        return Err("not a tallyd shard state (bad magic)".into());
    }
    let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if crc32c::crc32c(&b[12..]) != crc {
        return Err("a shard state whose checksum does not match".into());
    }
    let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
    let dedup = b
        .get(16..16usize.saturating_add(len))
        .ok_or("a shard state shorter than its deduplication part")?;
    let dedup = String::from_utf8(dedup.to_vec()).map_err(|_| "a deduplication state not UTF-8")?;
    Ok((dedup, b[16 + len..].to_vec()))
}

/// `b` in chunks of at most [`CHUNK`] bytes: at least one.
pub fn chunks(b: &[u8]) -> Vec<&[u8]> {
    if b.is_empty() {
        return vec![b];
    }
    b.chunks(CHUNK).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reads_back_as_written_and_a_changed_byte_is_refused() {
        let b = encode("tallyd-dedup 3\nnow 4\n", b"gauges");
        assert_eq!(
            decode(&b),
            Ok(("tallyd-dedup 3\nnow 4\n".to_owned(), b"gauges".to_vec()))
        );
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("checksum"));
        assert!(decode(&b[..10]).unwrap_err().contains("magic"));
    }

    #[test]
    fn a_large_state_is_cut_into_chunks_that_join_back() {
        let gauges = vec![7u8; 2 * CHUNK + 5];
        let b = encode("", &gauges);
        let parts = chunks(&b);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() <= CHUNK));
        assert_eq!(parts.concat(), b);
        assert_eq!(chunks(&[]).len(), 1);
        assert_eq!(key(2, 90, 0xab, 1), "state.2.90.00000000000000ab.1");
        assert_ne!(attempt_id(), attempt_id());
    }
}
