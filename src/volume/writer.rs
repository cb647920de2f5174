//! The writer thread: LSN assignment, group commit, acknowledgements, back-pressure.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::index::ExtentData;
use super::shared::{Progress, Shared};
use super::syncer::DurabilityWaiter;
use super::writeback::ApplyItem;
use super::{Completion, VolumeError, WriteOp};
use crate::extent::Extent;
use crate::journal::{AppendError, JournalWriter, OnFull, PayloadPart, RecordKind, FLAG_FUA};
use crate::lock;

/// Accounting cost of a record without payload.
const RECORD_OVERHEAD: u64 = 64;

/// A request on its way to the writer.
pub(super) enum Request {
    Io {
        op: WriteOp,
        completion: Completion,
    },
    /// Take no new request until the hold ends (a marker, see `markers.rs`).
    Hold(HoldRequest),
}

/// A hold on new writes: granted once every request before it has an LSN; then either a
/// marker record is appended (it follows them all and precedes everything after) or the
/// hold is released, at the latest after `limit`.
pub(super) struct HoldRequest {
    pub granted: mpsc::SyncSender<()>,
    pub next: Receiver<HoldStep>,
    pub limit: Duration,
}

/// How a hold ends (a hold whose sender is dropped is released).
pub(super) enum HoldStep {
    /// End the hold with the volume fenced: every later write fails (`mirror switchover`).
    Fence { fenced: mpsc::SyncSender<()> },
    /// Append a marker record with this payload; `done` gets its LSN once it is durable.
    Mark { payload: Vec<u8>, appended: mpsc::SyncSender<u64>, done: mpsc::SyncSender<Result<u64, VolumeError>> },
}

/// The writer thread: LSN assignment, group commit, acknowledgements.
pub(super) struct WriterLoop {
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
    pub fn new(shared: Arc<Shared>, writer: JournalWriter, apply: Sender<ApplyItem>, syncer: Sender<DurabilityWaiter>) -> Self {
        WriterLoop { shared, writer, apply, syncer, completions: Vec::new(), durable_completions: Vec::new(), to_apply: Vec::new() }
    }

    pub fn run(mut self, requests: Receiver<Request>) {
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
        let (op, completion) = match request {
            Request::Io { op, completion } => (op, completion),
            Request::Hold(hold) => return self.hold(hold),
        };
        if let Some(failure) = self.shared.failure() {
            return completion(Err(VolumeError::Failed(failure)));
        }
        if self.shared.fenced.load(Ordering::Acquire) && !matches!(op, WriteOp::Flush) {
            return completion(Err(VolumeError::Fenced));
        }
        let (kind, extent, data, fua) = match op {
            WriteOp::Flush => {
                self.shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
                self.durable_completions.push(completion);
                return;
            }
            WriteOp::Write { offset, data, fua } => (RecordKind::Write, Extent::new(offset, data.len() as u64), Some(data), fua),
            WriteOp::WriteZeroes { extent, fua } => (RecordKind::WriteZeroes, extent, None, fua),
            WriteOp::Discard { extent } => (RecordKind::Discard, extent, None, false),
        };
        let payload: &[u8] = data.as_ref().map_or(&[], |d| d.as_slice());
        let flags = if fua { FLAG_FUA } else { 0 };
        // The journal writes the request's buffer from where it is (no copy into its batch).
        let shared = data.as_ref().map(|d| bytes::Bytes::from_owner(SharedPayload(d.clone())));
        let lsn = match self.append(kind, extent, shared.as_slice(), flags) {
            Ok(lsn) => lsn,
            Err(error) => return completion(Err(error)),
        };
        let cost = payload.len() as u64 + RECORD_OVERHEAD;
        let overlay = match &data {
            Some(buffer) => ExtentData::Bytes { buffer: buffer.clone(), start: 0 },
            None => ExtentData::Zero,
        };
        lock(&self.shared.index).insert(extent, lsn, overlay);
        self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.written_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
        if fua {
            self.durable_completions.push(completion);
        } else {
            self.completions.push(completion);
        }
        self.to_apply.push(ApplyItem { lsn, kind, extent, data, cost });
    }

    /// A hold: everything before it is written (and acknowledged) first, so the hold delays
    /// only what arrives during it.
    fn hold(&mut self, hold: HoldRequest) {
        self.finish_batch(false);
        if hold.granted.send(()).is_err() {
            return;
        }
        let (payload, appended, done) = match hold.next.recv_timeout(hold.limit) {
            Ok(HoldStep::Mark { payload, appended, done }) => (payload, appended, done),
            Ok(HoldStep::Fence { fenced }) => {
                self.shared.fenced.store(true, Ordering::Release);
                tracing::warn!("volume fenced: it takes no more writes (switched over)");
                let _ = fenced.send(());
                return;
            }
            Err(_) => {
                tracing::debug!("write hold released without a marker");
                return;
            }
        };
        let lsn = match self.append(RecordKind::Marker, Extent::default(), &[payload.as_slice()], 0) {
            Ok(lsn) => lsn,
            Err(error) => {
                let _ = done.send(Err(error));
                return;
            }
        };
        let _ = appended.send(lsn);
        self.to_apply.push(ApplyItem { lsn, kind: RecordKind::Marker, extent: Extent::default(), data: None, cost: payload.len() as u64 + RECORD_OVERHEAD });
        // Durable before the marker is reported: the applier takes its snapshot from it.
        self.durable_completions.push(Box::new(move |result| {
            let _ = done.send(result.map(|()| lsn));
        }));
        self.finish_batch(false);
    }

    /// Appends one record, waiting for journal space as the policy says, and counts it as
    /// pending; an error means it was not journaled (so must not be acknowledged).
    fn append(&mut self, kind: RecordKind, extent: Extent, payload: &[impl PayloadPart], flags: u16) -> Result<u64, VolumeError> {
        let cost = payload.iter().map(|part| part.as_ref().len() as u64).sum::<u64>() + RECORD_OVERHEAD;
        self.wait_for_window(cost);
        let lsn = loop {
            match self.writer.append_parts(kind, extent, payload, flags) {
                Ok(lsn) => break lsn,
                Err(AppendError::JournalFull) => {
                    // Let everything staged reach writeback, then wait for a trim.
                    self.finish_batch(true);
                    if let Some(failure) = self.shared.failure() {
                        return Err(VolumeError::Failed(failure));
                    }
                    let retention = &self.shared.retention;
                    if retention.policy() == OnFull::Track {
                        // Mirrors never hold writes back: their holds go now (they track);
                        // what is left to wait for is the local checkpoint.
                        if let Err(error) = retention.trim() {
                            tracing::warn!(%error, "journal trim failed");
                        }
                        tracing::debug!("journal full: waiting for the local checkpoint");
                    } else {
                        tracing::warn!("journal full: writes wait until it is trimmed (on_full = block)");
                    }
                    loop {
                        // A failed volume trims nothing more (its checkpoints stop): the wait
                        // would never end, so the write gets the failure.
                        if let Some(failure) = self.shared.failure() {
                            return Err(VolumeError::Failed(failure));
                        }
                        if self.shared.closing.load(Ordering::Acquire) {
                            // Not journaled, so not acknowledged: the client sees the error
                            // and nothing it was told is safe is lost.
                            tracing::warn!(offset = extent.offset, length = extent.length, "stopping with a full journal: a waiting write fails");
                            return Err(VolumeError::ShuttingDown);
                        }
                        if self.writer.wait_for_space(Duration::from_millis(200)) {
                            break;
                        }
                    }
                }
                Err(AppendError::Failed(error)) => {
                    let message = format!("journal append: {error}");
                    self.shared.fail(message.clone());
                    return Err(VolumeError::disk(message, &error));
                }
            }
        };
        lock(&self.shared.progress).pending_bytes += cost;
        self.shared.last_lsn.store(lsn, Ordering::Release);
        Ok(lsn)
    }

    /// Back-pressure: wait while the records not yet applied exceed the pending window.
    fn wait_for_window(&mut self, cost: u64) {
        let window = self.shared.pending_window;
        let over = move |p: &Progress| p.pending_bytes > 0 && p.pending_bytes + cost > window && !p.stopping;
        if !over(&lock(&self.shared.progress)) {
            return;
        }
        // Writeback only applies durable records: make ours durable before waiting on it.
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
        if let Some(failure) = self.shared.failure() {
            // After a disk error nothing more is written (not even at shutdown): what is
            // staged was never acknowledged, and its requests fail.
            self.to_apply.clear();
            for completion in self.completions.drain(..).chain(self.durable_completions.drain(..)) {
                completion(Err(VolumeError::Failed(failure.clone())));
            }
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
                // Not journaled, so not acknowledged: each of these requests gets the disk's
                // errno (ENOSPC when it was full); every later one gets EIO.
                for completion in self.completions.drain(..).chain(self.durable_completions.drain(..)) {
                    completion(Err(VolumeError::disk(message.clone(), &error)));
                }
            }
        }
    }
}

/// A write request's buffer, shared with the journal writer until its commit.
struct SharedPayload(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedPayload {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
