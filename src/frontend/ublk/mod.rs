//! The ublk frontend: the volume as `/dev/ublkbN`, served through the kernel's ublk driver.
//!
//! Shape (as in libublk's examples and rublk): a control thread (`ublk-control`: add or
//! recover the device, start it, wait for the stop request, stop and delete it) apart from
//! the I/O queues, one thread and one io_uring per hardware queue (`queue.rs`). Reads are
//! answered on the queue thread (the backing store with unapplied journal records laid over
//! it, exactly what NBD does); everything that changes the device goes to the volume's writer.
//!
//! Every failure is returned to the kernel as a negative errno; nothing a request carries can
//! panic the server. The device is created with user recovery (`UBLK_F_USER_RECOVERY` with
//! re-issue), so when the server dies the kernel holds the device's I/O and re-issues what was
//! in flight to the next server that attaches with `--recover`: block writes and flushes are
//! idempotent, so re-issuing them is safe. What may be re-attached is checked in
//! `device.rs` before the kernel is asked to begin a recovery.
//!
//! The queue threads are this module's own rather than libublk's `run_target`: a queue that
//! fails (or panics) before its buffers are registered would leave `run_target` waiting
//! forever, its panics are swallowed, and a failed start leaves its threads unjoined.

mod device;
mod queue;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};

pub use device::{delete, device_exists, forget, guidance, inspect, list, DeviceInfo, DeviceRecord, DeviceState, CONTROL_DEVICE, MAX_DEPTH, MAX_QUEUES};

use crate::volume::Volume;

/// Largest request the kernel sends us; bigger requests are split by the block layer.
const MAX_IO_BUFFER: u64 = 1 << 20;
/// Discards and write-zeroes are records without payload, so they may be large.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;
/// A new device's queues and depth unless `--queues`/`--depth` (or `[run]`) say otherwise.
pub const DEFAULT_QUEUES: u16 = 1;
pub const DEFAULT_DEPTH: u16 = 128;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{CONTROL_DEVICE} does not exist: load the ublk_drv module: modprobe ublk_drv; needs Linux >= 6.0 with CONFIG_BLK_DEV_UBLK")]
    NoControlDevice,
    #[error("creating a ublk device needs root (CAP_SYS_ADMIN); run as root or through the systemd unit")]
    NotRoot,
    #[error("ublk device id {0} is already taken (/sys/class/ublk-char/ublkc{0} exists); choose another --ublk-id or omit it")]
    IdTaken(u32),
    #[error("ublk device {id} (recorded in {record}) was left behind by server pid {pid}, which is gone; re-attach to it with `run --ublk --recover` (I/O held by the kernel resumes), then stop that server to remove the device; or give it up with `ublk-mirror ublk delete --id {id}` (held I/O fails)")]
    Abandoned { id: u32, pid: u32, record: PathBuf },
    #[error("nothing to recover: {0}")]
    NothingToRecover(String),
    #[error("ublk device {0} does not exist")]
    NoSuchDevice(u32),
    #[error("invalid ublk option: {0}")]
    Invalid(String),
    #[error("ublk driver: {context}: {message}")]
    Driver { context: String, message: String },
    /// A recovery the kernel had begun did not complete; `guidance` says where the device
    /// stands and what to do.
    #[error("recovery of ublk device {id} failed: {message}. {guidance}")]
    RecoveryFailed { id: u32, message: String, guidance: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn driver_error(context: &str) -> impl FnOnce(libublk::UblkError) -> FrontendError + '_ {
    move |error| FrontendError::Driver { context: context.to_string(), message: error.to_string() }
}

/// What `run --ublk` asked for.
#[derive(Debug, Clone, Default)]
pub struct UblkOptions {
    /// Device id; the driver picks the lowest free one when absent.
    pub id: Option<u32>,
    /// A new device's queues and depth ([`DEFAULT_QUEUES`], [`DEFAULT_DEPTH`] when absent);
    /// with `recover`, values the device must have (a recovery keeps the device's).
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    /// Re-attach to the device a killed server left behind instead of creating one.
    pub recover: bool,
}

/// A ublk device needs root: said first, before the volume's files (root's, mode 0600) are
/// read, so another user gets this message rather than a permission error.
pub fn require_root() -> Result<(), FrontendError> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(FrontendError::NotRoot)
    }
}

/// Checks what can be checked before touching the volume, so a missing driver is one clear
/// message rather than a half-started server.
pub fn preflight(options: &UblkOptions) -> Result<(), FrontendError> {
    if !Path::new(CONTROL_DEVICE).exists() {
        return Err(FrontendError::NoControlDevice);
    }
    require_root()?;
    if let Some(queues) = options.queues.filter(|q| !(1..=MAX_QUEUES).contains(q)) {
        return Err(FrontendError::Invalid(format!("--queues {queues} must be between 1 and {MAX_QUEUES}")));
    }
    if let Some(depth) = options.depth.filter(|d| !(1..=MAX_DEPTH).contains(d)) {
        return Err(FrontendError::Invalid(format!("--depth {depth} must be between 1 and {MAX_DEPTH}")));
    }
    if let Some(id) = options.id {
        if !options.recover && device_exists(id) {
            return Err(FrontendError::IdTaken(id));
        }
    }
    Ok(())
}

/// How the control thread gets its device.
enum Attach {
    Create {
        id: Option<u32>,
        queues: u16,
        depth: u16,
    },
    /// Re-attach to this device (checked by `device::recoverable`).
    Recover(DeviceInfo),
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
        let attach = if options.recover {
            let info = device::recoverable(&volume, options.id, options.queues, options.depth)?;
            tracing::info!(id = info.id, queues = info.queues, depth = info.depth, "re-attaching to the ublk device left behind");
            Attach::Recover(info)
        } else {
            device::refuse_abandoned(&record_path)?;
            Attach::Create { id: options.id, queues: options.queues.unwrap_or(DEFAULT_QUEUES), depth: options.depth.unwrap_or(DEFAULT_DEPTH) }
        };
        let recover_id = match &attach {
            Attach::Recover(info) => Some(info.id),
            Attach::Create { .. } => None,
        };
        let io_buffer = volume.config().max_io().min(MAX_IO_BUFFER) as u32;
        // The control thread sends the record once the device runs; if it fails first, it drops
        // the sender and its result says why.
        let (ready_tx, ready_rx) = mpsc::channel::<DeviceRecord>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ublk-control".into())
            .spawn(move || {
                // A panic inside libublk (or here) becomes an error the command reports.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(volume, attach, io_buffer, ready_tx, stop_rx)))
                    .unwrap_or_else(|panic| Err(FrontendError::Driver { context: "control thread".into(), message: panic_message(&panic) }))
            })
            .map_err(|source| FrontendError::Io { context: "spawn ublk control thread".into(), source })?;
        let record = match ready_rx.recv() {
            Ok(record) => record,
            Err(_) => {
                let error = match thread.join() {
                    Ok(Err(error)) => error,
                    _ => FrontendError::Driver { context: "start device".into(), message: "the control thread ended before the device started".into() },
                };
                return Err(match (recover_id, error) {
                    (_, error @ FrontendError::RecoveryFailed { .. }) => error,
                    (Some(id), error) => {
                        FrontendError::RecoveryFailed { id, message: error.to_string(), guidance: guidance(id, record_path.parent().unwrap_or(Path::new("."))) }
                    }
                    (None, error) => error,
                });
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

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text =
        panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {text}")
}

/// Body of the control thread: create or recover, start the queues, wait for the stop
/// request, stop and delete the device.
fn serve(volume: Arc<Volume>, attach: Attach, io_buffer: u32, ready: mpsc::Sender<DeviceRecord>, stop: mpsc::Receiver<()>) -> Result<(), FrontendError> {
    let name = volume.config().name.clone();
    let recovering = matches!(attach, Attach::Recover(_));
    let asked_queues = match &attach {
        Attach::Create { queues, .. } => Some(*queues),
        Attach::Recover(_) => None,
    };
    let ctrl = match attach {
        Attach::Create { id, queues, depth } => UblkCtrlBuilder::default()
            .name("ublk-mirror")
            .id(id.map_or(-1, |id| id as i32))
            .nr_queues(queues)
            .depth(depth)
            .io_buf_bytes(io_buffer)
            .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|error| match id {
                Some(id) if device_exists(id) => FrontendError::IdTaken(id),
                _ => driver_error("add device")(error),
            })?,
        Attach::Recover(info) => {
            let recovery_failed = |message: String| FrontendError::RecoveryFailed { id: info.id, message, guidance: guidance(info.id, volume.dir().root()) };
            let existing = UblkCtrl::new_simple(info.id as i32).map_err(driver_error("open device"))?;
            // libublk answers EBUSY (an old server's file still open, or the device not
            // quiesced yet) by retrying for 30 s and then returning it as a value.
            match existing.start_user_recover() {
                Ok(code) if code < 0 => {
                    return Err(FrontendError::Driver {
                        context: "start user recovery".into(),
                        message: format!("{} (is a process of the old server still alive?)", std::io::Error::from_raw_os_error(-code)),
                    })
                }
                Ok(_) => {}
                Err(error) => return Err(driver_error("start user recovery")(error)),
            }
            drop(existing);
            if crate::failpoint::hit("ublk-recover-fail-after-start") {
                return Err(recovery_failed("failpoint ublk-recover-fail-after-start".into()));
            }
            // libublk 0.4.8 sizes its per-queue tables from the builder's queue count, not from
            // the device it re-opens: built with the default (1 queue), recovering a 2-queue
            // device panicked (index out of bounds in UblkCtrlInner::store_queue_tid). So the
            // builder gets the device's own geometry.
            UblkCtrlBuilder::default()
                .name("ublk-mirror")
                .id(info.id as i32)
                .nr_queues(info.queues)
                .depth(info.depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|error| recovery_failed(format!("re-open the device: {error}")))?
        }
    };
    let info = ctrl.dev_info();
    if let Some(asked) = asked_queues.filter(|&asked| asked > info.nr_hw_queues) {
        tracing::warn!(asked, got = info.nr_hw_queues, "the ublk driver gives a device at most one queue per CPU");
    }
    let record = DeviceRecord {
        id: info.dev_id,
        device: ctrl.get_bdev_path(),
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        pid: std::process::id(),
        volume_uuid: Some(volume.config().uuid),
    };
    let size = volume.size();
    let dev = Arc::new(
        UblkDev::new(
            ctrl.get_name(),
            move |dev: &mut UblkDev| {
                set_parameters(dev, size);
                Ok(())
            },
            &ctrl,
        )
        .map_err(driver_error("open the device's queues"))?,
    );
    let queues = Queues::start(&ctrl, &dev, &volume)?;
    if let Err(error) = ctrl.start_dev(&dev) {
        // A queue that failed says why better than the driver's errno.
        let message = queues.first_failure().unwrap_or_else(|| error.to_string());
        // The queue threads that did fetch stay blocked in their rings; the process exits on
        // this error, which releases them (and, for a recovery, re-quiesces the device). A
        // device added here is deleted without waiting: the synchronous delete of the
        // control's drop would wait for those threads' files forever.
        if !recovering {
            ctrl.disown();
            let _ = ctrl.del_dev_async();
        }
        return Err(if recovering {
            FrontendError::RecoveryFailed { id: record.id, message, guidance: guidance(record.id, volume.dir().root()) }
        } else {
            FrontendError::Driver { context: "start device".into(), message }
        });
    }
    tracing::info!(device = %record.device, volume = %name, queues = record.queues, depth = record.depth, recovered = recovering, "ublk device started");
    let _ = ready.send(record.clone());
    // Wait for shutdown (the sender is dropped), then let the kernel drain and stop.
    let _ = stop.recv();
    if let Err(error) = ctrl.kill_dev() {
        tracing::warn!("stop ublk device: {error}");
    }
    queues.join();
    let _ = ctrl.stop_dev();
    // The device's char-device file goes first: deleting the device waits until it is closed.
    drop(dev);
    // A recovered device is not deleted by the control's drop (it did not add it).
    if recovering {
        let _ = ctrl.del_dev();
    }
    drop(ctrl);
    tracing::info!(device = %record.device, "ublk device removed");
    Ok(())
}

/// The queue threads of a device.
struct Queues {
    threads: Vec<JoinHandle<()>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Queues {
    /// Starts one thread per hardware queue and gives the control device each thread's id
    /// (and its CPU affinity). A queue that fails before its commands reach the kernel counts
    /// as registered-with-failure, so `start_dev` returns an error instead of waiting; one
    /// that fails later ends the process (see below).
    fn start(ctrl: &UblkCtrl, dev: &Arc<UblkDev>, volume: &Arc<Volume>) -> Result<Queues, FrontendError> {
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tids, tid_rx) = mpsc::channel();
        let mut threads = Vec::new();
        for queue_id in 0..dev.dev_info.nr_hw_queues {
            let (dev, volume, failures, tids) = (dev.clone(), volume.clone(), failures.clone(), tids.clone());
            let thread = std::thread::Builder::new()
                .name(format!("ublk-queue-{queue_id}"))
                .spawn(move || {
                    let _ = tids.send((queue_id, UblkCtrl::init_queue_thread()));
                    let fetched = std::cell::Cell::new(false);
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| queue::run_queue(queue_id, &dev, &volume, || fetched.set(true))));
                    let failure = match outcome {
                        Ok(Ok(())) => return,
                        Ok(Err(error)) => error.to_string(),
                        Err(panic) => panic_message(&panic),
                    };
                    let failure = format!("queue {queue_id}: {failure}");
                    tracing::error!("ublk {failure}");
                    crate::lock(&failures).push(failure);
                    if !fetched.get() {
                        // Unblocks start_dev, which then fails.
                        dev.notify_buffer_registration_complete(true);
                    } else {
                        // The device lost a queue while serving: its requests would wait
                        // forever. Exit so the kernel quiesces the device and `run --recover`
                        // (by hand, or the service's restart) re-attaches a whole server.
                        tracing::error!("a ublk queue failed while serving; exiting so that `run --recover` can re-attach");
                        std::process::exit(1);
                    }
                })
                .map_err(|source| FrontendError::Io { context: "spawn ublk queue thread".into(), source })?;
            threads.push(thread);
        }
        drop(tids);
        for (queue_id, tid) in tid_rx.iter().take(threads.len()) {
            ctrl.set_thread_affinity(queue_id, tid);
            if let Err(error) = ctrl.configure_queue(dev, queue_id, tid) {
                tracing::warn!(queue = queue_id, "configure ublk queue: {error}");
            }
        }
        Ok(Queues { threads, failures })
    }

    fn first_failure(&self) -> Option<String> {
        crate::lock(&self.failures).first().cloned()
    }

    fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
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
