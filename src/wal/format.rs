//! The on-disk format of WAL segments: pure encode / decode, no I/O.
//!
//! See the [module doc](super) for the layout. Every integer is
//! little-endian. Do not reorder fields: the byte offsets are the format.

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"TALLYWAL";
/// Format version; bump on any change to the layout.
pub const VERSION: u32 = 1;
/// Bytes of the segment header.
pub const SEGMENT_HEADER: usize = 32;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 24;
/// Records start (and are padded) at multiples of this.
pub const ALIGN: usize = 8;

/// What a record's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A block of StatsD lines (a datagram, or whole lines of a TCP read).
    Statsd = 1,
    /// One protobuf `Batch`, as received (without its length prefix).
    Proto = 2,
    /// When the generation started: 8 bytes of Unix seconds, 4 of
    /// nanoseconds, then 8 of the digest of its keying (its tag dialects
    /// and mapping rules, see `server::keying`; 0 for none) ([`encode_start`];
    /// releases before the keying wrote the first 12 bytes only). Written
    /// before the generation's first block (on whichever stream gets it),
    /// so that a replay gets the live interval start and makes the keys
    /// the live run made. A generation without one (a WAL of an earlier
    /// release) replays with the time of the replay and the keying in force.
    Start = 3,
    /// An OTLP request as tallyd converted it: a protobuf
    /// `ingest::otlp::Record` (the converted `Batch`es, one per host, and
    /// the new state of every OTLP series it moved, see
    /// [`crate::ledger::temporality`]).
    Otlp = 4,
}

/// The payload of a [`Kind::Start`] record.
pub fn encode_start(started: std::time::Duration, keying: u64) -> [u8; 20] {
    let mut out = [0; 20];
    out[..8].copy_from_slice(&started.as_secs().to_le_bytes());
    out[8..12].copy_from_slice(&started.subsec_nanos().to_le_bytes());
    out[12..].copy_from_slice(&keying.to_le_bytes());
    out
}

/// A [`Kind::Start`] payload back: the start, and the keying's digest
/// (`None` from an earlier release's 12 bytes); `None` if it is neither
/// 12 nor 20 bytes or the nanoseconds are out of range.
pub fn decode_start(b: &[u8]) -> Option<(std::time::Duration, Option<u64>)> {
    let secs = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let nanos = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?);
    let keying = match b.len() {
        12 => None,
        20 => Some(u64::from_le_bytes(b.get(12..20)?.try_into().ok()?)),
        _ => return None,
    };
    (nanos < 1_000_000_000).then(|| (std::time::Duration::new(secs, nanos), keying))
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Statsd),
            2 => Some(Kind::Proto),
            3 => Some(Kind::Start),
            4 => Some(Kind::Otlp),
            _ => None,
        }
    }
}

/// The header of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Which writer stream the segment belongs to.
    pub stream: u32,
    /// How many segments this stream had opened before this one (its use
    /// number): grows by one every time a segment file is (re)started, so a
    /// lap of the ring gives every reused file a new value.
    pub sequence: u64,
}

impl SegmentHeader {
    /// The seed mixed into every record CRC of this segment: a record from an
    /// earlier use of the file cannot verify under the current seed.
    pub fn signature(&self) -> u32 {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.stream.to_le_bytes());
        b[4..].copy_from_slice(&self.sequence.to_le_bytes());
        crc32c::crc32c(&b)
    }

    pub fn encode(&self) -> [u8; SEGMENT_HEADER] {
        let mut b = [0u8; SEGMENT_HEADER];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.stream.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        // 24..28 reserved (zero)
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if b.len() < SEGMENT_HEADER {
            return Err(HeaderError::Short);
        }
        if b[0..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        if u32_at(b, 28) != crc32c::crc32c(&b[..28]) {
            return Err(HeaderError::Checksum);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        Ok(SegmentHeader {
            stream: u32_at(b, 12),
            sequence: u64_at(b, 16),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file shorter than a segment header")]
    Short,
    #[error("not a tallyd WAL segment (bad magic)")]
    Magic,
    #[error("segment header checksum mismatch")]
    Checksum,
    #[error("unsupported WAL format version {0}")]
    Version(u32),
}

/// A record as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: u64,
    pub generation: u64,
    pub kind: Kind,
    pub payload: &'a [u8],
}

/// Bytes a record with `payload_len` bytes of payload takes, padding included.
pub fn record_len(payload_len: usize) -> usize {
    (RECORD_HEADER + payload_len).div_ceil(ALIGN) * ALIGN
}

/// Writes a record into `buf` (which must hold `record_len(payload.len())`
/// bytes) and returns the bytes written.
pub fn encode_record(
    buf: &mut [u8],
    signature: u32,
    lsn: u64,
    generation: u64,
    kind: Kind,
    payload: &[u8],
) -> usize {
    let len = record_len(payload.len());
    let b = &mut buf[..len];
    b[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    // 4..8: crc, filled last
    b[8..16].copy_from_slice(&lsn.to_le_bytes());
    b[16..23].copy_from_slice(&generation.to_le_bytes()[..7]);
    b[23] = kind as u8;
    b[RECORD_HEADER..RECORD_HEADER + payload.len()].copy_from_slice(payload);
    b[RECORD_HEADER + payload.len()..].fill(0);
    let crc = record_crc(signature, b, payload.len());
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    len
}

fn record_crc(signature: u32, b: &[u8], payload_len: usize) -> u32 {
    let crc = crc32c::crc32c_append(signature, &b[0..4]);
    crc32c::crc32c_append(crc, &b[8..RECORD_HEADER + payload_len])
}

/// What is at an offset of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record, and the offset of the next one.
    Record(Record<'a>, usize),
    /// Zero length: nothing was written here (end of the log in this
    /// segment, or the writer moved on to the next segment).
    End,
    /// Bytes that are not a valid record under this segment's signature: a
    /// torn write, a stale record of an earlier lap, or corruption.
    Invalid(Invalid),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The length runs past the end of the segment.
    Length,
    Checksum,
    Kind,
}

/// Decodes the record at `offset` of a segment's bytes.
pub fn decode_record(seg: &[u8], offset: usize, signature: u32) -> Decoded<'_> {
    if offset + RECORD_HEADER > seg.len() {
        return Decoded::End;
    }
    let b = &seg[offset..];
    let payload_len = u32_at(b, 0) as usize;
    if payload_len == 0 && u32_at(b, 4) == 0 {
        return Decoded::End;
    }
    let len = record_len(payload_len);
    if payload_len == 0 || len > b.len() {
        return Decoded::Invalid(Invalid::Length);
    }
    if u32_at(b, 4) != record_crc(signature, b, payload_len) {
        return Decoded::Invalid(Invalid::Checksum);
    }
    let Some(kind) = Kind::from_u8(b[23]) else {
        return Decoded::Invalid(Invalid::Kind);
    };
    let mut generation = [0u8; 8];
    generation[..7].copy_from_slice(&b[16..23]);
    Decoded::Record(
        Record {
            lsn: u64_at(b, 8),
            generation: u64::from_le_bytes(generation),
            kind,
            payload: &b[RECORD_HEADER..RECORD_HEADER + payload_len],
        },
        offset + len,
    )
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: u32 = 0x1234_5678;

    fn segment_with(records: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut seg = vec![0u8; 4096];
        let mut at = SEGMENT_HEADER;
        for &(lsn, generation, payload) in records {
            at += encode_record(&mut seg[at..], SIG, lsn, generation, Kind::Statsd, payload);
        }
        seg
    }

    fn read_all(seg: &[u8], sig: u32) -> (Vec<(u64, u64, Vec<u8>)>, Decoded<'_>) {
        let mut out = Vec::new();
        let mut at = SEGMENT_HEADER;
        loop {
            match decode_record(seg, at, sig) {
                Decoded::Record(r, next) => {
                    out.push((r.lsn, r.generation, r.payload.to_vec()));
                    at = next;
                }
                other => return (out, other),
            }
        }
    }

    #[test]
    fn records_round_trip() {
        let seg = segment_with(&[(1, 7, b"a:1|c\n"), (2, 7, b"b:2|c"), (3, 8, &[0xff; 100])]);
        let (records, end) = read_all(&seg, SIG);
        assert_eq!(
            records,
            vec![
                (1, 7, b"a:1|c\n".to_vec()),
                (2, 7, b"b:2|c".to_vec()),
                (3, 8, vec![0xff; 100])
            ]
        );
        assert_eq!(end, Decoded::End);
    }

    #[test]
    fn records_are_aligned() {
        assert_eq!(record_len(1), 32);
        assert_eq!(record_len(8), 32);
        assert_eq!(record_len(9), 40);
    }

    #[test]
    fn segment_header_round_trip_and_checks() {
        let h = SegmentHeader {
            stream: 3,
            sequence: 99,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::Magic));
        let mut bad = b;
        bad[16] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::Checksum));
        assert_eq!(SegmentHeader::decode(&b[..10]), Err(HeaderError::Short));
    }

    #[test]
    fn signatures_differ_per_lap_and_stream() {
        let a = SegmentHeader {
            stream: 0,
            sequence: 4,
        }
        .signature();
        assert_ne!(
            a,
            SegmentHeader {
                stream: 0,
                sequence: 8
            }
            .signature()
        );
        assert_ne!(
            a,
            SegmentHeader {
                stream: 1,
                sequence: 4
            }
            .signature()
        );
    }

    #[test]
    fn torn_tail_at_every_byte_offset_is_never_a_record() {
        let full = segment_with(&[(1, 1, b"first:1|c\n"), (2, 1, b"second:22|c\nthird:3|c\n")]);
        let first_len = record_len(10);
        for cut in 0..RECORD_HEADER + 22 {
            // The second record was written only up to `cut` bytes.
            let mut seg = full.clone();
            seg[SEGMENT_HEADER + first_len + cut..].fill(0);
            let (records, end) = read_all(&seg, SIG);
            assert_eq!(records.len(), 1, "cut at {cut}");
            assert!(
                matches!(end, Decoded::End | Decoded::Invalid(_)),
                "cut at {cut}: {end:?}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let seg = segment_with(&[(5, 2, b"x:1|c\n")]);
        let len = record_len(6);
        for byte in SEGMENT_HEADER..SEGMENT_HEADER + RECORD_HEADER + 6 {
            for bit in 0..8 {
                let mut bad = seg.clone();
                bad[byte] ^= 1 << bit;
                match decode_record(&bad, SEGMENT_HEADER, SIG) {
                    Decoded::Record(..) => panic!("flip at byte {byte} bit {bit} went unnoticed"),
                    Decoded::End | Decoded::Invalid(_) => {}
                }
            }
        }
        assert!(
            matches!(decode_record(&seg, SEGMENT_HEADER, SIG), Decoded::Record(_, n) if n == SEGMENT_HEADER + len)
        );
    }

    #[test]
    fn stale_record_from_an_earlier_lap_does_not_verify() {
        let old = SegmentHeader {
            stream: 0,
            sequence: 1,
        }
        .signature();
        let new = SegmentHeader {
            stream: 0,
            sequence: 5,
        }
        .signature();
        let mut seg = vec![0u8; 256];
        encode_record(
            &mut seg[SEGMENT_HEADER..],
            old,
            10,
            1,
            Kind::Statsd,
            b"old:1|c",
        );
        assert_eq!(
            decode_record(&seg, SEGMENT_HEADER, new),
            Decoded::Invalid(Invalid::Checksum)
        );
    }

    #[test]
    fn length_past_the_segment_is_invalid() {
        let mut seg = segment_with(&[(1, 1, b"a:1|c")]);
        seg[SEGMENT_HEADER..SEGMENT_HEADER + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_record(&seg, SEGMENT_HEADER, SIG),
            Decoded::Invalid(Invalid::Length)
        );
    }
}
