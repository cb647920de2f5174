//! A volume: the local virtual disk. Frontends (NBD, ublk) call [`Volume::read`] and
//! [`Volume::submit`]; the write path is journal first:
//!
//! 1. The writer thread takes requests in arrival order, gives each an LSN, stages it in the
//!    journal and the pending index, and group-commits: one journal write for many records.
//!    A write is acknowledged once its record is written to the journal (page cache: the
//!    volume behaves like a disk with a volatile write cache).
//! 2. The syncer thread makes the journal durable (fdatasync) for FLUSH and FUA, which
//!    complete only then, and in the background at least every few milliseconds.
//! 3. The applier thread applies records to the backing store in LSN order, but only once
//!    they are durable in the journal, so the backing store never holds a write the journal
//!    lacks. Until then reads see them through the pending index.
//! 4. Checkpoints fdatasync the backing store, record the applied LSN in `state.json` and
//!    trim the journal up to it (and, with mirrors, no further than they have received).
//! 5. On open, journal recovery runs and records after the checkpoint are redone.

pub mod config;
pub mod index;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{VolumeConfig, VolumeState};
use config::*;
use index::{apply_overlays, ExtentData, PendingIndex};

use crate::journal::{apply_record, AppendError, Journal, JournalError, JournalReader, JournalWriter, RecordKind, FLAG_FUA};
use crate::lock;

/// The journal is made durable at least this often while unsynced records exist, so the
/// applier (which applies only durable records) keeps moving without any FLUSH.
const BACKGROUND_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Checkpoint (fdatasync backing, save state, trim) at least this often when records were
/// applied, and sooner once the journal is half full. Rarer checkpoints mean fewer forced
/// writebacks of the backing store; the journal bounds how much a restart must redo.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// How often (in applied records) the applier looks at journal fill between checkpoints.
const FILL_CHECK_RECORDS: u64 = 256;
/// Requests queued to the writer before submitters block.
const REQUEST_QUEUE: usize = 1024;
/// Accounting cost of a record without payload.
const RECORD_OVERHEAD: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{dir} holds no volume (no {CONFIG_FILE}); create one with `ublk-mirror volume create`")]
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
    Identity(#[from] crate::identity::IdentityError),
    #[error("volume {dir} is in use by another process ({holder})")]
    InUse { dir: PathBuf, holder: String },
    #[error("{0}")]
    Invalid(String),
    #[error("backing store {path} does not exist")]
    BackingMissing { path: PathBuf },
    #[error("backing store {path} is {actual} bytes but the volume is {expected} bytes")]
    SizeMismatch { path: PathBuf, actual: u64, expected: u64 },
    #[error("request at offset {offset} length {length} is outside the device (size {size})")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("volume stopped after an I/O error: {0}")]
    Failed(String),
    #[error("volume is shutting down")]
    ShuttingDown,
}

impl VolumeError {
    /// The errno a frontend returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::OutOfRange { .. } | VolumeError::Invalid(_) => libc::EINVAL,
            VolumeError::ShuttingDown => libc::ESHUTDOWN,
            _ => libc::EIO,
        }
    }
}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> VolumeError {
    let context = context.into();
    move |source| VolumeError::Io { context, source }
}

/// A request that changes the device (or asks for durability).
#[derive(Debug, Clone)]
pub enum WriteOp {
    Write { offset: u64, data: Arc<Vec<u8>>, fua: bool },
    WriteZeroes { offset: u64, length: u64, fua: bool },
    Discard { offset: u64, length: u64 },
    /// Completes once every write acknowledged before it is durable.
    Flush,
}

impl WriteOp {
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            WriteOp::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            WriteOp::WriteZeroes { offset, length, .. } | WriteOp::Discard { offset, length } => Some((*offset, *length)),
            WriteOp::Flush => None,
        }
    }
}

/// Called exactly once when a request completes.
pub type Completion = Box<dyn FnOnce(Result<(), VolumeError>) + Send + 'static>;

struct Request {
    op: WriteOp,
    completion: Completion,
}

/// A journaled record on its way to the backing store.
struct ApplyItem {
    lsn: u64,
    kind: RecordKind,
    offset: u64,
    length: u64,
    data: Option<Arc<Vec<u8>>>,
    cost: u64,
}

/// Options of `volume create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub name: String,
    pub size: u64,
    pub backing: Option<PathBuf>,
    pub journal_size: Option<u64>,
    pub segment_size: Option<u64>,
    pub pending_window: Option<u64>,
}

pub const DEFAULT_JOURNAL_SIZE: u64 = 1 << 30;
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
pub const DEFAULT_PENDING_WINDOW: u64 = 64 << 20;

/// What `volume create` made.
#[derive(Debug, Clone)]
pub struct Created {
    pub config: VolumeConfig,
    pub fingerprint: String,
}

/// Mode of a volume as status reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Writes are journaled and acknowledged at local speed.
    #[default]
    Journaling,
    /// The journal is at its size cap: new writes wait until it is trimmed.
    Full,
    /// An I/O error stopped the volume; it refuses writes until restarted.
    Failed,
    /// Nothing serves the volume.
    Stopped,
}

/// Counters for status and benchmarks.
#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
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

struct Progress {
    pending_bytes: u64,
    synced_lsn: u64,
    applied_lsn: u64,
    stopping: bool,
    /// Set while the writer waits for the pending window (the applier wakes it only then).
    writer_waiting: bool,
    /// Set while the applier waits for the journal to become durable.
    applier_waiting: bool,
}

struct Shared {
    dir: PathBuf,
    size: u64,
    backing: File,
    backing_is_device: bool,
    journal: Arc<Journal>,
    index: Mutex<PendingIndex>,
    progress: Mutex<Progress>,
    progress_changed: Condvar,
    pending_window: u64,
    last_lsn: AtomicU64,
    checkpoint_lsn: AtomicU64,
    /// The journal is never trimmed past this LSN: what every mirror has received.
    trim_floor: AtomicU64,
    /// Set by [`Volume::begin_shutdown`]: a writer waiting for journal space gives up (a full
    /// journal held by an unreachable mirror would otherwise keep the volume from stopping).
    closing: AtomicBool,
    failure: Mutex<Option<String>>,
    state: Mutex<VolumeState>,
    counters: Counters,
    latency: crate::metrics::RequestLatency,
}

impl Shared {
    /// Records that the journal is durable through `synced` and wakes the applier if it waits.
    fn publish_synced(&self, synced: u64) {
        let mut progress = lock(&self.progress);
        if synced > progress.synced_lsn {
            progress.synced_lsn = synced;
            if progress.applier_waiting {
                self.progress_changed.notify_all();
            }
        }
    }

    fn fail(&self, message: String) {
        tracing::error!(%message, "volume failed; refusing further writes");
        let mut failure = lock(&self.failure);
        if failure.is_none() {
            *failure = Some(message);
        }
        drop(failure);
        lock(&self.progress).stopping = true;
        self.progress_changed.notify_all();
    }

    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

}

/// An open, served volume.
pub struct Volume {
    config: VolumeConfig,
    shared: Arc<Shared>,
    submit: Mutex<Option<SyncSender<Request>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    _lock: File,
}

impl Volume {
    /// Creates a volume's state directory: config, journal, state and identity.
    pub fn create(dir: &Path, options: &CreateOptions) -> Result<Created, VolumeError> {
        validate_name(&options.name).map_err(|e| VolumeError::Invalid(format!("volume name {e}")))?;
        if options.size == 0 || !options.size.is_multiple_of(LOGICAL_BLOCK_SIZE) {
            return Err(VolumeError::Invalid(format!("volume size {} must be a positive multiple of {LOGICAL_BLOCK_SIZE} bytes", options.size)));
        }
        let journal_size = options.journal_size.unwrap_or(DEFAULT_JOURNAL_SIZE);
        let segment_size = options.segment_size.unwrap_or_else(|| DEFAULT_SEGMENT_SIZE.min(journal_size / 4 / 4096 * 4096).max(crate::journal::MIN_SEGMENT_SIZE));
        let absolute_dir = std::path::absolute(dir).map_err(io_context(format!("resolve {}", dir.display())))?;
        let backing = match &options.backing {
            Some(path) => std::path::absolute(path).map_err(io_context(format!("resolve {}", path.display())))?,
            None => absolute_dir.join(DEFAULT_BACKING),
        };
        let mut config = VolumeConfig {
            format_version: CONFIG_FORMAT,
            name: options.name.clone(),
            uuid: uuid::Uuid::new_v4(),
            size: options.size,
            backing: backing.clone(),
            journal: JournalConfig { capacity: journal_size, segment_size, pending_window: 0 },
            run: Default::default(),
        };
        config.journal.pending_window = options.pending_window.unwrap_or(DEFAULT_PENDING_WINDOW.min(journal_size / 2));
        config.validate().map_err(|message| VolumeError::Invalid(format!("invalid volume settings: {message}")))?;

        // Check the backing store before touching the disk.
        if let Some(path) = &options.backing {
            let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(VolumeError::BackingMissing { path: path.clone() }),
                Err(error) => return Err(io_context(format!("open backing store {}", path.display()))(error)),
            };
            let meta = file.metadata().map_err(io_context(format!("stat {}", path.display())))?;
            if !meta.is_file() && !crate::fsutil::is_block_device(&file).unwrap_or(false) {
                return Err(VolumeError::Invalid(format!("backing store {} is neither a regular file nor a block device", path.display())));
            }
            let actual = crate::fsutil::storage_size(&file).map_err(io_context(format!("size of {}", path.display())))?;
            if actual != options.size {
                return Err(VolumeError::SizeMismatch { path: path.clone(), actual, expected: options.size });
            }
        }
        let created_dir = match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(VolumeError::AlreadyExists { dir: dir.to_path_buf() });
                }
                false
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io_context(format!("create {}", dir.display())))?;
                true
            }
            Err(error) => return Err(io_context(format!("read {}", dir.display()))(error)),
        };
        let result = (|| {
            if options.backing.is_none() {
                let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&backing).map_err(io_context(format!("create {}", backing.display())))?;
                file.set_len(options.size).map_err(io_context(format!("size {}", backing.display())))?;
                file.sync_all().map_err(io_context(format!("sync {}", backing.display())))?;
            }
            Journal::create(&dir.join(JOURNAL_DIR), config.journal_options())?;
            let fingerprint = crate::identity::create(&dir.join(IDENTITY_DIR), &options.name)?;
            VolumeState { format_version: CONFIG_FORMAT, applied_lsn: 0, generation: uuid::Uuid::new_v4(), clean_shutdown: true }.save(dir)?;
            // The config file is written last: its presence marks a complete volume.
            config.save(dir)?;
            crate::fsutil::sync_dir(dir).map_err(io_context(format!("sync {}", dir.display())))?;
            Ok(fingerprint)
        })();
        match result {
            Ok(fingerprint) => Ok(Created { config, fingerprint }),
            Err(error) => {
                // Leave nothing half-made behind.
                if created_dir {
                    let _ = std::fs::remove_dir_all(dir);
                } else {
                    for entry in [CONFIG_FILE, STATE_FILE, JOURNAL_DIR, IDENTITY_DIR, DEFAULT_BACKING] {
                        let path = dir.join(entry);
                        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                }
                Err(error)
            }
        }
    }

    /// Opens the volume in `dir` for serving: locks it, recovers the journal, redoes records
    /// past the last checkpoint, and starts the writer and applier threads.
    pub fn open(dir: &Path) -> Result<Volume, VolumeError> {
        let config = VolumeConfig::load(dir)?;
        let lock_file = acquire_lock(dir)?;
        let backing = match std::fs::OpenOptions::new().read(true).write(true).open(&config.backing) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(VolumeError::BackingMissing { path: config.backing.clone() }),
            Err(error) => return Err(io_context(format!("open backing store {}", config.backing.display()))(error)),
        };
        let actual = crate::fsutil::storage_size(&backing).map_err(io_context(format!("size of {}", config.backing.display())))?;
        if actual != config.size {
            return Err(VolumeError::SizeMismatch { path: config.backing.clone(), actual, expected: config.size });
        }
        let backing_is_device = crate::fsutil::is_block_device(&backing).unwrap_or(false);
        let mut state = VolumeState::load(dir)?;
        let (journal, writer, report) = Journal::open(&dir.join(JOURNAL_DIR), config.journal_options())?;
        if let Some(tail) = &report.torn_tail {
            tracing::warn!(%tail, "journal had a torn tail (writes never acknowledged as durable)");
        }
        if state.applied_lsn > report.last_lsn {
            return Err(VolumeError::Journal(JournalError::Corrupt(format!(
                "state.json says records through LSN {} were applied, but the journal ends at LSN {}",
                state.applied_lsn, report.last_lsn
            ))));
        }
        if state.applied_lsn + 1 < report.first_lsn {
            return Err(VolumeError::Journal(JournalError::Corrupt(format!(
                "the journal starts at LSN {} but the backing store is only known to hold records through LSN {}",
                report.first_lsn, state.applied_lsn
            ))));
        }
        let redone = redo(&journal, state.applied_lsn, &backing, backing_is_device)?;
        if redone > 0 {
            tracing::info!(records = redone, from = state.applied_lsn + 1, to = report.last_lsn, "redid journal records into the backing store");
        }
        state.applied_lsn = report.last_lsn;
        state.clean_shutdown = false;
        state.save(dir)?;

        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            size: config.size,
            backing,
            backing_is_device,
            journal: journal.clone(),
            index: Mutex::new(PendingIndex::default()),
            progress: Mutex::new(Progress { pending_bytes: 0, synced_lsn: report.last_lsn, applied_lsn: report.last_lsn, stopping: false, writer_waiting: false, applier_waiting: false }),
            progress_changed: Condvar::new(),
            pending_window: config.journal.pending_window,
            last_lsn: AtomicU64::new(report.last_lsn),
            checkpoint_lsn: AtomicU64::new(report.last_lsn),
            trim_floor: AtomicU64::new(crate::replication::mirror::trim_floor(dir)),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
            state: Mutex::new(state),
            counters: Counters::default(),
            latency: Default::default(),
        });
        // Trim what the checkpoint already covers (and every mirror has received).
        if !crate::failpoint::enabled("journal-no-trim") {
            journal.trim_through(report.last_lsn.min(shared.trim_floor.load(Ordering::Acquire)))?;
        }
        let (request_tx, request_rx) = mpsc::sync_channel(REQUEST_QUEUE);
        let (apply_tx, apply_rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let syncer_shared = shared.clone();
        let applier_shared = shared.clone();
        let threads = vec![
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || WriterLoop::new(writer_shared, writer, apply_tx, sync_tx).run(request_rx))
                .map_err(io_context("start journal writer thread"))?,
            std::thread::Builder::new()
                .name("journal-syncer".into())
                .spawn(move || syncer_loop(syncer_shared, sync_rx))
                .map_err(io_context("start journal syncer thread"))?,
            std::thread::Builder::new()
                .name("applier".into())
                .spawn(move || applier_loop(applier_shared, apply_rx))
                .map_err(io_context("start applier thread"))?,
        ];
        Ok(Volume { config, shared, submit: Mutex::new(Some(request_tx)), threads: Mutex::new(threads), _lock: lock_file })
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    pub fn size(&self) -> u64 {
        self.shared.size
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.shared.journal
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.shared.size => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, length, size: self.shared.size }),
        }
    }

    /// Reads device bytes: the backing store with not-yet-applied records laid over it.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        // Take the overlays before reading the backing store: a record removed from the
        // index in between has already been written to the backing store.
        let overlays = lock(&self.shared.index).overlays(offset, buf.len() as u64);
        self.shared.backing.read_exact_at(buf, offset).map_err(io_context("read backing store"))?;
        apply_overlays(buf, offset, &overlays);
        self.shared.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads device bytes for a bulk scan (an initial synchronisation): a range that is a hole
    /// in the backing store with nothing pending over it is reported as zeros without being
    /// read (returns true, `buf` zeroed), and what is read is dropped from the page cache
    /// afterwards. Either way the result equals [`Volume::read`]'s. (Reading holes would fill
    /// the page cache with zero pages that make later small writes to them expensive.)
    pub fn read_for_scan(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        let length = buf.len() as u64;
        // Overlays first, as in `read`: a record applied after this look is in the backing
        // store by the time SEEK_DATA looks.
        let overlays = lock(&self.shared.index).overlays(offset, length);
        if overlays.is_empty() && !self.shared.backing_is_device && crate::fsutil::is_hole(&self.shared.backing, offset, length) {
            buf.fill(0);
            return Ok(true);
        }
        self.shared.backing.read_exact_at(buf, offset).map_err(io_context("read backing store"))?;
        crate::fsutil::drop_from_cache(&self.shared.backing, offset, length);
        apply_overlays(buf, offset, &overlays);
        Ok(false)
    }

    /// Queues a write-side request; `completion` runs once it is done (on the writer thread).
    pub fn submit(&self, op: WriteOp, completion: Completion) {
        if let Some((offset, length)) = op.range() {
            if let Err(error) = self.check_range(offset, length) {
                return completion(Err(error));
            }
            if let WriteOp::Write { data, .. } = &op {
                if data.len() as u64 > self.config.max_io() {
                    return completion(Err(VolumeError::Invalid(format!("write of {} bytes exceeds the maximum I/O size {}", data.len(), self.config.max_io()))));
                }
            }
        }
        let started = std::time::Instant::now();
        let shared = self.shared.clone();
        let is_flush = matches!(op, WriteOp::Flush);
        let is_discard = matches!(op, WriteOp::Discard { .. });
        let completion: Completion = Box::new(move |result| {
            let latency = &shared.latency;
            let histogram = if is_flush { &latency.flush } else if is_discard { &latency.discard } else { &latency.write };
            histogram.observe(started.elapsed());
            completion(result)
        });
        let sender = lock(&self.submit).clone();
        let Some(sender) = sender else { return completion(Err(VolumeError::ShuttingDown)) };
        if let Err(mpsc::SendError(request)) = sender.send(Request { op, completion }) {
            (request.completion)(Err(VolumeError::ShuttingDown));
        }
    }

    /// Submits and waits (for tools and tests).
    pub fn submit_and_wait(&self, op: WriteOp) -> Result<(), VolumeError> {
        let (tx, rx) = mpsc::channel();
        self.submit(op, Box::new(move |result| {
            let _ = tx.send(result);
        }));
        rx.recv().unwrap_or(Err(VolumeError::ShuttingDown))
    }

    pub fn numbers(&self) -> VolumeNumbers {
        let progress = lock(&self.shared.progress);
        let failure = self.shared.failure();
        let counters = &self.shared.counters;
        VolumeNumbers {
            mode: if failure.is_some() {
                Mode::Failed
            } else if self.shared.journal.is_full() {
                Mode::Full
            } else {
                Mode::Journaling
            },
            last_lsn: self.shared.last_lsn.load(Ordering::Acquire),
            synced_lsn: progress.synced_lsn,
            applied_lsn: progress.applied_lsn,
            checkpoint_lsn: self.shared.checkpoint_lsn.load(Ordering::Acquire),
            pending_bytes: progress.pending_bytes,
            writes: counters.writes.load(Ordering::Relaxed),
            written_bytes: counters.written_bytes.load(Ordering::Relaxed),
            flushes: counters.flushes.load(Ordering::Relaxed),
            reads: counters.reads.load(Ordering::Relaxed),
            read_bytes: counters.read_bytes.load(Ordering::Relaxed),
            failure,
        }
    }

    /// Request latency histograms (for metrics).
    pub fn latency(&self) -> &crate::metrics::RequestLatency {
        &self.shared.latency
    }

    /// Limits journal trimming to LSNs every mirror has received (senders call this on acks).
    pub fn set_trim_floor(&self, lsn: u64) {
        let previous = self.shared.trim_floor.swap(lsn, Ordering::AcqRel);
        // A full journal held by a lagging mirror: writers wait for a trim, and the applier
        // (idle, everything applied) has no reason to checkpoint. Trim here, through what is
        // already durable in the backing store, so the mirror's progress frees space at once.
        if lsn > previous && self.shared.journal.is_full() && !crate::failpoint::enabled("journal-no-trim") {
            let durable = self.shared.checkpoint_lsn.load(Ordering::Acquire);
            if let Err(error) = self.shared.journal.trim_through(durable.min(lsn)) {
                tracing::warn!(error = %error, "journal trim failed; will retry at the next checkpoint");
            }
        }
    }

    pub fn generation(&self) -> uuid::Uuid {
        lock(&self.shared.state).generation
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
        state.save(&self.shared.dir)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(error = %format!("{error:#}"), "volume shutdown");
        }
    }
}

fn acquire_lock(dir: &Path) -> Result<File, VolumeError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_context(format!("open {}", path.display())))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(VolumeError::InUse { dir: dir.to_path_buf(), holder: if holder.is_empty() { "unknown process".into() } else { format!("pid {holder}") } });
    }
    let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| writeln!(file, "{}", std::process::id()));
    Ok(file)
}

/// True if another process holds the volume's lock (it is being served).
pub fn is_locked(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else { return false };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(_) => true,
    }
}

/// Re-applies records after `applied_lsn` to the backing store and makes them durable.
fn redo(journal: &Arc<Journal>, applied_lsn: u64, backing: &File, is_device: bool) -> Result<u64, VolumeError> {
    let mut reader = JournalReader::new(journal.clone(), applied_lsn + 1)?;
    let mut count = 0;
    while let Some(record) = reader.next_record()? {
        let header = record.header;
        apply_record(backing, is_device, header.kind, header.offset, header.length, &record.payload).map_err(io_context(format!("redo LSN {} into the backing store", header.lsn)))?;
        count += 1;
    }
    if count > 0 {
        backing.sync_data().map_err(io_context("sync backing store"))?;
    }
    Ok(count)
}

/// A request that completes only once the journal is durable through `lsn`.
struct DurabilityWaiter {
    lsn: u64,
    completion: Completion,
}

/// The writer thread: LSN assignment, group commit, acknowledgements.
struct WriterLoop {
    shared: Arc<Shared>,
    writer: JournalWriter,
    apply: Sender<ApplyItem>,
    syncer: Sender<DurabilityWaiter>,
    /// Completed when the batch is written.
    completions: Vec<Completion>,
    /// Completed when the batch is durable (FLUSH, FUA).
    durable_completions: Vec<Completion>,
    to_apply: Vec<ApplyItem>,
}

impl WriterLoop {
    fn new(shared: Arc<Shared>, writer: JournalWriter, apply: Sender<ApplyItem>, syncer: Sender<DurabilityWaiter>) -> Self {
        WriterLoop { shared, writer, apply, syncer, completions: Vec::new(), durable_completions: Vec::new(), to_apply: Vec::new() }
    }

    fn run(mut self, requests: Receiver<Request>) {
        while let Ok(request) = requests.recv() {
            self.handle(request);
            // Group commit: everything that queued up while we were busy goes in one write.
            while self.writer.staged_bytes() < crate::journal::MAX_BATCH_BYTES / 2 && self.completions.len() + self.durable_completions.len() < 512 {
                match requests.try_recv() {
                    Ok(request) => self.handle(request),
                    Err(_) => break,
                }
            }
            self.finish_batch(false);
        }
        self.finish_batch(true);
        let mut progress = lock(&self.shared.progress);
        progress.stopping = true;
        drop(progress);
        self.shared.progress_changed.notify_all();
    }

    fn handle(&mut self, request: Request) {
        if let Some(failure) = self.shared.failure() {
            return (request.completion)(Err(VolumeError::Failed(failure)));
        }
        let (kind, offset, length, data, fua) = match request.op {
            WriteOp::Flush => {
                self.shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
                self.durable_completions.push(request.completion);
                return;
            }
            WriteOp::Write { offset, data, fua } => (RecordKind::Write, offset, data.len() as u64, Some(data), fua),
            WriteOp::WriteZeroes { offset, length, fua } => (RecordKind::WriteZeroes, offset, length, None, fua),
            WriteOp::Discard { offset, length } => (RecordKind::Discard, offset, length, None, false),
        };
        let cost = data.as_ref().map_or(0, |d| d.len() as u64) + RECORD_OVERHEAD;
        self.wait_for_window(cost);
        let payload: &[u8] = data.as_ref().map_or(&[], |d| d.as_slice());
        let flags = if fua { FLAG_FUA } else { 0 };
        let lsn = loop {
            match self.writer.append(kind, offset, length, payload, flags) {
                Ok(lsn) => break lsn,
                Err(AppendError::JournalFull) => {
                    // Let everything staged reach the applier, then wait for a trim.
                    self.finish_batch(true);
                    if let Some(failure) = self.shared.failure() {
                        return (request.completion)(Err(VolumeError::Failed(failure)));
                    }
                    tracing::warn!("journal full: writes wait until it is trimmed");
                    loop {
                        if self.shared.closing.load(Ordering::Acquire) {
                            // Not journaled, so not acknowledged: the client sees the error
                            // and nothing it was told is safe is lost.
                            tracing::warn!(offset, length, "stopping with a full journal: a waiting write fails");
                            return (request.completion)(Err(VolumeError::ShuttingDown));
                        }
                        if self.writer.wait_for_space(Duration::from_millis(200)) {
                            break;
                        }
                    }
                }
                Err(AppendError::Failed(error)) => {
                    self.shared.fail(format!("journal append: {error}"));
                    return (request.completion)(Err(VolumeError::Journal(error)));
                }
            }
        };
        let extent = match &data {
            Some(buffer) => ExtentData::Bytes { buffer: buffer.clone(), start: 0 },
            None => ExtentData::Zero,
        };
        lock(&self.shared.index).insert(offset, length, lsn, extent);
        lock(&self.shared.progress).pending_bytes += cost;
        self.shared.last_lsn.store(lsn, Ordering::Release);
        self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.written_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
        if fua {
            self.durable_completions.push(request.completion);
        } else {
            self.completions.push(request.completion);
        }
        self.to_apply.push(ApplyItem { lsn, kind, offset, length, data, cost });
    }

    /// Back-pressure: wait while the records not yet applied exceed the pending window.
    fn wait_for_window(&mut self, cost: u64) {
        let window = self.shared.pending_window;
        let over = move |p: &Progress| p.pending_bytes > 0 && p.pending_bytes + cost > window && !p.stopping;
        if !over(&lock(&self.shared.progress)) {
            return;
        }
        // The applier only applies durable records: make ours durable before waiting on it.
        self.finish_batch(true);
        let mut progress = lock(&self.shared.progress);
        while over(&progress) {
            progress.writer_waiting = true;
            progress = self.shared.progress_changed.wait_timeout(progress, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        progress.writer_waiting = false;
    }

    /// Writes the staged records; acknowledges plain writes, hands FLUSH/FUA to the syncer
    /// (or, with `sync`, makes the journal durable here and completes them too).
    fn finish_batch(&mut self, sync: bool) {
        if self.completions.is_empty() && self.durable_completions.is_empty() && self.to_apply.is_empty() && !sync {
            return;
        }
        match self.writer.commit(sync) {
            Ok(()) => {
                if sync {
                    self.shared.publish_synced(self.writer.synced_lsn());
                }
                for item in self.to_apply.drain(..) {
                    let _ = self.apply.send(item);
                }
                for completion in self.completions.drain(..) {
                    completion(Ok(()));
                }
                let lsn = self.writer.written_lsn();
                for completion in self.durable_completions.drain(..) {
                    if sync {
                        completion(Ok(()));
                    } else if let Err(mpsc::SendError(waiter)) = self.syncer.send(DurabilityWaiter { lsn, completion }) {
                        (waiter.completion)(Err(VolumeError::ShuttingDown));
                    }
                }
            }
            Err(error) => {
                let message = format!("journal commit: {error}");
                self.shared.fail(message.clone());
                self.to_apply.clear();
                for completion in self.completions.drain(..).chain(self.durable_completions.drain(..)) {
                    completion(Err(VolumeError::Failed(message.clone())));
                }
            }
        }
    }
}

/// The syncer thread: fdatasync of the journal for FLUSH/FUA waiters, and in the background
/// so the applier (which applies only durable records) never waits long.
fn syncer_loop(shared: Arc<Shared>, waiters: Receiver<DurabilityWaiter>) {
    let mut waiting: Vec<DurabilityWaiter> = Vec::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        match waiters.recv_timeout(BACKGROUND_SYNC_INTERVAL) {
            Ok(waiter) => {
                waiting.push(waiter);
                waiting.extend(waiters.try_iter());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        if waiting.is_empty() && shared.journal.written_lsn() <= shared.journal.synced_lsn() {
            continue;
        }
        match shared.journal.sync() {
            Ok(synced) => {
                shared.publish_synced(synced);
                let (done, later): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|w| w.lsn <= synced);
                waiting = later;
                for waiter in done {
                    (waiter.completion)(Ok(()));
                }
            }
            Err(error) => {
                let message = format!("journal sync: {error}");
                shared.fail(message.clone());
                for waiter in waiting.drain(..) {
                    (waiter.completion)(Err(VolumeError::Failed(message.clone())));
                }
                // Keep answering (with the failure) until the writer stops.
                for waiter in waiters.iter() {
                    (waiter.completion)(Err(VolumeError::Failed(message.clone())));
                }
                return;
            }
        }
    }
}

/// The applier thread: durable journal records to the backing store, in LSN order.
fn applier_loop(shared: Arc<Shared>, items: Receiver<ApplyItem>) {
    // Background work: let the threads that acknowledge requests have the CPU first. The
    // pending window bounds how far the applier may fall behind.
    lower_thread_priority(5);
    // Checkpoints run on a thread of their own: the backing store's fdatasync after seconds
    // of random writes took 1-2 s, and while the applier waited for it the pending window
    // filled and every request stalled (measured: two seconds of almost no I/O every 5 s).
    // Now records go on being applied meanwhile; a checkpoint covers what was applied when
    // it began.
    let (checkpoint_wanted, checkpoint_requests) = mpsc::sync_channel::<()>(1);
    let checkpointer = {
        let shared = shared.clone();
        std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
            for () in checkpoint_requests {
                checkpoint(&shared);
            }
        })
    };
    let checkpointer = match checkpointer {
        Ok(thread) => thread,
        Err(error) => return shared.fail(format!("start checkpoint thread: {error}")),
    };
    // One checkpoint at a time; asking while one is already queued is a no-op.
    let request_checkpoint = || {
        let _ = checkpoint_wanted.try_send(());
    };
    let mut last_checkpoint = Instant::now();
    let mut applied_since_checkpoint = false;
    // Left on a failure too (`break 'apply`), so the checkpoint thread is always joined.
    'apply: loop {
        let item = match items.recv_timeout(CHECKPOINT_INTERVAL) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                // Also when the journal is full: the trim floor may have moved since.
                if applied_since_checkpoint || shared.journal.is_full() {
                    request_checkpoint();
                    applied_since_checkpoint = false;
                    last_checkpoint = Instant::now();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Journal first: wait until the record is durable there.
        {
            let mut progress = lock(&shared.progress);
            while progress.synced_lsn < item.lsn {
                if progress.stopping && shared.failure().is_some() {
                    break 'apply;
                }
                progress.applier_waiting = true;
                progress = shared.progress_changed.wait_timeout(progress, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            }
            progress.applier_waiting = false;
        }
        if shared.failure().is_some() {
            break 'apply;
        }
        if let Err(error) = apply_record(&shared.backing, shared.backing_is_device, item.kind, item.offset, item.length, item.data.as_deref().map_or(&[], |d| d.as_slice())) {
            shared.fail(format!("apply LSN {} to the backing store: {error}", item.lsn));
            break 'apply;
        }
        lock(&shared.index).remove_applied(item.offset, item.length, item.lsn);
        {
            let mut progress = lock(&shared.progress);
            progress.pending_bytes -= item.cost;
            progress.applied_lsn = item.lsn;
            if progress.writer_waiting {
                shared.progress_changed.notify_all();
            }
        }
        applied_since_checkpoint = true;
        let journal_filling = item.lsn % FILL_CHECK_RECORDS == 0 && {
            let usage = shared.journal.usage();
            usage.used_bytes > usage.capacity_bytes / 2
        };
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL || journal_filling || shared.journal.is_full() {
            request_checkpoint();
            applied_since_checkpoint = false;
            last_checkpoint = Instant::now();
        }
    }
    drop(checkpoint_wanted);
    let _ = checkpointer.join();
    if shared.failure().is_none() {
        checkpoint(&shared);
    }
}

/// Raises the calling thread's nice value by `step` (Linux: setpriority on a thread id).
pub(crate) fn lower_thread_priority(step: i32) {
    // SAFETY: gettid and setpriority take no pointers; failure only leaves the priority as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current + step);
    }
}

/// Makes the backing store durable through the applied LSN, records it, trims the journal.
fn checkpoint(shared: &Shared) {
    let applied = lock(&shared.progress).applied_lsn;
    if let Err(error) = shared.backing.sync_data() {
        return shared.fail(format!("sync backing store: {error}"));
    }
    let mut state = lock(&shared.state);
    state.applied_lsn = applied;
    if let Err(error) = state.save(&shared.dir) {
        return shared.fail(format!("checkpoint: {error}"));
    }
    drop(state);
    shared.checkpoint_lsn.store(applied, Ordering::Release);
    if crate::failpoint::enabled("journal-no-trim") {
        return;
    }
    if let Err(error) = shared.journal.trim_through(applied.min(shared.trim_floor.load(Ordering::Acquire))) {
        tracing::warn!(error = %error, "journal trim failed; will retry at the next checkpoint");
    }
}
