//! One preallocated segment file, mapped into memory. The only `unsafe` of
//! the crate is here: mapping the file, and giving its pages back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapMut, UncheckedAdvice};

use super::format::{SEGMENT_HEADER, SegmentHeader};
use super::{WalError, io_err};

pub(super) struct Segment {
    pub path: PathBuf,
    pub header: SegmentHeader,
    /// False for a file that holds no valid header (never used yet).
    pub used: bool,
    /// Highest generation of any record in the segment (0: none).
    pub max_generation: u64,
    /// False after [`Segment::release_pages`] until the segment restarts.
    resident: bool,
    map: MmapMut,
    file: Arc<File>,
}

/// Writes `size` zero bytes at the file's position.
fn write_zeros(file: &mut File, size: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

impl Segment {
    /// Creates (or re-creates) the file at full size, its blocks really
    /// allocated, so that a full disk shows now, not as a fault on a later
    /// write through the map: `fallocate` reserves them (milliseconds for a
    /// 1 GiB WAL, where writing zeros took seconds, during which datagrams
    /// already queued on the bound sockets overflowed them); where the
    /// filesystem cannot, zeros are written. With a header it is the
    /// stream's current segment; without, it waits unused.
    pub fn create(
        path: &Path,
        size: u64,
        header: Option<SegmentHeader>,
    ) -> Result<Segment, WalError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
                write_zeros(&mut file, size).map_err(io_err(path))?
            }
            Err(e) => return Err(io_err(path)(e.into())),
        }
        file.sync_all().map_err(io_err(path))?;
        let mut seg = Segment::map(path, file)?;
        if let Some(h) = header {
            seg.restart(h);
        }
        Ok(seg)
    }

    /// Opens an existing segment of the right size, or creates it.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Segment, WalError> {
        let fits =
            std::fs::metadata(path).is_ok_and(|m| m.len() == size && size > SEGMENT_HEADER as u64);
        if !fits {
            return Segment::create(path, size, None);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut seg = Segment::map(path, file)?;
        if let Ok(h) = SegmentHeader::decode(seg.bytes()) {
            seg.header = h;
            seg.used = true;
        }
        Ok(seg)
    }

    /// Maps `file`; the segment starts unused until a header is read or written.
    fn map(path: &Path, file: File) -> Result<Segment, WalError> {
        // SAFETY: the file is tallyd's own, locked against other tallyd
        // processes (the WAL lock file), and never truncated while mapped, so
        // the mapping stays valid for as long as `Segment` holds it.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(path))?;
        Ok(Segment {
            path: path.to_owned(),
            header: SegmentHeader {
                stream: 0,
                sequence: 0,
            },
            used: false,
            max_generation: 0,
            resident: true,
            map,
            file: Arc::new(file),
        })
    }

    /// Starts the segment over with a new header: earlier records can no
    /// longer verify (their signature differs).
    pub fn restart(&mut self, header: SegmentHeader) {
        self.map[..SEGMENT_HEADER].copy_from_slice(&header.encode());
        self.map[SEGMENT_HEADER..SEGMENT_HEADER + 8].fill(0);
        self.header = header;
        self.used = true;
        self.max_generation = 0;
        self.resident = true;
    }

    /// Gives the mapping's pages back (`MADV_DONTNEED`), so that a segment
    /// whose records are all confirmed stops counting in tallyd's RSS (and
    /// a container's memory) until the ring comes round to it again. The
    /// data stays in the file: on a shared file mapping the kernel keeps
    /// dirty pages in the page cache for writeback, and the next access
    /// maps the page again from there.
    pub fn release_pages(&mut self) -> std::io::Result<()> {
        if !self.resident {
            return Ok(());
        }
        // SAFETY: `&mut self` means no borrow of the mapping's bytes is
        // alive. The mapping is a shared file mapping, where MADV_DONTNEED
        // only drops the page table entries: the bytes any later access
        // reads are the file's, the same as before the call.
        unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) }?;
        self.resident = false;
        Ok(())
    }

    /// Unmaps the `len` bytes from `offset` (`MADV_DONTNEED`, as
    /// [`Segment::release_pages`] does for a whole segment): pages the
    /// appends have left behind and will not write again. Their bytes stay
    /// in the page cache, dirty until the next sync writes them. A page
    /// still mapped writable when it is written back must be write-protected
    /// again, with a TLB shootdown to every core running tallyd (an
    /// inter-processor interrupt, per 4 KiB page); unmapped in one call per
    /// 256 KiB behind the appends, that is one shootdown per call.
    /// The mapping of recycled segments costs no resident memory either.
    /// `offset` and `len` are multiples of the page size.
    pub fn release_written(&mut self, offset: usize, len: usize) -> std::io::Result<()> {
        // SAFETY: as in `release_pages`: `&mut self` means no borrow of the
        // mapping's bytes is alive, and on a shared file mapping
        // MADV_DONTNEED only drops page table entries; a later access reads
        // the file's bytes, the same as before the call.
        unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len)
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// The file, to `fdatasync` it without holding the stream (the kernel
    /// writes back pages dirtied through the mapping too).
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Marks every page of the mapping dirty again by rewriting one byte of
    /// it with its own value, so that the next sync writes the whole segment
    /// even if a failed writeback left its pages marked clean.
    pub fn redirty(&mut self) {
        const PAGE: usize = 4096;
        for at in (0..self.map.len()).step_by(PAGE) {
            let b = self.map[at];
            // SAFETY: `at` is inside the mapping; a volatile write keeps the
            // compiler from eliding a store of the value just read.
            unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(at), b) };
        }
    }
}
