//! Keeps a zero-filled spare segment ready so a growing journal never waits for a file to be
//! created.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::format::{is_spare_file_name, parse_segment_file_name};
use super::{io_error, Journal, JournalError, JournalOptions};
use crate::fsutil;

/// How long the preparer waits before it tries again after creating a spare failed.
const PREPARE_RETRY: Duration = Duration::from_millis(500);

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
                            Some(spare_path(&journal.dir))
                        } else {
                            // Idle until the writer takes the spare or asks us to stop.
                            let _ = journal.spare_wanted.wait_timeout(table, Duration::from_secs(1));
                            None
                        }
                    };
                    if let Some(path) = path {
                        if !journal.prepare_spare(path) {
                            // A full or failing disk: retry, but not in a tight loop.
                            let table = journal.lock_table();
                            if !stopping.load(Ordering::Acquire) {
                                let _ = journal.spare_wanted.wait_timeout(table, PREPARE_RETRY);
                            }
                        }
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

/// A new name for a spare segment file in `dir` (recovery takes every `free-*.seg` as spare).
fn spare_path(dir: &Path) -> PathBuf {
    dir.join(format!("free-prepared-{:016x}.seg", rand::random::<u64>()))
}

impl Journal {
    /// Writes every segment file a journal in `dir` may have (`capacity / segment_size`,
    /// those it has included) as zero-filled spares, now rather than as the journal first
    /// grows: a volume in service made its segments long ago (trims recycle them, nothing
    /// shrinks the journal), while a new one zero-fills each segment on the preparer thread
    /// during its first writes, which competes with them for the CPU and the disk. It also
    /// reserves the space, so a file system that fills up later cannot stall the journal.
    /// Returns how many files were made. On an error the files made here are removed.
    pub fn preallocate(dir: &Path, options: &JournalOptions) -> Result<usize, JournalError> {
        let listing = std::fs::read_dir(dir).map_err(io_error(format!("list journal directory {}", dir.display())))?;
        let mut existing = 0;
        for entry in listing {
            let name = entry.map_err(io_error(format!("list journal directory {}", dir.display())))?.file_name();
            let name = name.to_string_lossy();
            existing += usize::from(parse_segment_file_name(&name).is_some() || is_spare_file_name(&name));
        }
        let mut made = Vec::new();
        for _ in existing..options.max_segments() {
            let path = spare_path(dir);
            if let Err(error) = fsutil::create_zero_filled(&path, options.segment_size) {
                for path in made.iter().chain([&path]) {
                    let _ = std::fs::remove_file(path);
                }
                return Err(io_error(format!("preallocate journal segment {}", path.display()))(error));
            }
            made.push(path);
        }
        fsutil::sync_dir(dir).map_err(io_error(format!("sync {}", dir.display())))?;
        Ok(made.len())
    }

    /// Creates one zero-filled spare file and adds it to the pool (the caller set `preparing`);
    /// false if that failed (the failure is kept for the writer, see `prepare_failure`).
    fn prepare_spare(&self, path: PathBuf) -> bool {
        let created = match crate::failpoint::disk_error("journal-segment") {
            Some(injected) => Err(injected),
            None => fsutil::create_zero_filled(&path, self.options.segment_size),
        };
        let created = created.and_then(|()| fsutil::sync_dir(&self.dir));
        let mut table = self.lock_table();
        table.preparing = false;
        let ok = match created {
            Ok(()) => {
                table.spare.push(path);
                table.prepare_failure = None;
                true
            }
            Err(error) => {
                tracing::warn!(%error, "preparing a spare journal segment failed; will retry");
                let _ = std::fs::remove_file(&path);
                let errno = error.raw_os_error().unwrap_or(libc::EIO);
                table.prepare_failure = Some((format!("create a journal segment in {}: {error}", self.dir.display()), errno));
                false
            }
        };
        drop(table);
        self.space_freed.notify_all();
        ok
    }
}
