//! Batched O_DIRECT writes into a store (a volume's backing store with [`Cache::Bypass`]):
//! writeback queues the aligned writes of a run of durable records, copied into one aligned
//! staging buffer, and submits them together through io_uring, so the disk sees them at queue
//! depth instead of one at a time.
//!
//! Why not the page cache: every 4 KiB buffered write into a file that is not cached
//! allocates and fills a new page, and a write into a large folio (left by readahead of any
//! buffered reader of the file) walks all of the folio's buffer heads; writeback was the
//! source's costliest thread. Records that do not fit the alignment (512-byte sectors, a
//! write-zeroes, a discard) go through the page cache after the queue is flushed; Linux keeps
//! the two coherent (a direct write flushes and drops cached pages of its range, a direct
//! read flushes dirty ones first).
//!
//! [`Cache::Bypass`]: super::Cache::Bypass

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::{opcode, types, IoUring};

use super::Store;
use crate::extent::Extent;
use crate::fsutil::{AlignedBuffer, DIRECT_ALIGN};

/// Writes submitted together at most (the ring's size).
pub const DIRECT_QUEUE: usize = 64;
/// Bytes staged for one submission at most; a larger write goes through the page cache.
const STAGING_BYTES: usize = 8 << 20;

/// A write waiting in the staging buffer.
struct Queued {
    extent: Extent,
    staged_at: usize,
}

pub struct DirectWriter {
    // Dropped first: the ring is closed before the buffer its writes read from is freed.
    ring: IoUring,
    staging: AlignedBuffer,
    queued: Vec<Queued>,
    staged: usize,
}

impl DirectWriter {
    pub(super) fn new() -> io::Result<DirectWriter> {
        Ok(DirectWriter {
            ring: IoUring::new(DIRECT_QUEUE as u32)?,
            staging: AlignedBuffer::new(STAGING_BYTES),
            queued: Vec::with_capacity(DIRECT_QUEUE),
            staged: 0,
        })
    }

    /// Whether a write of `extent` can go direct at all: offset and length aligned, and no
    /// larger than the staging buffer.
    pub fn fits(extent: Extent) -> bool {
        let align = DIRECT_ALIGN as u64;
        extent.length > 0 && extent.offset.is_multiple_of(align) && extent.length.is_multiple_of(align) && extent.length <= STAGING_BYTES as u64
    }

    /// Queues a write of `payload` (exactly `extent`, which [`DirectWriter::fits`]). `false`,
    /// with nothing queued, when it must wait for a flush: the queue or the staging buffer is
    /// full, or it overlaps a queued write (io_uring completes writes in any order, so two to
    /// the same bytes in one submission could land in the wrong order).
    pub fn queue(&mut self, extent: Extent, payload: &[u8]) -> bool {
        let length = payload.len();
        debug_assert!(DirectWriter::fits(extent) && length as u64 == extent.length);
        let overlaps = self.queued.iter().any(|queued| queued.extent.intersection(&extent).is_some());
        if self.queued.len() == DIRECT_QUEUE || self.staged + length > STAGING_BYTES || overlaps {
            return false;
        }
        self.staging[self.staged..self.staged + length].copy_from_slice(payload);
        self.queued.push(Queued { extent, staged_at: self.staged });
        self.staged += length;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Writes everything queued into `store` and waits for all of it. The queue is empty
    /// afterwards, also after an error (the first one is returned).
    pub fn flush(&mut self, store: &Store) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let result = self.submit_all(store);
        self.queued.clear();
        self.staged = 0;
        result
    }

    fn submit_all(&mut self, store: &Store) -> io::Result<()> {
        store.write_fault()?;
        let Some(direct) = store.direct.as_ref() else { return Err(io::Error::other("the store has no O_DIRECT descriptor")) };
        let fd = types::Fd(direct.as_raw_fd());
        {
            let mut submission = self.ring.submission();
            for (index, queued) in self.queued.iter().enumerate() {
                // SAFETY: the staging buffer is not touched until every write is reaped below,
                // and it outlives the ring (field order). If waiting fails, the volume fails,
                // and the journal redoes these records at its next start.
                let entry = opcode::Write::new(fd, unsafe { self.staging.as_ptr().add(queued.staged_at) }, queued.extent.length as u32)
                    .offset(queued.extent.offset)
                    .build()
                    .user_data(index as u64);
                // SAFETY: as above, for the buffer; the file outlives the call (borrowed from
                // `store` for all of it).
                unsafe { submission.push(&entry) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
        }
        let mut first_error = None;
        let mut short = Vec::new();
        let mut reaped = 0;
        while reaped < self.queued.len() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(error) => return Err(error),
            }
            for completion in self.ring.completion() {
                reaped += 1;
                let index = completion.user_data() as usize;
                let result = completion.result();
                match self.queued.get(index) {
                    Some(_) if result < 0 => {
                        first_error.get_or_insert(io::Error::from_raw_os_error(-result));
                    }
                    Some(queued) if (result as u64) < queued.extent.length => short.push((index, result as usize)),
                    _ => {}
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        // A short write (a disk filling up) is finished through the page cache: its rest need
        // not be aligned, and an error then is the disk's.
        for (index, done) in short {
            let queued = &self.queued[index];
            let rest = &self.staging[queued.staged_at + done..queued.staged_at + queued.extent.length as usize];
            store.file.write_all_at(rest, queued.extent.offset + done as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cache;
    use super::*;
    use crate::journal::RecordKind;

    #[test]
    fn queued_writes_land_in_order_and_overlaps_wait_for_a_flush() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("direct.img");
        Store::create_sparse(&path, 1 << 20).unwrap();
        let store = Store::open_with(&path, "image", Cache::Bypass).unwrap();
        let mut writer = store.direct_writer().unwrap().expect("this file system takes O_DIRECT");
        assert!(!DirectWriter::fits(Extent::new(512, 4096)) && !DirectWriter::fits(Extent::new(0, 1000)) && !DirectWriter::fits(Extent::new(0, 0)));
        assert!(writer.queue(Extent::new(0, 4096), &[1u8; 4096]));
        assert!(writer.queue(Extent::new(8192, 8192), &[2u8; 8192]));
        // Overlapping a queued write: refused until the flush.
        assert!(!writer.queue(Extent::new(12288, 4096), &[3u8; 4096]));
        writer.flush(&store).unwrap();
        assert!(writer.is_empty());
        assert!(writer.queue(Extent::new(12288, 4096), &[3u8; 4096]));
        for i in 0..DIRECT_QUEUE - 1 {
            assert!(writer.queue(Extent::new((32 + i as u64) * 4096, 4096), &[i as u8; 4096]), "write {i}");
        }
        assert!(!writer.queue(Extent::new(200 * 4096, 4096), &[9u8; 4096]), "the queue is full");
        writer.flush(&store).unwrap();
        let mut read = vec![0u8; 1 << 20];
        store.read_exact_at(&mut read, 0).unwrap();
        assert!(read[..4096].iter().all(|&b| b == 1));
        assert!(read[4096..8192].iter().all(|&b| b == 0));
        assert!(read[8192..12288].iter().all(|&b| b == 2));
        assert!(read[12288..16384].iter().all(|&b| b == 3));
        for i in 0..DIRECT_QUEUE - 1 {
            let at = (32 + i) * 4096;
            assert!(read[at..at + 4096].iter().all(|&b| b == i as u8), "write {i}");
        }
        // A buffered write beside direct ones reads back through a direct read.
        store.apply(RecordKind::Write, Extent::new(100, 3), &[b"abc"]).unwrap();
        let mut small = [0u8; 8];
        store.read_exact_at(&mut small, 98).unwrap();
        assert_eq!(&small, b"\x01\x01abc\x01\x01\x01");
    }
}
