//! What the volume's threads share: the backing store, the journal's retention, the pending
//! index, progress (LSNs, pending bytes) and the failure that stops the volume.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};

use super::index::PendingIndex;
use super::VolumeState;
use crate::journal::Retention;
use crate::layout::VolumeDir;
use crate::lock;
use crate::store::Store;

/// Counters for status and benchmarks.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub writes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
}

pub(super) struct Progress {
    pub pending_bytes: u64,
    pub synced_lsn: u64,
    pub applied_lsn: u64,
    pub stopping: bool,
    /// Set while the writer waits for the pending window (writeback wakes it only then).
    pub writer_waiting: bool,
    /// Set while writeback waits for the journal to become durable.
    pub writeback_waiting: bool,
}

pub(super) struct Shared {
    pub dir: VolumeDir,
    pub size: u64,
    pub backing: Store,
    pub retention: Arc<Retention>,
    pub index: Mutex<PendingIndex>,
    pub progress: Mutex<Progress>,
    pub progress_changed: Condvar,
    pub pending_window: u64,
    pub last_lsn: AtomicU64,
    /// Set by `Volume::begin_shutdown`: a writer waiting for journal space gives up (a full
    /// journal held by an unreachable mirror would otherwise keep the volume from stopping).
    pub closing: AtomicBool,
    /// Switched over: writes fail from now on.
    pub fenced: AtomicBool,
    failure: Mutex<Option<String>>,
    pub state: Mutex<VolumeState>,
    pub counters: Counters,
    pub latency: crate::latency::RequestLatency,
}

impl Shared {
    pub fn new(dir: VolumeDir, backing: Store, retention: Arc<Retention>, last_lsn: u64, pending_window: u64, state: VolumeState) -> Shared {
        Shared {
            dir,
            size: backing.size(),
            backing,
            retention,
            index: Mutex::new(PendingIndex::default()),
            progress: Mutex::new(Progress {
                pending_bytes: 0,
                synced_lsn: last_lsn,
                applied_lsn: last_lsn,
                stopping: false,
                writer_waiting: false,
                writeback_waiting: false,
            }),
            progress_changed: Condvar::new(),
            pending_window,
            last_lsn: AtomicU64::new(last_lsn),
            closing: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            failure: Mutex::new(None),
            state: Mutex::new(state),
            counters: Counters::default(),
            latency: Default::default(),
        }
    }

    /// Records that the journal is durable through `synced` and wakes writeback if it waits.
    pub fn publish_synced(&self, synced: u64) {
        let mut progress = lock(&self.progress);
        if synced > progress.synced_lsn {
            progress.synced_lsn = synced;
            if progress.writeback_waiting {
                self.progress_changed.notify_all();
            }
        }
    }

    /// Stops the volume after an I/O error: the first failure is kept and reported, every
    /// later request is refused.
    pub fn fail(&self, message: String) {
        tracing::error!(%message, "volume failed; refusing further writes");
        let mut failure = lock(&self.failure);
        if failure.is_none() {
            *failure = Some(message);
        }
        drop(failure);
        lock(&self.progress).stopping = true;
        self.progress_changed.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}
