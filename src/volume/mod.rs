//! A volume: the local virtual disk. Frontends (NBD, ublk) call [`Volume::read`] and
//! [`Volume::submit`]; the write path is journal first:
//!
//! 1. The writer thread (`writer.rs`) takes requests in arrival order, gives each an LSN,
//!    stages it in the journal and the pending index (`index.rs`), and group-commits: one
//!    journal write for many records. A write is acknowledged once its record is written to
//!    the journal (page cache: the volume behaves like a disk with a volatile write cache).
//! 2. The syncer thread (`syncer.rs`) makes the journal durable (fdatasync) for FLUSH and
//!    FUA, which complete only then, and in the background at least every few milliseconds.
//! 3. The writeback thread (`writeback.rs`) applies records to the backing store in LSN
//!    order, but only once they are durable in the journal, so the backing store never holds
//!    a write the journal lacks. Until then reads see them through the pending index.
//! 4. Checkpoints fdatasync the backing store, record the applied LSN in `state.json` and
//!    let the journal's retention trim up to it (and no further than the holds of the
//!    mirrors allow).
//! 5. On open (`lifecycle.rs`), journal recovery runs and records after the checkpoint are
//!    redone.

pub mod config;
mod demoted;
pub mod index;
mod lifecycle;
pub mod markers;
mod shared;
pub mod state;
mod syncer;
mod writeback;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use config::{BackingWrites, VolumeConfig};
pub use demoted::Demoted;
pub use lifecycle::{check_journal, CreateOptions, Created, Origin, DEFAULT_JOURNAL_SIZE, DEFAULT_PENDING_WINDOW, DEFAULT_SEGMENT_SIZE};
pub use markers::{marker_history, Marked, MarkerEntry, WriteHold, MAX_HOLD};
pub use state::VolumeState;

use index::apply_overlays;
use shared::Shared;
use writer::Request;

use crate::extent::Extent;
use crate::journal::{Journal, JournalError, OnFull, Retention};
use crate::layout::{DirLock, VolumeDir};
use crate::lock;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{dir} holds no volume (no volume.toml); create one with `ublk-mirror volume create`")]
    NotAVolume { dir: PathBuf },
    #[error("{dir} already holds a volume or other files; refusing to overwrite it")]
    AlreadyExists { dir: PathBuf },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Permissions(#[from] crate::permissions::PermissionsError),
    #[error("volume {dir} is in use by another process ({holder})")]
    InUse { dir: PathBuf, holder: String },
    #[error("{0}")]
    Invalid(String),
    #[error("request at offset {offset} length {length} is outside the device (size {size})")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("volume stopped after an I/O error: {0}")]
    Failed(String),
    /// The disk error that stopped the volume, as the request that hit it sees it (the
    /// errno it had: ENOSPC for a full disk, EIO otherwise); later requests get `Failed`.
    #[error("{message}")]
    Disk { message: String, errno: i32 },
    #[error("volume is shutting down")]
    ShuttingDown,
    /// A request that could not be served now; it changed nothing.
    #[error("{0}")]
    Busy(String),
    /// A write to a read-only export (a replica snapshot).
    #[error("the export is read-only")]
    ReadOnly,
    /// The volume was switched over to its replica (`mirror switchover`): it takes no more
    /// writes here.
    #[error("the volume was switched over to its replica: writes go to the new primary")]
    Fenced,
}

impl VolumeError {
    /// The errno a frontend returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::OutOfRange { .. } | VolumeError::Invalid(_) => libc::EINVAL,
            VolumeError::ShuttingDown => libc::ESHUTDOWN,
            VolumeError::ReadOnly => libc::EPERM,
            VolumeError::Fenced => libc::EIO,
            VolumeError::Busy(_) => libc::EBUSY,
            VolumeError::Disk { errno, .. } => *errno,
            VolumeError::Io { source, .. } => disk_errno(source),
            VolumeError::Journal(JournalError::Io { source, .. }) => disk_errno(source),
            VolumeError::Store(crate::store::StoreError::Io { source, .. }) => disk_errno(source),
            _ => libc::EIO,
        }
    }

    /// The error the request that hit a disk error gets: its message, and ENOSPC when the
    /// disk was full (EIO otherwise).
    pub(crate) fn disk(message: String, error: &JournalError) -> VolumeError {
        let errno = match error {
            JournalError::Io { source, .. } => disk_errno(source),
            _ => libc::EIO,
        };
        VolumeError::Disk { message, errno }
    }
}

/// ENOSPC stays ENOSPC (a full disk, the client may free space); every other I/O error is
/// EIO to a block device's client.
fn disk_errno(error: &io::Error) -> i32 {
    match error.raw_os_error() {
        Some(libc::ENOSPC) => libc::ENOSPC,
        _ => libc::EIO,
    }
}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> VolumeError {
    let context = context.into();
    move |source| VolumeError::Io { context, source }
}

/// A request that changes the device (or asks for durability). A write's extent is
/// `data.len()` bytes at `offset`; a flush completes once every write acknowledged before it
/// is durable.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Write { offset: u64, data: Arc<Vec<u8>>, fua: bool },
    WriteZeroes { extent: Extent, fua: bool },
    Discard { extent: Extent },
    Flush,
}

impl WriteOp {
    /// The device bytes the request changes (none for a flush).
    pub fn extent(&self) -> Option<Extent> {
        match self {
            WriteOp::Write { offset, data, .. } => Some(Extent::new(*offset, data.len() as u64)),
            WriteOp::WriteZeroes { extent, .. } | WriteOp::Discard { extent } => Some(*extent),
            WriteOp::Flush => None,
        }
    }
}

/// Called exactly once when a request completes.
pub type Completion = Box<dyn FnOnce(Result<(), VolumeError>) + Send + 'static>;

/// Mode of a volume as status reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Writes are journaled and acknowledged at local speed.
    #[default]
    Journaling,
    /// The journal is at its size cap: new writes wait until it is trimmed (with
    /// `on_full = block`, until the mirrors holding it have received enough).
    Full,
    /// An I/O error stopped the volume; it refuses writes until restarted.
    Failed,
    /// Nothing serves the volume.
    Stopped,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Journaling, Mode::Full, Mode::Failed, Mode::Stopped];

    /// The name status and metrics show.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Journaling => "journaling",
            Mode::Full => "full",
            Mode::Failed => "failed",
            Mode::Stopped => "stopped",
        }
    }
}

/// Live numbers of a running volume.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VolumeNumbers {
    pub mode: Mode,
    pub last_lsn: u64,
    pub synced_lsn: u64,
    pub applied_lsn: u64,
    pub checkpoint_lsn: u64,
    pub pending_bytes: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub failure: Option<String>,
}

/// An open, served volume.
pub struct Volume {
    dir: VolumeDir,
    config: VolumeConfig,
    shared: Arc<Shared>,
    submit: Mutex<Option<SyncSender<Request>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    markers: Mutex<markers::MarkerHistory>,
    history: crate::generation::History,
    _lock: DirLock,
}

impl Volume {
    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    pub fn size(&self) -> u64 {
        self.shared.size
    }

    pub fn dir(&self) -> &VolumeDir {
        &self.dir
    }

    pub fn journal(&self) -> &Arc<Journal> {
        self.shared.retention.journal()
    }

    /// What may be trimmed from the journal: the checkpoint and the mirrors' holds.
    pub fn retention(&self) -> &Arc<Retention> {
        &self.shared.retention
    }

    fn check_range(&self, extent: Extent) -> Result<(), VolumeError> {
        if extent.fits(self.shared.size) {
            Ok(())
        } else {
            Err(VolumeError::OutOfRange { offset: extent.offset, length: extent.length, size: self.shared.size })
        }
    }

    /// Reads device bytes: the backing store with not-yet-applied records laid over it.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let extent = Extent::new(offset, buf.len() as u64);
        self.check_range(extent)?;
        // Take the overlays before reading the backing store: a record removed from the
        // index in between has already been written to the backing store.
        let overlays = lock(&self.shared.index).overlays(extent);
        if let Err(error) = self.shared.backing.read_exact_at(buf, offset) {
            // A disk that fails reads is failing: stop taking writes (reads go on being tried,
            // so what is still readable can be copied off), and say why in status.
            let message = format!("read backing store {} at offset {offset}: {error}", self.shared.backing.path().display());
            self.shared.fail(message.clone());
            return Err(VolumeError::Disk { message, errno: disk_errno(&error) });
        }
        apply_overlays(buf, offset, &overlays);
        self.shared.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads device bytes for a bulk scan (a synchronisation): a range that is a hole in the
    /// backing store with nothing pending over it is reported as zeros without being read
    /// (returns true, `buf` zeroed), and what is read is dropped from the page cache
    /// afterwards. Either way the result equals [`Volume::read`]'s.
    pub fn read_for_scan(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        let extent = Extent::new(offset, buf.len() as u64);
        self.check_range(extent)?;
        // Overlays first, as in `read`: a record applied after this look is in the backing
        // store by the time the store looks for holes.
        let overlays = lock(&self.shared.index).overlays(extent);
        let hole = self.shared.backing.read_for_scan(buf, offset, overlays.is_empty()).map_err(io_context("read backing store"))?;
        apply_overlays(buf, offset, &overlays);
        Ok(hole)
    }

    /// Queues a write-side request; `completion` runs once it is done (on the writer thread).
    pub fn submit(&self, op: WriteOp, completion: Completion) {
        if let Some(extent) = op.extent() {
            if let Err(error) = self.check_range(extent) {
                return completion(Err(error));
            }
            if matches!(op, WriteOp::Write { .. }) && extent.length > self.config.max_io() {
                return completion(Err(VolumeError::Invalid(format!(
                    "write of {} bytes exceeds the maximum I/O size {}",
                    extent.length,
                    self.config.max_io()
                ))));
            }
        }
        let started = std::time::Instant::now();
        let shared = self.shared.clone();
        let is_flush = matches!(op, WriteOp::Flush);
        let is_discard = matches!(op, WriteOp::Discard { .. });
        let completion: Completion = Box::new(move |result| {
            let latency = &shared.latency;
            let histogram = if is_flush {
                &latency.flush
            } else if is_discard {
                &latency.discard
            } else {
                &latency.write
            };
            histogram.observe(started.elapsed());
            completion(result)
        });
        let sender = lock(&self.submit).clone();
        let Some(sender) = sender else { return completion(Err(VolumeError::ShuttingDown)) };
        if let Err(mpsc::SendError(Request::Io { completion, .. })) = sender.send(Request::Io { op, completion }) {
            completion(Err(VolumeError::ShuttingDown));
        }
    }

    /// Submits and waits (for tools and tests).
    pub fn submit_and_wait(&self, op: WriteOp) -> Result<(), VolumeError> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            op,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.recv().unwrap_or(Err(VolumeError::ShuttingDown))
    }

    pub fn numbers(&self) -> VolumeNumbers {
        let progress = lock(&self.shared.progress);
        let failure = self.shared.failure();
        let counters = &self.shared.counters;
        VolumeNumbers {
            mode: if failure.is_some() {
                Mode::Failed
            } else if self.journal().is_full() {
                // Under `track` mirrors never keep the journal full (their holds are released
                // first): then only the local checkpoint can, and writes do wait for it.
                Mode::Full
            } else {
                Mode::Journaling
            },
            last_lsn: self.shared.last_lsn.load(Ordering::Acquire),
            synced_lsn: progress.synced_lsn,
            applied_lsn: progress.applied_lsn,
            checkpoint_lsn: self.shared.retention.checkpoint_lsn(),
            pending_bytes: progress.pending_bytes,
            writes: counters.writes.load(Ordering::Relaxed),
            written_bytes: counters.written_bytes.load(Ordering::Relaxed),
            flushes: counters.flushes.load(Ordering::Relaxed),
            reads: counters.reads.load(Ordering::Relaxed),
            read_bytes: counters.read_bytes.load(Ordering::Relaxed),
            failure,
        }
    }

    /// Changes what happens when mirrors would fill the journal, at once (`volume set
    /// --on-full` on a running volume). The file is the caller's to change.
    pub fn set_on_full(&self, policy: OnFull) -> Result<(), VolumeError> {
        Ok(self.shared.retention.set_policy(policy)?)
    }

    /// Request latency histograms (for metrics).
    pub fn latency(&self) -> &crate::latency::RequestLatency {
        &self.shared.latency
    }

    pub fn generation(&self) -> uuid::Uuid {
        lock(&self.shared.state).generation
    }

    /// The volume's generation history (the current generation last).
    pub fn history(&self) -> &crate::generation::History {
        &self.history
    }

    /// The first step of stopping, before the frontends drain their in-flight requests:
    /// from now on a write that finds the journal full fails at once instead of waiting for
    /// a trim (which, with the journal held by an unreachable mirror, may never come).
    pub fn begin_shutdown(&self) {
        self.shared.closing.store(true, Ordering::Release);
    }

    /// Stops accepting requests, drains the queue, makes everything durable, applies and
    /// checkpoints it, and marks the shutdown clean. Idempotent.
    pub fn shutdown(&self) -> Result<(), VolumeError> {
        self.begin_shutdown();
        let sender = lock(&self.submit).take();
        if sender.is_none() && lock(&self.threads).is_empty() {
            return Ok(());
        }
        drop(sender);
        for thread in lock(&self.threads).drain(..) {
            let _ = thread.join();
        }
        if let Some(failure) = self.shared.failure() {
            return Err(VolumeError::Failed(failure));
        }
        let mut state = lock(&self.shared.state);
        state.clean_shutdown = true;
        state.save(&self.dir)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(error = %crate::describe(&error), "volume shutdown");
        }
    }
}

/// True if another process holds the volume's lock (it is being served).
pub fn is_locked(dir: &Path) -> bool {
    DirLock::is_held(&VolumeDir::new(dir).lock())
}
