//! The ublk frontend: the volume as `/dev/ublkbN`, served through the kernel's ublk driver.
//!
//! Shape (as in libublk's examples and rublk): one thread and one io_uring per hardware queue.
//! Reads are answered on the queue thread (the backing store with unapplied journal records
//! laid over it, exactly what NBD does). Everything that changes the device goes to the volume's
//! writer, whose completion runs on another thread; it hands the result back through an eventfd
//! that the queue's own io_uring reads, so a queue thread only ever sleeps in one place.
//!
//! Every failure is returned to the kernel as a negative errno; nothing a request carries can
//! panic the server. The device is created with user recovery (`UBLK_F_USER_RECOVERY` with
//! re-issue), so when the server dies the kernel holds the device's I/O and re-issues what was
//! in flight to the next server that attaches with `--recover`: block writes and flushes are
//! idempotent, so re-issuing them is safe.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};
use serde::{Deserialize, Serialize};

use crate::extent::Extent;
use crate::volume::{Volume, WriteOp};

pub const CONTROL_DEVICE: &str = "/dev/ublk-control";
/// Largest request the kernel sends us; bigger requests are split by the block layer.
const MAX_IO_BUFFER: u64 = 1 << 20;
/// Discards and write-zeroes are records without payload, so they may be large.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;
/// The user_data tag of the eventfd read: outside every queue's tag range.
const WAKE_TAG: u16 = u16::MAX;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{CONTROL_DEVICE} does not exist: load the ublk_drv module: modprobe ublk_drv; needs Linux >= 6.0 with CONFIG_BLK_DEV_UBLK")]
    NoControlDevice,
    #[error("creating a ublk device needs root (CAP_SYS_ADMIN); run as root or through the systemd unit")]
    NotRoot,
    #[error("ublk device id {0} is already taken (/sys/class/ublk-char/ublkc{0} exists); choose another --ublk-id or omit it")]
    IdTaken(u32),
    #[error("ublk device {id} (recorded in {record}) was left behind by server pid {pid}, which is gone; re-attach to it with `run --ublk --recover` (I/O held by the kernel resumes), then stop that server to remove the device")]
    Abandoned { id: u32, pid: u32, record: PathBuf },
    #[error("nothing to recover: {0}")]
    NothingToRecover(String),
    #[error("invalid ublk option: {0}")]
    Invalid(String),
    #[error("ublk driver: {context}: {message}")]
    Driver { context: String, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn driver_error(context: &str) -> impl FnOnce(libublk::UblkError) -> FrontendError + '_ {
    move |error| FrontendError::Driver { context: context.to_string(), message: error.to_string() }
}

/// What `run --ublk` asked for.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Device id; the driver picks the lowest free one when absent.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Re-attach to the device a killed server left behind instead of creating one.
    pub recover: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions { id: None, queues: 1, depth: 128, recover: false }
    }
}

/// The device a server is attached to, as recorded in the volume directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: u32,
    pub device: String,
    pub queues: u16,
    pub depth: u16,
    pub pid: u32,
}

/// Checks what can be checked before touching the volume, so a missing driver is one clear
/// message rather than a half-started server.
pub fn preflight(options: &UblkOptions) -> Result<(), FrontendError> {
    if !Path::new(CONTROL_DEVICE).exists() {
        return Err(FrontendError::NoControlDevice);
    }
    if !rustix::process::geteuid().is_root() {
        return Err(FrontendError::NotRoot);
    }
    if options.queues == 0 || options.queues > 64 {
        return Err(FrontendError::Invalid(format!("--queues {} must be between 1 and 64", options.queues)));
    }
    if options.depth == 0 || options.depth > 4096 {
        return Err(FrontendError::Invalid(format!("--depth {} must be between 1 and 4096", options.depth)));
    }
    if let Some(id) = options.id {
        if !options.recover && device_exists(id) {
            return Err(FrontendError::IdTaken(id));
        }
    }
    Ok(())
}

fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// A running `/dev/ublkbN`.
pub struct UblkServer {
    record: DeviceRecord,
    record_path: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Result<(), FrontendError>>>,
}

impl UblkServer {
    /// Creates (or with `recover`, re-attaches to) the device and serves `volume` on it until
    /// [`UblkServer::shutdown`].
    pub fn start(volume: Arc<Volume>, options: &UblkOptions) -> Result<UblkServer, FrontendError> {
        preflight(options)?;
        let size = volume.size();
        if !size.is_multiple_of(4096) {
            return Err(FrontendError::Invalid(format!("volume size {size} is not a multiple of 4096 bytes")));
        }
        let record_path = volume.dir().ublk_device();
        let recover_id = if options.recover {
            Some(recoverable_device(&record_path, options.id)?)
        } else {
            refuse_abandoned_device(&record_path)?;
            None
        };
        let io_buffer = volume.config().max_io().min(MAX_IO_BUFFER) as u32;
        // The control thread sends the record once the device runs; if it fails first, it drops
        // the sender and its result says why.
        let (ready_tx, ready_rx) = mpsc::channel::<DeviceRecord>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let options = options.clone();
        let thread = std::thread::Builder::new()
            .name("ublk-control".into())
            .spawn(move || serve(volume, options, recover_id, io_buffer, ready_tx, stop_rx))
            .map_err(|source| FrontendError::Io { context: "spawn ublk control thread".into(), source })?;
        let record = match ready_rx.recv() {
            Ok(record) => record,
            Err(_) => {
                return Err(match thread.join() {
                    Ok(Err(error)) => error,
                    _ => FrontendError::Driver { context: "start device".into(), message: "the control thread ended before the device started".into() },
                })
            }
        };
        let text = serde_json::to_vec_pretty(&record).unwrap_or_default();
        crate::fsutil::write_atomic(&record_path, &text).map_err(|source| FrontendError::Io { context: format!("write {}", record_path.display()), source })?;
        Ok(UblkServer { record, record_path, stop: Some(stop_tx), thread: Some(thread) })
    }

    pub fn record(&self) -> &DeviceRecord {
        &self.record
    }

    /// Stops the device: the kernel completes what is queued, the queues drain, and the
    /// device is deleted. The volume itself is flushed by its own shutdown afterwards.
    pub fn shutdown(mut self) -> Result<(), FrontendError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), FrontendError> {
        drop(self.stop.take());
        let result = match self.thread.take() {
            Some(thread) => {
                thread.join().unwrap_or_else(|_| Err(FrontendError::Driver { context: "stop device".into(), message: "the control thread panicked".into() }))
            }
            None => return Ok(()),
        };
        let _ = std::fs::remove_file(&self.record_path);
        result
    }
}

impl Drop for UblkServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// A device left by a killed server still holds the volume's queued I/O (and maybe a mounted
/// filesystem): creating a second device beside it would split the volume's users, so the
/// administrator is sent to `--recover`. A record whose device is gone (a reboot) is stale.
fn refuse_abandoned_device(record_path: &Path) -> Result<(), FrontendError> {
    let Ok(text) = std::fs::read(record_path) else { return Ok(()) };
    match serde_json::from_slice::<DeviceRecord>(&text) {
        Ok(record) if device_exists(record.id) => Err(FrontendError::Abandoned { id: record.id, pid: record.pid, record: record_path.to_path_buf() }),
        _ => {
            let _ = std::fs::remove_file(record_path);
            Ok(())
        }
    }
}

/// The id to re-attach to: `--ublk-id`, else the one recorded by the server that died.
fn recoverable_device(record_path: &Path, id: Option<u32>) -> Result<u32, FrontendError> {
    let id = match id {
        Some(id) => id,
        None => {
            let text = std::fs::read(record_path).map_err(|_| {
                FrontendError::NothingToRecover(format!(
                    "{} does not exist (no device was left behind by a killed server); give --ublk-id or run without --recover",
                    record_path.display()
                ))
            })?;
            serde_json::from_slice::<DeviceRecord>(&text).map_err(|error| FrontendError::NothingToRecover(format!("{}: {error}", record_path.display())))?.id
        }
    };
    if !device_exists(id) {
        return Err(FrontendError::NothingToRecover(format!("ublk device {id} does not exist")));
    }
    Ok(id)
}

/// Body of the control thread: create or recover, start the queues, wait for the stop
/// request, stop and delete the device.
fn serve(
    volume: Arc<Volume>,
    options: UblkOptions,
    recover_id: Option<u32>,
    io_buffer: u32,
    ready: mpsc::Sender<DeviceRecord>,
    stop: mpsc::Receiver<()>,
) -> Result<(), FrontendError> {
    let name = volume.config().name.clone();
    let ctrl = match recover_id {
        None => UblkCtrlBuilder::default()
            .name("ublk-mirror")
            .id(options.id.map_or(-1, |id| id as i32))
            .nr_queues(options.queues)
            .depth(options.depth)
            .io_buf_bytes(io_buffer)
            .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|error| match options.id {
                Some(id) if device_exists(id) => FrontendError::IdTaken(id),
                _ => driver_error("add device")(error),
            })?,
        Some(id) => {
            let existing = UblkCtrl::new_simple(id as i32).map_err(driver_error("open device"))?;
            existing.start_user_recover().map_err(driver_error("start user recovery (is the old server still running?)"))?;
            drop(existing);
            UblkCtrlBuilder::default()
                .name("ublk-mirror")
                .id(id as i32)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(driver_error("re-open device for recovery"))?
        }
    };
    let info = ctrl.dev_info();
    let record = DeviceRecord { id: info.dev_id, device: ctrl.get_bdev_path(), queues: info.nr_hw_queues, depth: info.queue_depth, pid: std::process::id() };
    let size = volume.size();
    let init = move |dev: &mut UblkDev| {
        set_parameters(dev, size);
        Ok(())
    };
    let queue_volume = volume.clone();
    let queue_main = move |queue_id: u16, dev: &UblkDev| serve_queue(queue_id, dev, &queue_volume);
    let started = record.clone();
    let stop = Mutex::new(stop);
    let result = ctrl.run_target(init, queue_main, move |ctrl: &UblkCtrl| {
        tracing::info!(device = %started.device, volume = %name, queues = started.queues, depth = started.depth, "ublk device started");
        let _ = ready.send(started);
        // Wait for shutdown (the sender is dropped), then let the kernel drain and stop.
        let _ = crate::lock(&stop).recv();
        if let Err(error) = ctrl.kill_dev() {
            tracing::warn!("stop ublk device: {error}");
        }
    });
    let result = result.map(|_| ()).map_err(driver_error("serve device"));
    // A recovered device is not deleted by the control's drop (it did not add it).
    if recover_id.is_some() {
        let _ = ctrl.del_dev();
    }
    drop(ctrl);
    if result.is_ok() {
        tracing::info!(device = %record.device, "ublk device removed");
    }
    result
}

/// Device parameters, set honestly: 512-byte logical blocks (the volume takes any byte
/// range), 4 KiB physical, a volatile write cache so the kernel sends FLUSH (writes are
/// acknowledged once journaled in the page cache), FUA, and discard/write-zeroes limits.
fn set_parameters(dev: &mut UblkDev, size: u64) {
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    dev.tgt.dev_size = size;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    };
}

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

fn serve_queue(queue_id: u16, dev: &UblkDev, volume: &Arc<Volume>) {
    if let Err(error) = run_queue(queue_id, dev, volume) {
        tracing::error!(queue = queue_id, "ublk queue stopped: {error:#}");
    }
}

fn run_queue(queue_id: u16, dev: &UblkDev, volume: &Arc<Volume>) -> Result<(), FrontendError> {
    let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
        .map_err(|error| FrontendError::Io { context: "create eventfd".into(), source: error.into() })?;
    let completions = Arc::new(Completions { done: Mutex::new(Vec::new()), wake });
    let mut buffers = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(queue_id, dev)
        .map_err(driver_error("create queue"))?
        .submit_fetch_commands_unified(BufDescList::Slices(Some(&buffers)))
        .map_err(driver_error("fetch commands"))?;
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
