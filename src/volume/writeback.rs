//! The writeback thread: durable journal records to the backing store, in LSN order, and
//! the checkpoints that make the backing store durable and let the journal be trimmed.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::Shared;
use crate::extent::Extent;
use crate::journal::RecordKind;
use crate::lock;
use crate::store::{DirectWriter, Store, DIRECT_QUEUE};

/// Checkpoint (fdatasync backing, save state, trim) at least this often when records were
/// applied, and sooner once the journal is half full. Rarer checkpoints mean fewer forced
/// writebacks of the backing store; the journal bounds how much a restart must redo.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// While no record arrives, writeback looks this often whether a checkpoint is due: a full
/// journal must be trimmed at once (the writer can find it full after the last batch was
/// applied, and waited out the whole interval: 5 s stalls), an idle one once the interval
/// since the last checkpoint has passed.
const IDLE_LOOK: Duration = Duration::from_millis(100);
/// A full journal is checkpointed at most this often while idle (its trim floor may be held
/// by a mirror, and then each checkpoint frees nothing).
const FULL_CHECKPOINT_GAP: Duration = Duration::from_millis(200);
/// How often (in applied records) writeback looks at journal fill between checkpoints.
const FILL_CHECK_RECORDS: u64 = 256;
/// Background work: nice value added to the writeback thread.
const WRITEBACK_NICE: i32 = 5;

/// A journaled record on its way to the backing store.
pub(super) struct ApplyItem {
    pub lsn: u64,
    pub kind: RecordKind,
    pub extent: Extent,
    pub data: Option<Arc<Vec<u8>>>,
    /// What the record counts against the pending window.
    pub cost: u64,
}

/// `direct`: aligned writes go to the backing store with O_DIRECT, in batches through
/// io_uring (`backing_writes = "direct"`); otherwise every record through the page cache.
pub(super) fn run(shared: Arc<Shared>, items: Receiver<ApplyItem>, direct: bool) {
    // Background work: let the threads that acknowledge requests have the CPU first. The
    // pending window bounds how far writeback may fall behind.
    crate::priority::lower_current_thread(WRITEBACK_NICE);
    // Checkpoints run on a thread of their own: the backing store's fdatasync after seconds
    // of random writes took 1-2 s, and while writeback waited for it the pending window
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
    let mut direct = match direct.then(|| shared.backing.direct_writer()) {
        Some(Ok(Some(writer))) => {
            tracing::info!(backing = %shared.backing.path().display(), "writeback writes the backing store with O_DIRECT (backing_writes = direct)");
            Some(writer)
        }
        Some(Ok(None)) => {
            tracing::warn!(backing = %shared.backing.path().display(), "backing_writes = direct, but the file system refuses O_DIRECT: writing through the page cache");
            None
        }
        Some(Err(error)) => {
            tracing::warn!(%error, "backing_writes = direct, but io_uring is not available: writing through the page cache");
            None
        }
        None => None,
    };
    // A record taken from the channel that was not durable yet: the next batch starts with it.
    let mut carried: Option<ApplyItem> = None;
    // Left on a failure too (`break 'apply`), so the checkpoint thread is always joined.
    'apply: loop {
        let received = match carried.take() {
            Some(item) => Ok(item),
            None => items.recv_timeout(IDLE_LOOK),
        };
        let item = match received {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                // A failed volume checkpoints nothing more: the journal keeps every record not
                // checkpointed (a later fdatasync may report success for pages whose write-out
                // failed before, and a checkpoint then would trim records never on disk).
                if shared.failure().is_some() {
                    break 'apply;
                }
                // Also when nothing was applied and the journal is full: the trim floor may
                // have moved since.
                let since = last_checkpoint.elapsed();
                let full = since >= FULL_CHECKPOINT_GAP && shared.retention.journal().is_full();
                if full || (applied_since_checkpoint && since >= CHECKPOINT_INTERVAL) {
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
                progress.writeback_waiting = true;
                progress = shared.progress_changed.wait_timeout(progress, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            }
            progress.writeback_waiting = false;
        }
        if shared.failure().is_some() {
            break 'apply;
        }
        // With it, the records behind it that are durable too, as one batch.
        let synced = lock(&shared.progress).synced_lsn;
        let mut batch = vec![item];
        while batch.len() < DIRECT_QUEUE {
            match items.try_recv() {
                Ok(next) if next.lsn <= synced => batch.push(next),
                Ok(next) => {
                    carried = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        if let Err((lsn, error)) = apply_batch(&shared.backing, direct.as_mut(), &batch) {
            shared.fail(format!("apply LSN {lsn} to the backing store: {error}"));
            break 'apply;
        }
        {
            let mut index = lock(&shared.index);
            for item in &batch {
                index.remove_applied(item.extent, item.lsn);
            }
        }
        let last_lsn = batch.last().map_or(0, |item| item.lsn);
        {
            let mut progress = lock(&shared.progress);
            progress.pending_bytes -= batch.iter().map(|item| item.cost).sum::<u64>();
            progress.applied_lsn = last_lsn;
            if progress.writer_waiting {
                shared.progress_changed.notify_all();
            }
        }
        applied_since_checkpoint = true;
        let journal_filling = batch.iter().any(|item| item.lsn % FILL_CHECK_RECORDS == 0) && {
            let usage = shared.retention.journal().usage();
            usage.used_bytes > usage.capacity_bytes / 2
        };
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL || journal_filling || shared.retention.journal().is_full() {
            request_checkpoint();
            applied_since_checkpoint = false;
            last_checkpoint = Instant::now();
        }
    }
    drop(checkpoint_wanted);
    let _ = checkpointer.join();
    checkpoint(&shared);
}

/// Writes a batch of durable records into the backing store in LSN order: aligned writes
/// queued for the direct writer and submitted together, anything else (after what is queued)
/// through the page cache. Returns the failing record's LSN (for a failed submission, the last
/// queued one) with the error.
fn apply_batch(backing: &Store, mut direct: Option<&mut DirectWriter>, batch: &[ApplyItem]) -> Result<(), (u64, std::io::Error)> {
    let mut last_queued = 0;
    for item in batch {
        let payload: &[u8] = item.data.as_deref().map_or(&[], |d| d.as_slice());
        if item.kind == RecordKind::Marker {
            continue;
        }
        if let Some(direct) = direct.as_deref_mut() {
            let direct_write = item.kind == RecordKind::Write && payload.len() as u64 == item.extent.length && DirectWriter::fits(item.extent);
            if direct_write && direct.queue(item.extent, payload) {
                last_queued = item.lsn;
                continue;
            }
            // Refused (the queue is full, or the write overlaps a queued one) or not for the
            // direct writer: what is queued lands first. An empty queue takes any write that
            // fits; were it to refuse, the write goes through the page cache below.
            direct.flush(backing).map_err(|error| (last_queued, error))?;
            if direct_write && direct.queue(item.extent, payload) {
                last_queued = item.lsn;
                continue;
            }
        }
        backing.apply(item.kind, item.extent, &[payload]).map_err(|error| (item.lsn, error))?;
    }
    match direct {
        Some(direct) => direct.flush(backing).map_err(|error| (last_queued, error)),
        None => Ok(()),
    }
}

/// Makes the backing store durable through the applied LSN, records it, trims the journal.
fn checkpoint(shared: &Shared) {
    if shared.failure().is_some() {
        return;
    }
    let applied = lock(&shared.progress).applied_lsn;
    // With nothing applied since the last checkpoint (a full journal looked at again while a
    // mirror's hold keeps it full) there is nothing to sync or save; the trim floor may have
    // moved all the same.
    if lock(&shared.state).applied_lsn != applied {
        if let Err(error) = shared.backing.sync_data() {
            return shared.fail(format!("sync backing store: {error}"));
        }
        let mut state = lock(&shared.state);
        state.applied_lsn = applied;
        if let Err(error) = state.save(&shared.dir) {
            return shared.fail(format!("checkpoint: {error}"));
        }
    }
    if let Err(error) = shared.retention.checkpointed(applied) {
        tracing::warn!(error = %error, "journal trim failed; will retry at the next checkpoint");
    }
}
