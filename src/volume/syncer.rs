//! The syncer thread: fdatasync of the journal for FLUSH/FUA waiters, and in the background
//! so writeback (which applies only durable records) never waits long.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use super::shared::Shared;
use super::{Completion, VolumeError};

/// The journal is made durable at least this often while unsynced records exist, so
/// writeback (which applies only durable records) keeps moving without any FLUSH.
const BACKGROUND_SYNC_INTERVAL: Duration = Duration::from_millis(10);

/// A request that completes only once the journal is durable through `lsn`.
pub(super) struct DurabilityWaiter {
    pub lsn: u64,
    pub completion: Completion,
}

pub(super) fn run(shared: Arc<Shared>, waiters: Receiver<DurabilityWaiter>) {
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
        if waiting.is_empty() && shared.retention.journal().written_lsn() <= shared.retention.journal().synced_lsn() {
            continue;
        }
        match shared.retention.journal().sync() {
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
                // The FLUSH/FUA requests that waited for this sync get the disk's errno.
                for waiter in waiting.drain(..) {
                    (waiter.completion)(Err(VolumeError::disk(message.clone(), &error)));
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
