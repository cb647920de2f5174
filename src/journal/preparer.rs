//! Keeps a zero-filled spare segment ready so a growing journal never waits for a file to be
//! created.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Journal;
use crate::fsutil;

/// Keeps one zero-filled spare segment ready in the background while the cap allows, so a
/// growing journal never stalls writes on creating a segment. Owned by the writer, which stops
/// and joins it when dropped.
pub(super) struct SegmentPreparer {
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SegmentPreparer {
    pub(super) fn start(journal: &Arc<Journal>) -> SegmentPreparer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let owner = journal.clone();
        let journal = journal.clone();
        let thread = std::thread::Builder::new()
            .name("journal-prepare".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    let path = {
                        let mut table = journal.lock_table();
                        if table.spare.is_empty() && table.files() < journal.options.max_segments() {
                            table.preparing = true;
                            Some(journal.dir.join(format!("free-prepared-{:016x}.seg", rand::random::<u64>())))
                        } else {
                            // Idle until the writer takes the spare or asks us to stop.
                            let _ = journal.spare_wanted.wait_timeout(table, Duration::from_secs(1));
                            None
                        }
                    };
                    if let Some(path) = path {
                        journal.prepare_spare(path);
                    }
                }
            })
            .map_err(|error| tracing::warn!(%error, "could not start the segment preparer; the writer will wait for trims"))
            .ok();
        SegmentPreparer { journal: owner, stop, thread }
    }
}

impl Drop for SegmentPreparer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        {
            // Notify under the lock: the thread either sees `stop` or is already waiting.
            let _table = self.journal.lock_table();
            self.journal.spare_wanted.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

impl Journal {
    /// Creates one zero-filled spare file and adds it to the pool (the caller set `preparing`).
    fn prepare_spare(&self, path: PathBuf) {
        let created = fsutil::create_zero_filled(&path, self.options.segment_size);
        if created.is_ok() {
            let _ = fsutil::sync_dir(&self.dir);
        }
        let mut table = self.lock_table();
        table.preparing = false;
        match created {
            Ok(()) => table.spare.push(path),
            Err(error) => {
                tracing::warn!(%error, "preparing a spare journal segment failed; will retry");
                let _ = std::fs::remove_file(&path);
            }
        }
        drop(table);
        self.space_freed.notify_all();
    }
}
