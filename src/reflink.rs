//! Reflinks: a file cloned by sharing its extents (FICLONE, on XFS with reflink and on
//! btrfs), and how many bytes of a clone are its own (FIEMAP: extents not marked shared).
//! The snapshot store's fast path: a clone costs no copy, and space only as the original
//! changes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW(0x94, 9, int)` from linux/fs.h.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// `_IOWR('f', 11, struct fiemap)` from linux/fs.h.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
const EXTENTS_PER_CALL: usize = 256;

/// Makes `destination` (an empty file) share every extent of `source`. The errors that mean
/// "not here" (the filesystem cannot, or the files are on two filesystems) are
/// `ErrorKind::Unsupported`.
pub fn clone_file(destination: &File, source: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument (by value); both
    // descriptors are open for the call's duration.
    let result = unsafe { libc::ioctl(destination.as_raw_fd(), FICLONE, source.as_raw_fd()) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) | Some(libc::EBADF) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, format!("reflink not available: {error}")))
        }
        _ => Err(error),
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// Bytes of `file`'s extents that no other file shares (what deleting it would free).
pub fn exclusive_bytes(file: &File) -> io::Result<u64> {
    let mut start = 0u64;
    let mut total = 0u64;
    loop {
        let mut map = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            flags: 0,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: `map` is a struct fiemap followed by room for `extent_count` extents, as the
        // ioctl expects; it outlives the call.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        let mapped = (map.mapped_extents as usize).min(EXTENTS_PER_CALL);
        if mapped == 0 {
            return Ok(total);
        }
        for extent in &map.extents[..mapped] {
            if extent.flags & FIEMAP_EXTENT_SHARED == 0 {
                total += extent.length;
            }
            if extent.flags & FIEMAP_EXTENT_LAST != 0 {
                return Ok(total);
            }
        }
        let last = map.extents[mapped - 1];
        start = last.logical + last.length;
    }
}
