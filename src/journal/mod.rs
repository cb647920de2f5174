//! The journal: an append-only, CRC-checked sequence of records in preallocated segment files.
//!
//! One [`JournalWriter`] appends (group commit: many records per write, `writer.rs` and
//! `uring.rs`); any number of [`JournalReader`]s iterate from a retained LSN (`reader.rs`);
//! [`Retention`] decides how far the journal may be trimmed and recycles whole segments once
//! no one needs their records (`retention.rs`). The segment table (`table.rs`) is what the
//! [`Journal`] handle shares between them; `preparer.rs` keeps a spare segment ready.
//! Opening a journal runs recovery (`recovery.rs`). Format: `format.rs` and
//! `docs/journal-format.md`. A journal kept on another filesystem (a symlink to it, and an
//! owner file there) is checked by `placement.rs` before it is opened.

pub mod format;
mod ledger;
pub mod placement;
mod preparer;
pub mod range;
mod reader;
mod recent;
mod recovery;
mod retention;
mod table;
mod uring;
mod writer;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use format::segment_file_name;
pub use format::{RecordHeader, RecordKind, BLOCK_SIZE, FLAG_FUA, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
pub use ledger::Backlog;
use ledger::Ledger;
pub use reader::JournalReader;
pub use recent::Following;
pub use recovery::{RecoveryMode, RecoveryReport};
pub use retention::{Hold, HoldSpec, HoldState, OnFull, Retention, BRANCH_HOLD};
use table::{initialise_segment_file, SegmentTable};
pub use writer::{AppendError, JournalWriter, PayloadPart};

use crate::fsutil;

/// Records start at 8-byte aligned positions (cheaper scanning for records past a damaged one).
pub const RECORD_ALIGN: u64 = 8;
/// Bytes one group commit may write at most.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// The smallest segment a journal may use.
pub const MIN_SEGMENT_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("journal corrupt: {0}")]
    Corrupt(String),
    #[error("invalid journal settings: {0}")]
    Invalid(String),
    #[error("record of {size} bytes does not fit a journal segment of {segment_size} bytes")]
    RecordTooLarge { size: u64, segment_size: u64 },
    #[error("LSN {lsn} is not retained in the journal (retained: {first}..={last})")]
    NotRetained { lsn: u64, first: u64, last: u64 },
    /// A journal placed on another filesystem that is missing, unwritable or not its own.
    #[error(transparent)]
    Placement(#[from] placement::PlacementError),
}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> JournalError {
    let context = context.into();
    move |source| JournalError::Io { context, source }
}

/// Settings fixed when a journal is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    pub segment_size: u64,
    /// Upper bound on segment files (retained + spare): `capacity / segment_size`.
    pub capacity: u64,
    /// Every segment carries this id (the volume's UUID) so foreign files are refused.
    pub journal_id: [u8; 16],
}

impl JournalOptions {
    pub fn validate(&self) -> Result<(), JournalError> {
        if self.segment_size < MIN_SEGMENT_SIZE || !self.segment_size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(JournalError::Invalid(format!(
                "segment size {} must be a multiple of {BLOCK_SIZE} and at least {MIN_SEGMENT_SIZE}",
                self.segment_size
            )));
        }
        if self.max_segments() < 2 {
            return Err(JournalError::Invalid(format!("journal capacity {} must hold at least two segments of {} bytes", self.capacity, self.segment_size)));
        }
        Ok(())
    }

    pub fn max_segments(&self) -> usize {
        (self.capacity / self.segment_size) as usize
    }

    /// The largest payload one record may carry in these segments.
    pub fn max_payload(&self) -> u64 {
        self.segment_size - SEGMENT_HEADER_SIZE - RECORD_HEADER_SIZE as u64 - RECORD_ALIGN
    }
}

/// One record read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    /// A slice of the reader's buffer: cheap to clone and to hand to the network.
    pub payload: Bytes,
}
/// What the journal currently holds (for status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct JournalUsage {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub segments: usize,
}

/// Shared handle to an open journal: the table of segments and the published LSNs.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    table: Mutex<SegmentTable>,
    space_freed: Condvar,
    /// Wakes the segment preparer when the writer needs a spare.
    spare_wanted: Condvar,
    /// Highest LSN whose bytes are in the segment files (readers may read up to it).
    written_lsn: AtomicU64,
    /// Highest LSN known durable (fdatasync'd).
    synced_lsn: AtomicU64,
    /// True while the writer waits for a trim to free a segment.
    full: AtomicBool,
    /// The active segment, for [`Journal::sync`] from other threads.
    active_file: Mutex<Option<Arc<File>>>,
    /// Payload bytes and append times of the retained records, for lag.
    ledger: Mutex<Ledger>,
    /// Records just written, for readers that follow the writer (`recent.rs`).
    recent: Mutex<recent::RecentRecords>,
    /// Whether any reader follows (`recent` is not even locked otherwise).
    keeping_recent: AtomicBool,
}

impl Journal {
    /// Creates an empty journal in `dir` (which must not hold one) with its first segment.
    pub fn create(dir: &Path, options: JournalOptions) -> Result<(), JournalError> {
        Self::create_at(dir, options, 1)
    }

    /// Creates an empty journal whose first record will have LSN `first_lsn` (a replica's
    /// journal continues the source's numbering).
    pub fn create_at(dir: &Path, options: JournalOptions, first_lsn: u64) -> Result<(), JournalError> {
        options.validate()?;
        if first_lsn == 0 {
            return Err(JournalError::Invalid("LSNs start at 1".into()));
        }
        crate::permissions::create_dir_all(dir).map_err(io_error(format!("create journal directory {}", dir.display())))?;
        let first = dir.join(segment_file_name(first_lsn));
        initialise_segment_file(&first, None, first_lsn, &options)?;
        fsutil::sync_dir(dir).map_err(io_error(format!("sync {}", dir.display())))?;
        Ok(())
    }

    /// Opens the journal in `dir`, running recovery, and returns the handle and its only writer.
    pub fn open(dir: &Path, options: JournalOptions) -> Result<(Arc<Journal>, JournalWriter, RecoveryReport), JournalError> {
        options.validate()?;
        let recovered = recovery::recover(dir, Some(&options), RecoveryMode::Repair)?;
        let report = recovered.report.clone();
        let last = recovered.retained.last().expect("recovery returns at least one segment").clone();
        let active_header = recovered.active_header;
        let journal = Journal::from_recovered(dir, options, recovered);
        let writer = JournalWriter::new(journal.clone(), &last.path, active_header, last.end, report.last_lsn + 1)?;
        Ok((journal, writer, report))
    }

    /// Opens the journal in `dir` for reading only: no repair, no writer (for dump tools).
    pub fn open_read_only(dir: &Path) -> Result<(Arc<Journal>, RecoveryReport), JournalError> {
        let recovered = recovery::recover(dir, None, RecoveryMode::Inspect)?;
        let report = recovered.report.clone();
        let files = (report.segments + report.spare_segments).max(2) as u64;
        let options =
            JournalOptions { segment_size: report.segment_size, capacity: files * report.segment_size, journal_id: recovered.active_header.journal_id };
        Ok((Journal::from_recovered(dir, options, recovered), report))
    }

    fn from_recovered(dir: &Path, options: JournalOptions, recovered: recovery::Recovered) -> Arc<Journal> {
        let last_lsn = recovered.report.last_lsn;
        let mut ledger = Ledger::new(recovered.report.first_lsn);
        for (index, entry) in recovered.records.iter().enumerate() {
            ledger.push(recovered.report.first_lsn + index as u64, *entry);
        }
        Arc::new(Journal {
            dir: dir.to_path_buf(),
            options,
            table: Mutex::new(SegmentTable { retained: recovered.retained, spare: recovered.spare, preparing: false, rolling: false, prepare_failure: None }),
            space_freed: Condvar::new(),
            spare_wanted: Condvar::new(),
            written_lsn: AtomicU64::new(last_lsn),
            synced_lsn: AtomicU64::new(last_lsn),
            full: AtomicBool::new(false),
            active_file: Mutex::new(None),
            ledger: Mutex::new(ledger),
            recent: Mutex::default(),
            keeping_recent: AtomicBool::new(false),
        })
    }

    /// Scans the journal in `dir` without changing anything (for status and dump).
    pub fn inspect(dir: &Path) -> Result<RecoveryReport, JournalError> {
        Ok(recovery::recover(dir, None, RecoveryMode::Inspect)?.report)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn options(&self) -> &JournalOptions {
        &self.options
    }

    pub fn written_lsn(&self) -> u64 {
        self.written_lsn.load(Ordering::Acquire)
    }

    pub fn synced_lsn(&self) -> u64 {
        self.synced_lsn.load(Ordering::Acquire)
    }

    /// Makes every record written so far durable (fdatasync of the active segment; sealed
    /// segments were synced when they were sealed). Safe to call from any thread while the
    /// writer appends. Returns the LSN now known durable.
    pub fn sync(&self) -> Result<u64, JournalError> {
        // Read the target before taking the file: a record in a newer segment than the file we
        // get was written after the writer switched files, so after this snapshot.
        let target = self.written_lsn();
        if target <= self.synced_lsn() {
            return Ok(self.synced_lsn());
        }
        let file = self.active_file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(file) = file {
            let synced = match crate::failpoint::disk_error("journal-sync") {
                Some(injected) => Err(injected),
                None => file.sync_data(),
            };
            if let Err(error) = synced {
                // As after a failed commit (writer.rs): never trust cached pages a failed
                // fdatasync may have marked clean without writing, nor records kept in memory.
                fsutil::drop_from_cache(&file, 0, 0);
                self.lock_recent().clear();
                return Err(io_error("sync journal segment")(error));
            }
        }
        // Published under the table lock: the power-cut failpoint holds it while it decides
        // what was durable, so no sync can complete (and acknowledge a FLUSH) meanwhile.
        let _table = self.lock_table();
        self.synced_lsn.fetch_max(target, Ordering::AcqRel);
        Ok(self.synced_lsn())
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// LSN of the oldest retained record (the first segment's first LSN).
    pub fn first_lsn(&self) -> u64 {
        self.lock_table().retained[0].first_lsn
    }

    pub fn usage(&self) -> JournalUsage {
        let table = self.lock_table();
        let used_bytes = table.retained.iter().map(|s| s.end.saturating_sub(SEGMENT_HEADER_SIZE)).sum();
        JournalUsage {
            first_lsn: table.retained[0].first_lsn,
            last_lsn: self.written_lsn(),
            used_bytes,
            capacity_bytes: self.options.max_segments() as u64 * (self.options.segment_size - SEGMENT_HEADER_SIZE),
            segments: table.retained.len(),
        }
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, SegmentTable> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Recycles every segment whose records all have LSN <= `lsn`. The active segment is
    /// never trimmed. Returns how many segments were freed.
    pub fn trim_through(&self, lsn: u64) -> Result<usize, JournalError> {
        let mut table = self.lock_table();
        let mut freed = 0;
        while table.retained.len() > 1 && table.retained[1].first_lsn <= lsn.saturating_add(1) {
            let entry = table.retained.remove(0);
            let spare = self.dir.join(format!("free-{}", segment_file_name(entry.first_lsn)));
            if let Err(error) = std::fs::rename(&entry.path, &spare) {
                table.retained.insert(0, entry.clone());
                return Err(io_error(format!("recycle {}", entry.path.display()))(error));
            }
            crate::failpoint::hit("journal-trim-after-rename");
            table.spare.push(spare);
            freed += 1;
        }
        let first_lsn = table.retained[0].first_lsn;
        drop(table);
        crate::lock(&self.ledger).trim_before(first_lsn);
        if freed > 0 {
            fsutil::sync_dir(&self.dir).map_err(io_error(format!("sync {}", self.dir.display())))?;
            self.space_freed.notify_all();
        }
        Ok(freed)
    }

    /// The LSN through which the journal would have to be trimmed so that at most
    /// `keep_bytes` of records stay (whole segments; the active one always stays).
    pub fn trim_point_keeping(&self, keep_bytes: u64) -> u64 {
        let table = self.lock_table();
        let mut kept = 0u64;
        for (index, segment) in table.retained.iter().enumerate().rev() {
            kept += segment.end.saturating_sub(SEGMENT_HEADER_SIZE);
            if kept > keep_bytes && index + 1 < table.retained.len() {
                return table.retained[index + 1].first_lsn - 1;
            }
        }
        table.retained[0].first_lsn.saturating_sub(1)
    }

    /// Marks in `map` the extents of the records after its covered LSN through `through`,
    /// and moves its covered LSN there. False (nothing changed) if the journal no longer
    /// holds every one of those records.
    pub fn fold_into(&self, map: &mut crate::dirty_map::DirtyMap, through: u64) -> bool {
        if through <= map.covered_lsn() {
            return true;
        }
        if map.is_full() {
            map.set_covered_lsn(through);
            return true;
        }
        let ledger = crate::lock(&self.ledger);
        if ledger.first_lsn() > map.covered_lsn() + 1 {
            return false;
        }
        for extent in ledger.extents(map.covered_lsn() + 1, through) {
            map.mark(extent);
        }
        map.set_covered_lsn(through);
        true
    }

    /// Of the retained records in `from..=through`: how many, the device bytes they cover, and
    /// how many were appended at or after `since_us` (from the ledger: nothing is read).
    pub fn written(&self, from: u64, through: u64, since_us: u64) -> (u64, u64, u64) {
        crate::lock(&self.ledger).written(from, through, since_us)
    }

    /// The retained records after `lsn`: how far a reader at `lsn` is behind.
    pub fn backlog_after(&self, lsn: u64) -> Backlog {
        crate::lock(&self.ledger).after(lsn)
    }

    /// Where record `lsn` lives: the path of its segment and that segment's first LSN.
    fn locate(&self, lsn: u64) -> Result<(PathBuf, u64), JournalError> {
        let table = self.lock_table();
        let first = table.retained[0].first_lsn;
        let last = self.written_lsn();
        if lsn < first || lsn > last + 1 {
            return Err(JournalError::NotRetained { lsn, first, last });
        }
        let index = table.retained.partition_point(|s| s.first_lsn <= lsn).saturating_sub(1);
        let entry = &table.retained[index];
        Ok((entry.path.clone(), entry.first_lsn))
    }

    /// Where the written records of the segment starting at `first_lsn` end (the segment's
    /// size if the table no longer holds it: readers then rely on the CRC alone).
    fn segment_end(&self, first_lsn: u64) -> u64 {
        let table = self.lock_table();
        match table.retained.iter().find(|s| s.first_lsn == first_lsn) {
            Some(segment) => segment.end,
            None => self.options.segment_size,
        }
    }

    /// The segment that follows the one starting at `first_lsn`, if it exists yet.
    fn next_segment(&self, first_lsn: u64) -> Option<(PathBuf, u64)> {
        let table = self.lock_table();
        table.retained.iter().find(|s| s.first_lsn > first_lsn).map(|s| (s.path.clone(), s.first_lsn))
    }
}

pub(crate) fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}
