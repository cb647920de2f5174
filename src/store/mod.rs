//! A store: the file or block device that holds a device's bytes — a volume's backing store
//! or a replica's image. The one definition of what each record kind does to device bytes,
//! of durability (sync) and of the chunk hashes both ends of a synchronisation compare.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::extent::Extent;
use crate::fsutil::{self, AlignedBuffer};
use crate::journal::RecordKind;

mod direct;
pub use direct::{DirectWriter, DIRECT_QUEUE};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("{what} {path} is {actual} bytes but the volume is {expected} bytes")]
    SizeMismatch { what: &'static str, path: PathBuf, actual: u64, expected: u64 },
    #[error("{what} {path} is neither a regular file nor a block device")]
    NotStorage { what: &'static str, path: PathBuf },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

/// Device bytes that can only be read (a replica snapshot, served read-only by a frontend).
pub trait ReadView: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Whether a store's reads and writes go through the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Buffered reads and writes (a replica image: the applier writes it with `pwritev`).
    PageCache,
    /// Reads with O_DIRECT (a volume's backing store: the guest caches what it needs, and the
    /// backing file's page cache only cost), and a [`DirectWriter`] for whoever wants its
    /// aligned writes to bypass the page cache too (`backing_writes = "direct"`). Falls back
    /// to the page cache where the file system refuses O_DIRECT.
    Bypass,
}

/// An open store, read and written at byte offsets.
#[derive(Debug)]
pub struct Store {
    file: File,
    /// The same file opened with O_DIRECT, where the file system allows it: for bulk scans
    /// (`read_for_scan`) always, and with [`Cache::Bypass`] for every read and for the
    /// writes a [`DirectWriter`] queues.
    direct: Option<File>,
    cache: Cache,
    path: PathBuf,
    size: u64,
    is_device: bool,
    /// Failpoint prefixes for injected disk errors: (writes and syncs, reads).
    faults: Option<(&'static str, &'static str)>,
}

/// Which failpoints inject disk errors into a store, by what it is.
fn fault_ops(what: &str) -> Option<(&'static str, &'static str)> {
    match what {
        "backing store" => Some(("backing-write", "backing-read")),
        "replica image" => Some(("replica-image", "replica-image-read")),
        _ => None,
    }
}

/// The disk error the failpoints of `op` inject now, if any.
fn injected(op: Option<&'static str>) -> io::Result<()> {
    match op.and_then(crate::failpoint::disk_error) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

impl Store {
    /// Opens an existing file or block device for reading and writing. `what` names it in
    /// errors ("backing store", "replica image").
    pub fn open(path: &Path, what: &'static str) -> Result<Store, StoreError> {
        Store::open_with(path, what, Cache::PageCache)
    }

    /// [`Store::open`] with the given cache mode.
    pub fn open_with(path: &Path, what: &'static str, cache: Cache) -> Result<Store, StoreError> {
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing { what, path: path.to_path_buf() }),
            Err(source) => return Err(StoreError::Io { context: format!("open {what} {}", path.display()), source }),
        };
        let io_error = |source| StoreError::Io { context: format!("size of {}", path.display()), source };
        let meta = file.metadata().map_err(io_error)?;
        let is_device = fsutil::is_block_device(&file).map_err(io_error)?;
        if !meta.is_file() && !is_device {
            return Err(StoreError::NotStorage { what, path: path.to_path_buf() });
        }
        let size = fsutil::storage_size(&file).map_err(io_error)?;
        let direct = fsutil::open_direct(path).unwrap_or_else(|error| {
            tracing::debug!(path = %path.display(), %error, "no O_DIRECT descriptor: scans go through the page cache");
            None
        });
        if direct.is_none() && cache == Cache::Bypass {
            tracing::info!(path = %path.display(), "the file system refuses O_DIRECT: {what} reads and writes go through the page cache");
        }
        Ok(Store { file, direct, cache, path: path.to_path_buf(), size, is_device, faults: fault_ops(what) })
    }

    /// [`Store::open`], refusing a store that is not exactly `expected` bytes.
    pub fn open_sized(path: &Path, what: &'static str, expected: u64) -> Result<Store, StoreError> {
        Store::open_sized_with(path, what, expected, Cache::PageCache)
    }

    /// [`Store::open_sized`] with the given cache mode.
    pub fn open_sized_with(path: &Path, what: &'static str, expected: u64, cache: Cache) -> Result<Store, StoreError> {
        let store = Store::open_with(path, what, cache)?;
        if store.size != expected {
            return Err(StoreError::SizeMismatch { what, path: path.to_path_buf(), actual: store.size, expected });
        }
        Ok(store)
    }

    /// Creates a sparse file of `size` bytes (it must not exist) and makes it durable.
    pub fn create_sparse(path: &Path, size: u64) -> Result<(), StoreError> {
        let io_error = |context: &str| {
            let context = format!("{context} {}", path.display());
            move |source| StoreError::Io { context, source }
        };
        let file = crate::permissions::private_options().write(true).create_new(true).open(path).map_err(io_error("create"))?;
        file.set_len(size).map_err(io_error("size"))?;
        file.sync_all().map_err(io_error("sync"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_device(&self) -> bool {
        self.is_device
    }

    /// An injected write (or sync) error, if a failpoint says so.
    fn write_fault(&self) -> io::Result<()> {
        injected(self.faults.map(|(write, _)| write))
    }

    fn read_fault(&self) -> io::Result<()> {
        injected(self.faults.map(|(_, read)| read))
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_fault()?;
        match self.bypass() {
            Some(direct) => fsutil::read_direct_exact_at(direct, buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    /// The O_DIRECT descriptor when this store bypasses the page cache.
    fn bypass(&self) -> Option<&File> {
        self.direct.as_ref().filter(|_| self.cache == Cache::Bypass)
    }

    /// A batch writer for this store's aligned writes, when it bypasses the page cache.
    pub fn direct_writer(&self) -> io::Result<Option<DirectWriter>> {
        match self.bypass() {
            Some(_) => DirectWriter::new().map(Some),
            None => Ok(None),
        }
    }

    /// Reads `buf.len()` bytes at `offset` for a bulk scan (a synchronisation): when
    /// `hole_allowed` and the range is a hole of a file, `buf` is zeroed without reading and
    /// the result is true; otherwise the bytes are read with O_DIRECT, past the page cache
    /// (or, where the file system refuses O_DIRECT, read and dropped from it afterwards).
    /// Reading holes would fill the page cache with zero pages that make later small writes
    /// to them expensive. Buffered reads dropped chunk by chunk were as bad: readahead builds
    /// large folios that straddle the chunks, `POSIX_FADV_DONTNEED` of one chunk cannot drop
    /// a folio it only partly covers, and every later 4 KiB write into such a folio walks all
    /// its buffer heads (`ext4_block_write_begin`): after an initial synchronisation of a
    /// 2 GiB volume, 4 KiB random writes through NBD fell from 75k to 16k IOPS.
    pub fn read_for_scan(&self, buf: &mut [u8], offset: u64, hole_allowed: bool) -> io::Result<bool> {
        self.read_fault()?;
        let length = buf.len() as u64;
        if hole_allowed && !self.is_device && fsutil::is_hole(&self.file, offset, length) {
            buf.fill(0);
            return Ok(true);
        }
        match &self.direct {
            Some(direct) => fsutil::read_direct_exact_at(direct, buf, offset)?,
            None => {
                self.file.read_exact_at(buf, offset)?;
                fsutil::drop_from_cache(&self.file, offset, length);
            }
        }
        Ok(false)
    }

    /// Copies `extent` of `source` to the same offset of this store, `bounce.len()` bytes at a
    /// time, past the page cache on both sides where both take O_DIRECT and the extent is
    /// aligned; through the page cache otherwise. For bulk copies (a resync's commit): every
    /// buffered write into an uncached file allocates and fills a new page-cache page, which
    /// on this project's VMs made the copy of a 2 GiB stage CPU-bound in
    /// `copy_folio_from_iter_atomic` (91% of its time, 13 s).
    pub fn copy_from(&self, source: &Store, extent: Extent, bounce: &mut AlignedBuffer) -> io::Result<()> {
        self.write_fault()?;
        source.read_fault()?;
        let align = fsutil::DIRECT_ALIGN as u64;
        let aligned = extent.offset.is_multiple_of(align) && extent.length.is_multiple_of(align);
        let mut done = 0u64;
        while done < extent.length {
            let length = (extent.length - done).min(bounce.len() as u64) as usize;
            let piece = &mut bounce[..length];
            let at = extent.offset + done;
            let direct = match (&source.direct, &self.direct) {
                (Some(from), Some(to)) if aligned => from.read_exact_at(piece, at).and_then(|()| to.write_all_at(piece, at)),
                _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
            match direct {
                Ok(()) => {}
                // Storage that wants a larger alignment (or a short direct write that left a
                // misaligned rest): this piece through the page cache.
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    source.file.read_exact_at(piece, at)?;
                    fsutil::drop_from_cache(&source.file, at, piece.len() as u64);
                    self.file.write_all_at(piece, at)?;
                }
                Err(error) => return Err(error),
            }
            done += piece.len() as u64;
        }
        Ok(())
    }

    /// True when `extent` is a hole of this file (reads as zeros, holds no data); never for a
    /// block device.
    pub fn is_hole(&self, extent: Extent) -> bool {
        !self.is_device && fsutil::is_hole(&self.file, extent.offset, extent.length)
    }

    /// Applies one record's effect: a write's payload (in one piece or several, as received
    /// from the network), zeros, or a discard (reads as zeros afterwards); a marker changes
    /// nothing.
    pub fn apply(&self, kind: RecordKind, extent: Extent, payload: &[impl AsRef<[u8]>]) -> io::Result<()> {
        self.write_fault()?;
        match kind {
            RecordKind::Write => match payload {
                [single] => self.file.write_all_at(single.as_ref(), extent.offset),
                parts => fsutil::write_all_vectored_at(&self.file, parts, extent.offset),
            },
            RecordKind::WriteZeroes => self.zero(extent, false),
            RecordKind::Discard => self.zero(extent, true),
            RecordKind::Marker => Ok(()),
            // Ranges are taken apart by the applier (`replica::range`), piece by piece.
            RecordKind::Range | RecordKind::Covered => Err(io::Error::new(io::ErrorKind::InvalidInput, "a range record is applied piece by piece")),
        }
    }

    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_fault()?;
        self.file.write_all_at(data, offset)
    }

    /// Writes bulk data (a synchronisation's chunk) past the page cache where this store
    /// takes O_DIRECT and the write is aligned; through the page cache otherwise. Buffered,
    /// every byte into an uncached file fills a newly allocated page-cache page, which on
    /// this project's VMs cost more than the copy itself (see [`Store::copy_from`]).
    pub fn write_bulk_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_fault()?;
        let align = fsutil::DIRECT_ALIGN as u64;
        match &self.direct {
            Some(direct) if offset.is_multiple_of(align) && (data.len() as u64).is_multiple_of(align) => {
                match fsutil::write_direct_all_at(direct, data, offset) {
                    // Storage that wants a larger alignment: through the page cache.
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => self.file.write_all_at(data, offset),
                    result => result,
                }
            }
            _ => self.file.write_all_at(data, offset),
        }
    }

    /// Starts writing this file's dirty pages out and frees those already written (clean),
    /// without waiting: a file filled through the page cache (a resync's stage) does not
    /// leave gigabytes for its final sync to write at once and for its close to free. Best
    /// effort (a file system may keep its pages, as tmpfs does).
    pub fn release_written(&self) {
        fsutil::drop_from_cache(&self.file, 0, 0);
    }

    /// Makes `extent` read as zero; `punch` frees the space (discard).
    pub fn zero(&self, extent: Extent, punch: bool) -> io::Result<()> {
        fsutil::zero_range(&self.file, extent.offset, extent.length, punch, self.is_device)
    }

    /// Makes every write so far durable (fdatasync).
    pub fn sync_data(&self) -> io::Result<()> {
        self.write_fault()?;
        self.file.sync_data()
    }

    /// Makes every write and the file's metadata durable (fsync).
    pub fn sync_all(&self) -> io::Result<()> {
        self.write_fault()?;
        self.file.sync_all()
    }
}

/// The hash both ends of a synchronisation compare for one chunk (BLAKE3). `hole`: the chunk
/// was found to be a hole, so its bytes are zeros and need not be hashed.
pub fn chunk_hash(data: &[u8], hole: bool) -> [u8; 32] {
    if hole {
        zero_chunk_hash(data.len())
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// BLAKE3 of `length` zero bytes; the common chunk sizes' hashes are computed once.
pub fn zero_chunk_hash(length: usize) -> [u8; 32] {
    static MIB: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if length == 1 << 20 {
        *MIB.get_or_init(|| *blake3::hash(&vec![0u8; length]).as_bytes())
    } else {
        *blake3::hash(&vec![0u8; length]).as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_kinds_and_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.img");
        Store::create_sparse(&path, 1 << 20).unwrap();
        // A disk's contents: the owner's only (docs/security.md), whatever the umask.
        assert_eq!(crate::permissions::mode_of(&path).unwrap(), crate::permissions::FILE_MODE);
        assert!(matches!(Store::open_sized(&path, "image", 4096), Err(StoreError::SizeMismatch { .. })));
        assert!(matches!(Store::open(&tmp.path().join("none"), "image"), Err(StoreError::Missing { .. })));
        let store = Store::open_sized(&path, "image", 1 << 20).unwrap();
        let mut buf = vec![1u8; 65536];
        assert!(store.read_for_scan(&mut buf, 0, true).unwrap(), "a new sparse file is a hole");
        assert_eq!(chunk_hash(&buf, true), chunk_hash(&buf, false));
        store.apply(RecordKind::Write, Extent::new(4096, 8192), &[&[7u8; 4096][..], &[8u8; 4096][..]]).unwrap();
        store.apply(RecordKind::WriteZeroes, Extent::new(8192, 512), &[] as &[&[u8]]).unwrap();
        store.apply(RecordKind::Marker, Extent::new(0, 0), &[b"m1"]).unwrap();
        assert!(!store.read_for_scan(&mut buf, 0, true).unwrap());
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 7));
        assert!(buf[8192..8704].iter().all(|&b| b == 0));
        assert!(buf[8704..12288].iter().all(|&b| b == 8));
        store.apply(RecordKind::Discard, Extent::new(0, 65536), &[] as &[&[u8]]).unwrap();
        assert!(store.read_for_scan(&mut buf, 0, true).unwrap(), "a discard leaves a hole");
    }

    fn cached_pages(path: &Path) -> usize {
        fsutil::cached_pages(&File::open(path).unwrap()).unwrap()
    }

    /// A scan reads exactly what `read_exact_at` reads (unaligned offsets and lengths, the
    /// file's last partial block, bytes written moments ago and still dirty in the page cache),
    /// refuses to read past the end, and leaves nothing in the page cache: a 2 MiB buffered
    /// scan dropped chunk by chunk left large folios behind that made later 4 KiB writes
    /// walk them whole.
    #[test]
    fn scans_read_past_the_page_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("scan.img");
        let size = (4 << 20) + 1000;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        fsutil::drop_from_cache(&File::open(&path).unwrap(), 0, 0);
        let store = Store::open(&path, "image").unwrap();
        assert!(store.direct.is_some(), "{} takes O_DIRECT: the scan must not go through the page cache here", path.display());
        for (offset, length) in [(0usize, 1usize << 20), (1 << 20, 3 << 20), (4095, 8193), (5, 1), ((4 << 20) - 100, 1100), (12345, (1 << 20) + 4097)] {
            let mut buf = vec![0u8; length];
            assert!(!store.read_for_scan(&mut buf, offset as u64, false).unwrap());
            assert!(buf == bytes[offset..offset + length], "scan of {length} bytes at {offset}");
        }
        assert_eq!(cached_pages(&path), 0, "a scan left pages of {} in the page cache", path.display());
        let mut past = vec![0u8; 2000];
        let error = store.read_for_scan(&mut past, (size - 1000) as u64, false).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
        // Written through the store and not yet synced: the scan still sees it.
        store.apply(RecordKind::Write, Extent::new(8000, 3), &[b"new"]).unwrap();
        let mut buf = vec![0u8; 16];
        store.read_for_scan(&mut buf, 7995, false).unwrap();
        assert_eq!(&buf[5..8], b"new");
        assert_eq!(buf[..5], bytes[7995..8000]);
    }

    /// Bulk writes and copies go past the page cache where aligned (bytes cached before over
    /// their range are not served stale afterwards) and through it where not; either way the
    /// bytes land where they should.
    #[test]
    fn bulk_writes_and_copies_land_past_the_page_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("from.img"), tmp.path().join("to.img"));
        let size = 6u64 << 20;
        Store::create_sparse(&from, size).unwrap();
        Store::create_sparse(&to, size).unwrap();
        let (source, image) = (Store::open(&from, "stage").unwrap(), Store::open(&to, "image").unwrap());
        assert!(source.direct.is_some() && image.direct.is_some(), "{} takes O_DIRECT", tmp.path().display());
        let bytes: Vec<u8> = (0..size).map(|i| (i * 13 + i / 4096) as u8).collect();
        // Cached (and stale afterwards, if the direct write did not replace it) first.
        image.write_all_at(&vec![9u8; 1 << 20], 0).unwrap();
        image.sync_data().unwrap();
        source.write_bulk_at(&bytes[..(5 << 20) + 4096], 0).unwrap();
        source.write_bulk_at(&bytes[(5 << 20) + 4096..(5 << 20) + 4196], (5 << 20) + 4096).unwrap();
        source.write_bulk_at(&bytes[(5 << 20) + 4196..], (5 << 20) + 4196).unwrap();
        let mut bounce = AlignedBuffer::new(1 << 20);
        image.copy_from(&source, Extent::new(0, (4 << 20) + 8192), &mut bounce).unwrap();
        image.copy_from(&source, Extent::new((4 << 20) + 8192, size - (4 << 20) - 8192), &mut bounce).unwrap();
        drop_all(&to);
        let mut back = vec![0u8; size as usize];
        image.read_exact_at(&mut back, 0).unwrap();
        assert!(back == bytes, "the copy differs from what was written");
        let mut cached_before = vec![0u8; 1 << 20];
        image.file.read_exact_at(&mut cached_before, 0).unwrap();
        assert!(cached_before[..] == bytes[..1 << 20], "a buffered read after the direct copy sees the old bytes");
        assert!(fsutil::write_direct_all_at(image.direct.as_ref().unwrap(), &bytes[..100], 0).is_err(), "unaligned: refused");
    }

    fn drop_all(path: &Path) {
        fsutil::drop_from_cache(&File::open(path).unwrap(), 0, 0);
    }
}
