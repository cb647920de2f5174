//! The segment table: which segment files hold the retained records (in LSN order, the last
//! one active), which are spare, and how a segment file gets its header.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{self, SegmentHeader};
use super::{io_error, JournalError, JournalOptions};
use crate::fsutil;

/// A retained segment as the journal's table knows it.
#[derive(Debug, Clone)]
pub(super) struct SegmentEntry {
    pub(super) first_lsn: u64,
    pub(super) path: PathBuf,
    /// Position after the last record written (the active segment's moves with each commit).
    pub(super) end: u64,
}

#[derive(Debug)]
pub(super) struct SegmentTable {
    /// Retained segments in LSN order; the last one is active.
    pub(super) retained: Vec<SegmentEntry>,
    /// Trimmed or prepared files waiting to be used (named `free-*.seg`).
    pub(super) spare: Vec<PathBuf>,
    /// A spare file is being created in the background (it counts toward the cap).
    pub(super) preparing: bool,
    /// The writer took a spare and is turning it into the next segment (counts toward the cap).
    pub(super) rolling: bool,
    /// Why the last attempt to create a spare failed (a full or failing disk) and its errno;
    /// cleared when one is created. A writer that needs a new segment fails with it rather
    /// than waiting for a disk that may never have room.
    pub(super) prepare_failure: Option<(String, i32)>,
}

impl SegmentTable {
    pub(super) fn files(&self) -> usize {
        self.retained.len() + self.spare.len() + usize::from(self.preparing) + usize::from(self.rolling)
    }
}

/// Writes a fresh header into a segment file (creating the file zero-filled if `existing` is
/// None) and makes it durable. Records of an earlier incarnation stay behind but cannot verify
/// against the new random salt.
pub(super) fn initialise_segment_file(path: &Path, existing: Option<&Path>, first_lsn: u64, options: &JournalOptions) -> Result<SegmentHeader, JournalError> {
    let header = SegmentHeader { first_lsn, salt: rand::random(), segment_size: options.segment_size, journal_id: options.journal_id };
    let write_header = |target: &Path| -> Result<(), JournalError> {
        let file = std::fs::OpenOptions::new().write(true).open(target).map_err(io_error(format!("open {}", target.display())))?;
        file.write_all_at(&header.encode(), 0).map_err(io_error(format!("write header of {}", target.display())))?;
        file.sync_data().map_err(io_error(format!("sync {}", target.display())))
    };
    match existing {
        Some(spare) => {
            std::fs::rename(spare, path).map_err(io_error(format!("reuse {}", spare.display())))?;
            write_header(path)?;
        }
        None => {
            // Built under a temporary name and renamed once its header is durable: a crash
            // while zero-filling must not leave a segment file without a header.
            let creating = path.with_extension(format!("seg{}", format::CREATING_SUFFIX));
            fsutil::create_zero_filled(&creating, options.segment_size).map_err(io_error(format!("create segment {}", creating.display())))?;
            write_header(&creating)?;
            std::fs::rename(&creating, path).map_err(io_error(format!("rename {}", creating.display())))?;
        }
    }
    Ok(header)
}

/// Segments are written through the page cache: a write is acknowledged at memory speed and
/// made durable by fdatasync (FLUSH, FUA, background sync), like a disk's volatile cache.
pub(super) fn open_segment_for_writing(path: &Path) -> Result<Arc<File>, JournalError> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io_error(format!("open {}", path.display())))?;
    Ok(Arc::new(file))
}
