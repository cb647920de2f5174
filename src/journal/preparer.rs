//! Spare segment files: one kept zero-filled and ready so a growing journal never waits for a
//! file to be created, all of them made at once (`preallocate`), or taken over from a journal
//! being replaced (`adopt_segments`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::format::{is_spare_file_name, parse_segment_file_name, CREATING_SUFFIX, SEGMENT_HEADER_SIZE};
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
    spare_named(dir, "prepared")
}

fn spare_named(dir: &Path, how: &str) -> PathBuf {
    dir.join(format!("free-{how}-{:016x}.seg", rand::random::<u64>()))
}

/// Makes the spare `path`: zero-filled under a temporary name (which recovery removes) and
/// renamed once whole, so a crash never leaves a short file that looks like a spare. The
/// caller syncs the directory.
fn make_spare(path: &Path, size: u64) -> std::io::Result<()> {
    let mut creating = path.as_os_str().to_owned();
    creating.push(CREATING_SUFFIX);
    let creating = PathBuf::from(creating);
    let made = fsutil::create_zero_filled(&creating, size).and_then(|()| std::fs::rename(&creating, path));
    if made.is_err() {
        let _ = std::fs::remove_file(&creating);
    }
    made
}

/// The segment files (segments and spares) in the journal directory `dir`.
fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, JournalError> {
    let context = || format!("list journal directory {}", dir.display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(context()))? {
        let entry = entry.map_err(io_error(context()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if parse_segment_file_name(&name).is_some() || is_spare_file_name(&name) {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Zeroes the header of the segment file `path` (durably) and moves it into `dir` as a spare.
fn adopt_as_spare(dir: &Path, path: &Path) -> Result<(), JournalError> {
    let erase = || -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all_at(&[0u8; SEGMENT_HEADER_SIZE as usize], 0)?;
        file.sync_data()
    };
    erase().map_err(io_error(format!("erase the header of {}", path.display())))?;
    let spare = spare_named(dir, "adopted");
    std::fs::rename(path, &spare).map_err(io_error(format!("move {} to {}", path.display(), spare.display())))
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
        let existing = segment_files(dir)?.len();
        let mut made = Vec::new();
        for _ in existing..options.max_segments() {
            let path = spare_path(dir);
            if let Err(error) = make_spare(&path, options.segment_size) {
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

    /// Moves the segment files (segments and spares) of the journal in `old`, which is being
    /// discarded and not open for writing, into the journal directory `dir` as spares, while
    /// `dir` holds fewer files than `options` allow: the files a journal replacement leaves
    /// behind, reused rather than freed and zero-filled again (on a file system that must find
    /// the blocks, or a VM whose host took the pages back). Files of another length (a spare
    /// still being made) stay. Returns how many moved.
    ///
    /// Each file's header is zeroed and synced before it moves, so until a writer gives it a
    /// header of its own it can never pass for a segment, whatever name it gets. Its records
    /// stay: the caller adopts only files whose every record has a lower LSN than any the
    /// journal in `dir` will hold (recovery rejects those, as in recycled segments).
    pub fn adopt_segments(dir: &Path, old: &Path, options: &JournalOptions) -> Result<usize, JournalError> {
        let room = options.max_segments().saturating_sub(segment_files(dir)?.len());
        let whole = |path: &PathBuf| std::fs::metadata(path).is_ok_and(|meta| meta.len() == options.segment_size);
        let mut moved = 0;
        let mut outcome = Ok(());
        for path in segment_files(old)?.into_iter().filter(whole).take(room) {
            if let Err(error) = adopt_as_spare(dir, &path) {
                outcome = Err(error);
                break;
            }
            moved += 1;
            // A crash part way through: files moved, the rest still in the old journal.
            if crate::failpoint::hit("journal-adopt-crash") {
                std::process::abort();
            }
        }
        // What moved before an error stays moved.
        if moved > 0 {
            fsutil::sync_dir(dir).map_err(io_error(format!("sync {}", dir.display())))?;
            fsutil::sync_dir(old).map_err(io_error(format!("sync {}", old.display())))?;
        }
        outcome.map(|()| moved)
    }

    /// Creates one zero-filled spare file and adds it to the pool (the caller set `preparing`);
    /// false if that failed (the failure is kept for the writer, see `prepare_failure`).
    fn prepare_spare(&self, path: PathBuf) -> bool {
        let created = match crate::failpoint::disk_error("journal-segment") {
            Some(injected) => Err(injected),
            None => make_spare(&path, self.options.segment_size),
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
