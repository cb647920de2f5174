//! The journal's only contact with io_uring: a durable group commit is one write of the whole
//! batch linked to an fdatasync, submitted together and waited for together.
//!
//! A commit that need not be durable yet is a plain pwrite into the page cache: measured on
//! ext4 (Linux 6.18), io_uring hands buffered writes to a kernel worker thread (io-wq), an
//! extra wake-up per commit that cost more than the syscall it saves.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};

pub struct CommitRing {
    ring: IoUring,
}

impl CommitRing {
    pub fn new() -> io::Result<Self> {
        Ok(CommitRing { ring: IoUring::new(8)? })
    }

    /// Writes `data` at `offset` (short writes are finished with further submissions) and,
    /// if `sync`, makes the file's data durable with a linked fdatasync.
    pub fn write_and_maybe_sync(&mut self, file: &File, data: &[u8], offset: u64, sync: bool) -> io::Result<()> {
        if !sync {
            use std::os::unix::fs::FileExt;
            return file.write_all_at(data, offset);
        }
        let fd = types::Fd(file.as_raw_fd());
        let mut done = 0usize;
        let mut synced = !sync;
        while done < data.len() || !synced {
            let rest = &data[done..];
            let mut expected = 0;
            // SAFETY: for both pushes below, the buffer and the file outlive the submission,
            // because we wait for every completion before returning or touching them again.
            unsafe {
                let mut queue = self.ring.submission();
                if !rest.is_empty() {
                    let write = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(offset + done as u64).build().user_data(1);
                    let write = if synced { write } else { write.flags(squeue::Flags::IO_LINK) };
                    queue.push(&write).map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    expected += 1;
                }
                if !synced {
                    let fsync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(2);
                    queue.push(&fsync).map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    expected += 1;
                }
            }
            self.ring.submit_and_wait(expected)?;
            let mut write_result = None;
            let mut sync_result = None;
            for cqe in self.ring.completion().take(expected) {
                match cqe.user_data() {
                    1 => write_result = Some(cqe.result()),
                    _ => sync_result = Some(cqe.result()),
                }
            }
            if let Some(result) = write_result {
                if result < 0 {
                    return Err(io::Error::from_raw_os_error(-result));
                }
                if result == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "journal write made no progress"));
                }
                done += result as usize;
            }
            if let Some(result) = sync_result {
                // A short linked write cancels the fsync (-ECANCELED): retry it after the rest.
                if result == -libc::ECANCELED && done < data.len() {
                    continue;
                }
                if result < 0 {
                    return Err(io::Error::from_raw_os_error(-result));
                }
                if done == data.len() {
                    synced = true;
                }
            }
        }
        Ok(())
    }
}
