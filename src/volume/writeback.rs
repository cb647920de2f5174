//! The writeback thread: durable journal records to the backing store, in LSN order, and
//! the checkpoints that make the backing store durable and let the journal be trimmed.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::Shared;
use crate::extent::Extent;
use crate::journal::RecordKind;
use crate::lock;

/// Checkpoint (fdatasync backing, save state, trim) at least this often when records were
/// applied, and sooner once the journal is half full. Rarer checkpoints mean fewer forced
/// writebacks of the backing store; the journal bounds how much a restart must redo.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
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

pub(super) fn run(shared: Arc<Shared>, items: Receiver<ApplyItem>) {
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
    // Left on a failure too (`break 'apply`), so the checkpoint thread is always joined.
    'apply: loop {
        let item = match items.recv_timeout(CHECKPOINT_INTERVAL) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                // Also when the journal is full: the trim floor may have moved since.
                if applied_since_checkpoint || shared.retention.journal().is_full() {
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
        let payload: &[u8] = item.data.as_deref().map_or(&[], |d| d.as_slice());
        if let Err(error) = shared.backing.apply(item.kind, item.extent, &[payload]) {
            shared.fail(format!("apply LSN {} to the backing store: {error}", item.lsn));
            break 'apply;
        }
        lock(&shared.index).remove_applied(item.extent, item.lsn);
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
    if shared.failure().is_none() {
        checkpoint(&shared);
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
    if let Err(error) = shared.retention.checkpointed(applied) {
        tracing::warn!(error = %error, "journal trim failed; will retry at the next checkpoint");
    }
}
