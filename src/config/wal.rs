//! The write-ahead log's settings: `[wal]` checked into a
//! [`WalConfig`], and `wal.size` laid out in streams and segments
//! ([`wal_geometry`]).

use std::path::PathBuf;

use super::{ConfigError, Settings, duration, err, size, size_of};
use crate::wal::{SyncMode, WalConfig};

impl Settings {
    /// `[wal]` checked, for `udp_workers` UDP workers and protobuf frames
    /// of up to `max_frame` bytes: the WAL's config (`None` when it is off)
    /// and how many UDP streams it has room for (see [`wal_geometry`]).
    /// Errors name the field.
    pub(super) fn wal_config(
        &self,
        udp_workers: usize,
        max_frame: u64,
    ) -> Result<(Option<WalConfig>, usize), ConfigError> {
        let w = &self.wal;
        if !w.enabled {
            return Ok((None, udp_workers.max(1)));
        }
        let size = size("wal.size", &w.size)? as u64;
        let segment_size = size_of("wal.segment_size", &w.segment_size)?;
        // A TCP read or a UDP datagram (64 KiB at most) is one record: it
        // must fit a segment, or it would be refused and dropped.
        let least =
            (crate::wal::format::SEGMENT_HEADER + crate::wal::format::record_len(64 * 1024) + 8)
                .next_multiple_of(4096) as u64;
        if segment_size < least {
            return Err(err(
                "wal.segment_size",
                format!(
                    "must be at least {} (a TCP read or a UDP datagram, up to 64 KiB, is one record and must fit a segment)",
                    bytesize::ByteSize(least)
                ),
            ));
        }
        if w.tcp_streams == 0 {
            return Err(err("wal.tcp_streams", "must be at least 1"));
        }
        let g = wal_geometry(
            size,
            segment_size,
            max_frame,
            udp_workers as u64,
            u64::from(w.tcp_streams),
        )
        .map_err(|why| err("wal.size", format!("{} {why}", w.size)))?;
        let sync = match w.sync.as_str() {
            "never" => SyncMode::Never,
            "interval" => SyncMode::Interval,
            "always" => SyncMode::Always,
            other => {
                return Err(err(
                    "wal.sync",
                    format!("{other:?} is not one of never, interval, always"),
                ));
            }
        };
        let config = WalConfig {
            dir: PathBuf::from(&self.data_dir).join("wal"),
            streams: g.streams,
            segments_per_stream: g.segments_per_stream,
            segment_size: g.segment_size,
            sync,
            sync_interval: duration("wal.sync_interval", &w.sync_interval)?,
            skip_corrupt: w.skip_corrupt,
        };
        Ok((Some(config), g.udp_streams as usize))
    }
}

/// How `wal.size` is laid out (see [`wal_geometry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalGeometry {
    pub streams: u32,
    pub udp_streams: u32,
    pub segment_size: u64,
    pub segments_per_stream: u32,
}

/// Lays `size` bytes of WAL out for `udp_workers` UDP workers and
/// `tcp_streams` TCP streams, whatever the core count: the total is always
/// at most `size`.
///
/// 1. One stream per UDP worker plus `tcp_streams` is wanted, with 4
///    segments each.
/// 2. The segment size shrinks from `segment_size` to fit that, but not
///    below what the largest protobuf batch needs (`max_frame` + 64 KiB,
///    unless `segment_size` is smaller still), in steps of 64 KiB.
/// 3. If the streams still do not fit with 2 segments each, there are
///    fewer UDP streams and UDP workers share them (`i % udp_streams`).
///
/// Errors (a reason) when not even one UDP stream fits beside the TCP ones.
pub fn wal_geometry(
    size: u64,
    segment_size: u64,
    max_frame: u64,
    udp_workers: u64,
    tcp_streams: u64,
) -> Result<WalGeometry, String> {
    const STEP: u64 = 64 * 1024;
    let wanted = udp_workers.max(1).saturating_add(tcp_streams);
    let floor = max_frame
        .saturating_add(STEP)
        .div_ceil(STEP)
        .saturating_mul(STEP);
    let floor = floor.min(segment_size);
    let fit = size / wanted.saturating_mul(4) / STEP * STEP;
    let seg = fit.clamp(floor, segment_size);
    let streams = wanted.min(size / seg.saturating_mul(2));
    if streams <= tcp_streams {
        return Err(format!(
            "holds fewer than 2 segments of {} for each of {} streams (one UDP stream and wal.tcp_streams); give it at least {}",
            bytesize::ByteSize(seg),
            tcp_streams + 1,
            bytesize::ByteSize(seg.saturating_mul(2).saturating_mul(tcp_streams + 1)),
        ));
    }
    let to_u32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(WalGeometry {
        streams: to_u32(streams),
        udp_streams: to_u32(streams - tcp_streams),
        segment_size: seg,
        segments_per_stream: to_u32(size / seg / streams),
    })
}
