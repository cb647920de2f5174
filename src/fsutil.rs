//! File-system helpers shared by the journal and the store: atomic replacement, directory
//! syncs, zero-filled and sparse files, holes, vectored and spare-capacity I/O.
//!
//! Most of the crate's unsafe code (aligned buffers, block-device ioctls) is kept here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

/// A zeroed heap buffer aligned for O_DIRECT.
pub struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuffer {}

pub const DIRECT_ALIGN: usize = 4096;

impl AlignedBuffer {
    pub fn new(len: usize) -> Self {
        assert!(len > 0 && len.is_multiple_of(DIRECT_ALIGN), "aligned buffer length must be a positive multiple of {DIRECT_ALIGN}");
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size (checked above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuffer { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: allocated in new() with this exact layout and not freed before.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` atomically: write a temporary file, fsync it, rename it over, fsync the
/// directory. The file is private (0600, `permissions`): state, configs and maps are read by
/// root's processes only.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(crate::permissions::FILE_MODE).open(&tmp)?;
        // A temporary file left by a crash keeps the mode it was made with.
        file.set_permissions(std::fs::Permissions::from_mode(crate::permissions::FILE_MODE))?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Size in bytes of a regular file or a block device.
pub fn storage_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        use std::os::fd::AsRawFd;
        // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// Creates `path` (which must not exist) of `size` bytes, every byte written as zero so later
/// O_DIRECT overwrites need no extent conversion (and so no metadata journal commit) per flush.
pub fn create_zero_filled(path: &Path, size: u64) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new().write(true).create_new(true).mode(crate::permissions::FILE_MODE).open(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

/// Makes `[offset, offset+len)` read as zero. `punch` frees the space (discard); otherwise the
/// range stays allocated (write-zeroes). Falls back to writing zeros where the store cannot.
pub fn zero_range(file: &File, offset: u64, len: u64, punch: bool, block_device: bool) -> io::Result<()> {
    use rustix::fs::FallocateFlags;
    if len == 0 {
        return Ok(());
    }
    if !block_device {
        let flags = if punch { FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE } else { FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE };
        match rustix::fs::fallocate(file, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::INVAL) => {}
            Err(error) => return Err(error.into()),
        }
    }
    write_zeroes(file, offset, len)
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// True when `file` holds no data in `offset..offset + length` (a hole: reads as zeros),
/// found with SEEK_DATA without reading. False when unsure (block devices, file systems
/// without SEEK_DATA): the caller then reads.
pub fn is_hole(file: &File, offset: u64, length: u64) -> bool {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset as i64)) {
        Ok(next_data) => next_data >= offset.saturating_add(length),
        // No data at or after `offset`.
        Err(rustix::io::Errno::NXIO) => true,
        Err(_) => false,
    }
}

/// How many pages of `file` are in the page cache (mincore over a read-only mapping of the
/// whole file): what a scan or a write path left behind there.
pub fn cached_pages(file: &File) -> io::Result<usize> {
    let length = file.metadata()?.len() as usize;
    if length == 0 {
        return Ok(0);
    }
    // SAFETY: a read-only shared mapping of an open file, unmapped before returning; only
    // its residency is asked (mincore), its bytes are never touched.
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), length, libc::PROT_READ, libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(file), 0);
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut residency = vec![0u8; length.div_ceil(4096)];
        let asked = libc::mincore(map, length, residency.as_mut_ptr());
        let error = io::Error::last_os_error();
        libc::munmap(map, length);
        if asked != 0 {
            return Err(error);
        }
        Ok(residency.iter().filter(|&&r| r & 1 == 1).count())
    }
}

/// Tells the kernel the range will not be read again soon (a bulk scan such as an initial
/// synchronisation), so it does not crowd the page cache. Dirty pages stay. Best effort.
pub fn drop_from_cache(file: &File, offset: u64, length: u64) {
    let _ = rustix::fs::fadvise(file, offset, length, rustix::fs::Advice::DontNeed);
}

/// Writes `parts` one after the other at `offset` with as few `pwritev` calls as it takes
/// (a received payload arrives in pieces; gathering it first would copy it once more).
pub fn write_all_vectored_at(file: &File, parts: &[impl AsRef<[u8]>], offset: u64) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(AsRef::as_ref).filter(|p| !p.is_empty()).map(io::IoSlice::new).collect();
    let mut remaining = &mut slices[..];
    let mut at = offset;
    while !remaining.is_empty() {
        // The kernel takes at most IOV_MAX (1024) slices per call.
        let take = remaining.len().min(1024);
        match rustix::io::pwritev(file, &remaining[..take], at) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing")),
            Ok(written) => {
                at += written as u64;
                io::IoSlice::advance_slices(&mut remaining, written);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Appends up to `length` bytes of `file` from `position` to `buffer` (fewer at the file's
/// end), reading into its spare capacity: no zero-filling of memory the read overwrites (a
/// megabyte per journal read-ahead refill showed up in the sender's profile).
pub fn read_at_into(file: &File, buffer: &mut bytes::BytesMut, length: usize, position: u64) -> io::Result<()> {
    let target = buffer.len() + length;
    buffer.reserve(length);
    let mut at = position;
    while buffer.len() < target {
        let start = buffer.len();
        let spare = &mut buffer.spare_capacity_mut()[..target - start];
        match rustix::io::pread_uninit(file, spare, at) {
            Ok(([], _)) => break,
            Ok((read, _)) => {
                let count = read.len();
                // SAFETY: pread initialised exactly `count` bytes of the spare capacity, which
                // follow the buffer's current length.
                unsafe { buffer.set_len(start + count) };
                at += count as u64;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Opens `path` for reading and writing with O_DIRECT, for I/O that must leave the page cache
/// as it is; `None` where the file system refuses O_DIRECT (EINVAL: older tmpfs, some FUSE).
pub fn open_direct(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(error) => Err(error),
    }
}

thread_local! {
    /// One aligned buffer per writing thread for [`write_direct_all_at`], made at its first use.
    static DIRECT_WRITE_BOUNCE: std::cell::RefCell<Option<AlignedBuffer>> = const { std::cell::RefCell::new(None) };
}

/// Writes `data` to `file` (opened with O_DIRECT) at `offset`, both multiples of
/// [`DIRECT_ALIGN`]: copied piece by piece into a per-thread aligned buffer first, so the
/// caller's buffer (bytes off the network) needs no alignment.
pub fn write_direct_all_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let align = DIRECT_ALIGN as u64;
    if !offset.is_multiple_of(align) || !(data.len() as u64).is_multiple_of(align) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a direct write of {} bytes at {offset} is not aligned", data.len())));
    }
    DIRECT_WRITE_BOUNCE.with_borrow_mut(|bounce| {
        let bounce = bounce.get_or_insert_with(|| AlignedBuffer::new(DIRECT_PIECE));
        for (index, piece) in data.chunks(DIRECT_PIECE).enumerate() {
            bounce[..piece.len()].copy_from_slice(piece);
            file.write_all_at(&bounce[..piece.len()], offset + (index * DIRECT_PIECE) as u64)?;
        }
        Ok(())
    })
}

/// Bounce buffer size of [`read_direct_exact_at`] and [`write_direct_all_at`] (larger I/O
/// goes in pieces).
const DIRECT_PIECE: usize = 1 << 20;

thread_local! {
    /// One aligned bounce buffer per scanning thread, made at its first direct read.
    static DIRECT_BOUNCE: std::cell::RefCell<Option<AlignedBuffer>> = const { std::cell::RefCell::new(None) };
}

/// Fills `buf` from `file` (opened with O_DIRECT) at `offset`, any alignment: the aligned
/// cover of each piece is read into a per-thread aligned buffer and the wanted bytes copied
/// out (a copy costs far less than the disk read, and callers' buffers need no alignment).
/// Reading past the end is `UnexpectedEof`, as `read_exact_at`.
pub fn read_direct_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    DIRECT_BOUNCE.with_borrow_mut(|bounce| {
        let bounce = bounce.get_or_insert_with(|| AlignedBuffer::new(DIRECT_PIECE));
        let align = DIRECT_ALIGN as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let start = at - at % align;
            let skip = (at - start) as usize;
            let wanted = (buf.len() - done).min(DIRECT_PIECE - skip);
            let cover = (skip + wanted).next_multiple_of(DIRECT_ALIGN);
            let mut got = 0usize;
            // A short read ends at the end of the file (its last partial block counts).
            while got < skip + wanted {
                match rustix::io::pread(file, &mut bounce[got..cover], start + got as u64) {
                    Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read past the end at byte {}", start + got as u64))),
                    Ok(count) if !(start + (got + count) as u64).is_multiple_of(align) && got + count < skip + wanted => {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read past the end at byte {}", start + (got + count) as u64)))
                    }
                    Ok(count) => got += count,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(error) => return Err(error.into()),
                }
            }
            buf[done..done + wanted].copy_from_slice(&bounce[skip..skip + wanted]);
            done += wanted;
        }
        Ok(())
    })
}
