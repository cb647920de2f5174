//! A hardware queue's thread: one io_uring, the queue's requests fetched from the kernel.
//! Reads are answered here; write-side requests go to the volume and complete on its writer
//! thread, which hands the result back through an eventfd that this queue's ring reads, so
//! the thread only ever sleeps in one place.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkIORes};

use super::{driver_error, FrontendError};
use crate::extent::Extent;
use crate::volume::{Volume, WriteOp};

/// The user_data tag of the eventfd read: outside every queue's tag range.
const WAKE_TAG: u16 = u16::MAX;

/// Results of write-side requests, handed from the volume's writer thread to a queue thread.
struct Completions {
    done: Mutex<Vec<(u16, i32)>>,
    wake: OwnedFd,
}

impl Completions {
    fn push(&self, tag: u16, result: i32) {
        crate::lock(&self.done).push((tag, result));
        // An eventfd counter cannot overflow with one write per request; a failed write would
        // only mean the queue is already being torn down.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    fn take(&self) -> Vec<(u16, i32)> {
        std::mem::take(&mut *crate::lock(&self.done))
    }
}

/// One queue's thread body: fetches the queue's requests and serves them until the device
/// stops. `fetched` is called once the queue's commands are with the kernel (its buffers are
/// registered); an error before that leaves it uncalled.
pub(super) fn run_queue(queue_id: u16, dev: &UblkDev, volume: &Arc<Volume>, fetched: impl FnOnce()) -> Result<(), FrontendError> {
    let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
        .map_err(|error| FrontendError::Io { context: "create eventfd".into(), source: error.into() })?;
    let completions = Arc::new(Completions { done: Mutex::new(Vec::new()), wake });
    let mut buffers = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(queue_id, dev)
        .map_err(driver_error("create queue"))?
        .submit_fetch_commands_unified(BufDescList::Slices(Some(&buffers)))
        .map_err(driver_error("fetch commands"))?;
    fetched();
    // The eventfd read lands here; it must outlive every submitted read, hence a box that
    // lives as long as the queue loop.
    let wake_buffer = RefCell::new(Box::new([0u8; 8]));
    let wake_fd = completions.wake.as_raw_fd();
    let arm_wake = |queue: &UblkQueue<'_>| {
        let pointer = wake_buffer.borrow_mut().as_mut_ptr();
        let read = io_uring::opcode::Read::new(io_uring::types::Fd(wake_fd), pointer, 8).build().user_data(UblkIOCtx::build_user_data(WAKE_TAG, 0, 0, true));
        if let Err(error) = queue.ublk_submit_sqe_sync(read) {
            tracing::error!("arm ublk completion eventfd: {error}");
        }
    };
    arm_wake(&queue);
    queue.wait_and_handle_io(|queue, tag, context| {
        if context.is_tgt_io() {
            for (tag, result) in completions.take() {
                complete(queue, &buffers, tag, result);
            }
            arm_wake(queue);
            return;
        }
        if let Some(result) = handle_request(queue, tag, &mut buffers, volume, &completions) {
            complete(queue, &buffers, tag, result);
        }
    });
    // Keep the eventfd open until the ring (and any read still queued on it) is gone.
    drop(queue);
    drop(completions);
    Ok(())
}

fn complete(queue: &UblkQueue<'_>, buffers: &[IoBuf<u8>], tag: u16, result: i32) {
    let Some(buffer) = buffers.get(tag as usize) else { return };
    if let Err(error) = queue.complete_io_cmd_unified(tag, BufDesc::Slice(buffer.as_slice()), Ok(UblkIORes::Result(result))) {
        tracing::warn!(tag, "complete ublk request: {error}");
    }
}

/// Starts one request. Returns its result when it is already done (reads, rejected requests);
/// `None` when the volume will complete it later through `completions`.
fn handle_request(queue: &UblkQueue<'_>, tag: u16, buffers: &mut [IoBuf<u8>], volume: &Arc<Volume>, completions: &Arc<Completions>) -> Option<i32> {
    let descriptor = queue.get_iod(tag);
    let operation = descriptor.op_flags & 0xff;
    let fua = descriptor.op_flags & sys::UBLK_IO_F_FUA != 0;
    let offset = descriptor.start_sector << 9;
    let length = (descriptor.nr_sectors as u64) << 9;
    let buffer = buffers.get_mut(tag as usize)?;
    let data_request = matches!(operation, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
    if data_request && length > buffer.len() as u64 {
        return Some(-libc::EINVAL);
    }
    let op = match operation {
        sys::UBLK_IO_OP_READ => {
            return Some(match volume.read(offset, &mut buffer.as_mut_slice()[..length as usize]) {
                Ok(()) => length as i32,
                Err(error) => -error.errno(),
            });
        }
        sys::UBLK_IO_OP_WRITE => WriteOp::Write { offset, data: Arc::new(buffer.as_slice()[..length as usize].to_vec()), fua },
        sys::UBLK_IO_OP_FLUSH => WriteOp::Flush,
        sys::UBLK_IO_OP_DISCARD => WriteOp::Discard { extent: Extent::new(offset, length) },
        sys::UBLK_IO_OP_WRITE_ZEROES => WriteOp::WriteZeroes { extent: Extent::new(offset, length), fua },
        _ => return Some(-libc::EOPNOTSUPP),
    };
    let reply_length = if operation == sys::UBLK_IO_OP_WRITE { length as i32 } else { 0 };
    let completions = completions.clone();
    volume.submit(
        op,
        Box::new(move |result| {
            completions.push(tag, result.map_or_else(|error| -error.errno(), |()| reply_length));
        }),
    );
    None
}
