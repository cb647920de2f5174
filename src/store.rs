//! A store: the file or block device that holds a device's bytes — a volume's backing store
//! or a replica's image. The one definition of what each record kind does to device bytes,
//! of durability (sync) and of the chunk hashes both ends of a synchronisation compare.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::extent::Extent;
use crate::fsutil;
use crate::journal::RecordKind;

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

/// An open store, read and written at byte offsets.
#[derive(Debug)]
pub struct Store {
    file: File,
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
        Ok(Store { file, path: path.to_path_buf(), size, is_device, faults: fault_ops(what) })
    }

    /// [`Store::open`], refusing a store that is not exactly `expected` bytes.
    pub fn open_sized(path: &Path, what: &'static str, expected: u64) -> Result<Store, StoreError> {
        let store = Store::open(path, what)?;
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
        self.file.read_exact_at(buf, offset)
    }

    /// Reads `buf.len()` bytes at `offset` for a bulk scan (a synchronisation): when
    /// `hole_allowed` and the range is a hole of a file, `buf` is zeroed without reading and
    /// the result is true; otherwise the bytes are read and dropped from the page cache
    /// afterwards. (Reading holes would fill the page cache with zero pages that make later
    /// small writes to them expensive.)
    pub fn read_for_scan(&self, buf: &mut [u8], offset: u64, hole_allowed: bool) -> io::Result<bool> {
        self.read_fault()?;
        let length = buf.len() as u64;
        if hole_allowed && !self.is_device && fsutil::is_hole(&self.file, offset, length) {
            buf.fill(0);
            return Ok(true);
        }
        self.file.read_exact_at(buf, offset)?;
        fsutil::drop_from_cache(&self.file, offset, length);
        Ok(false)
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
}
