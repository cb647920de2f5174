//! The journal: an append-only, CRC-checked sequence of records in preallocated segment files.
//!
//! One [`JournalWriter`] appends (group commit: many records per write, see `uring.rs`);
//! any number of [`JournalReader`]s iterate from a retained LSN; [`Journal::trim_through`]
//! recycles whole segments once their records are no longer needed. Opening a journal runs
//! recovery (`recovery.rs`). Format: `format.rs` and `docs/journal-format.md`.

pub mod format;
mod ledger;
mod recovery;
mod uring;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

pub use format::{RecordHeader, RecordKind, BLOCK_SIZE, FLAG_FUA, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
use format::{segment_file_name, SegmentHeader};
pub use ledger::Backlog;
use ledger::Ledger;
pub use recovery::{RecoveryMode, RecoveryReport};

use crate::fsutil::{self, AlignedBuffer};

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
            return Err(JournalError::Invalid(format!(
                "journal capacity {} must hold at least two segments of {} bytes",
                self.capacity, self.segment_size
            )));
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

/// A retained segment as the journal's table knows it.
#[derive(Debug, Clone)]
struct SegmentEntry {
    first_lsn: u64,
    path: PathBuf,
    /// Position after the last record written (the active segment's moves with each commit).
    end: u64,
}

#[derive(Debug)]
struct SegmentTable {
    /// Retained segments in LSN order; the last one is active.
    retained: Vec<SegmentEntry>,
    /// Trimmed or prepared files waiting to be used (named `free-*.seg`).
    spare: Vec<PathBuf>,
    /// A spare file is being created in the background (it counts toward the cap).
    preparing: bool,
    /// The writer took a spare and is turning it into the next segment (counts toward the cap).
    rolling: bool,
}

impl SegmentTable {
    fn files(&self) -> usize {
        self.retained.len() + self.spare.len() + usize::from(self.preparing) + usize::from(self.rolling)
    }
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
        std::fs::create_dir_all(dir).map_err(io_error(format!("create journal directory {}", dir.display())))?;
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
        let options = JournalOptions { segment_size: report.segment_size, capacity: files * report.segment_size, journal_id: recovered.active_header.journal_id };
        Ok((Journal::from_recovered(dir, options, recovered), report))
    }

    fn from_recovered(dir: &Path, options: JournalOptions, recovered: recovery::Recovered) -> Arc<Journal> {
        let last_lsn = recovered.report.last_lsn;
        let mut ledger = Ledger::new(recovered.report.first_lsn);
        for (index, (payload_bytes, timestamp_us)) in recovered.records.iter().enumerate() {
            ledger.push(recovered.report.first_lsn + index as u64, *payload_bytes, *timestamp_us);
        }
        Arc::new(Journal {
            dir: dir.to_path_buf(),
            options,
            table: Mutex::new(SegmentTable { retained: recovered.retained, spare: recovered.spare, preparing: false, rolling: false }),
            space_freed: Condvar::new(),
            spare_wanted: Condvar::new(),
            written_lsn: AtomicU64::new(last_lsn),
            synced_lsn: AtomicU64::new(last_lsn),
            full: AtomicBool::new(false),
            active_file: Mutex::new(None),
            ledger: Mutex::new(ledger),
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
            file.sync_data().map_err(io_error("sync journal segment"))?;
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

/// Writes a fresh header into a segment file (creating the file zero-filled if `existing` is
/// None) and makes it durable. Records of an earlier incarnation stay behind but cannot verify
/// against the new random salt.
fn initialise_segment_file(path: &Path, existing: Option<&Path>, first_lsn: u64, options: &JournalOptions) -> Result<SegmentHeader, JournalError> {
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
            let creating = path.with_extension(format!("seg{}", recovery::CREATING_SUFFIX));
            fsutil::create_zero_filled(&creating, options.segment_size).map_err(io_error(format!("create segment {}", creating.display())))?;
            write_header(&creating)?;
            std::fs::rename(&creating, path).map_err(io_error(format!("rename {}", creating.display())))?;
        }
    }
    Ok(header)
}

/// Why an append did not take place.
#[derive(Debug)]
pub enum AppendError {
    /// Every segment is in use: commit what is batched, wait for a trim, then retry.
    JournalFull,
    Failed(JournalError),
}

impl From<JournalError> for AppendError {
    fn from(error: JournalError) -> Self {
        AppendError::Failed(error)
    }
}

/// The single writer of a journal. Records are staged in an aligned batch buffer and written
/// by [`JournalWriter::commit`]; the block holding the end of the previous commit is written
/// again with the new records after it (its earlier bytes are identical, so a torn rewrite
/// cannot damage records that were already durable).
pub struct JournalWriter {
    journal: Arc<Journal>,
    ring: uring::CommitRing,
    file: Arc<File>,
    header: SegmentHeader,
    segment_path: PathBuf,
    /// Block-aligned file offset that `buffer[0]` will be written to.
    buffer_file_offset: u64,
    /// Valid bytes in `buffer`: the partial block already on disk, then new records.
    buffer_len: usize,
    buffer: AlignedBuffer,
    /// Bytes in `buffer` that are already on disk (the partial tail block).
    committed_len: usize,
    next_lsn: u64,
    last_written_lsn: u64,
    /// Stopped and joined when the writer is dropped.
    _preparer: SegmentPreparer,
}

impl JournalWriter {
    fn new(journal: Arc<Journal>, path: &Path, header: SegmentHeader, end: u64, next_lsn: u64) -> Result<Self, JournalError> {
        let file = open_segment_for_writing(path)?;
        *journal.active_file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file.clone());
        let mut writer = JournalWriter {
            ring: uring::CommitRing::new().map_err(io_error("create io_uring for the journal"))?,
            file,
            header,
            segment_path: path.to_path_buf(),
            buffer_file_offset: 0,
            buffer_len: 0,
            buffer: AlignedBuffer::new(MAX_BATCH_BYTES + BLOCK_SIZE),
            committed_len: 0,
            next_lsn,
            last_written_lsn: next_lsn - 1,
            _preparer: SegmentPreparer::start(&journal),
            journal,
        };
        writer.load_tail(end)?;
        Ok(writer)
    }

    /// Positions the buffer at `end`, loading the partial block that holds it.
    fn load_tail(&mut self, end: u64) -> Result<(), JournalError> {
        let block_start = end - end % BLOCK_SIZE as u64;
        let partial = (end - block_start) as usize;
        self.buffer[..BLOCK_SIZE].fill(0);
        if partial > 0 {
            let mut block = vec![0u8; BLOCK_SIZE];
            self.file.read_exact_at(&mut block, block_start).map_err(io_error(format!("read tail of {}", self.segment_path.display())))?;
            self.buffer[..partial].copy_from_slice(&block[..partial]);
        }
        self.buffer_file_offset = block_start;
        self.buffer_len = partial;
        self.committed_len = partial;
        Ok(())
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The LSN the next append will get.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    pub fn synced_lsn(&self) -> u64 {
        self.journal.synced_lsn()
    }

    /// LSN of the last record written to the segment files.
    pub fn written_lsn(&self) -> u64 {
        self.last_written_lsn
    }

    /// Bytes staged but not yet written.
    pub fn staged_bytes(&self) -> usize {
        self.buffer_len - self.committed_len
    }

    fn position(&self) -> u64 {
        self.buffer_file_offset + self.buffer_len as u64
    }

    /// Stages one record and returns its LSN. Commits on its own when the batch buffer or the
    /// segment is full; returns [`AppendError::JournalFull`] (nothing staged) when no segment
    /// can be had until a trim.
    pub fn append(&mut self, kind: RecordKind, offset: u64, length: u64, payload: &[u8], flags: u16) -> Result<u64, AppendError> {
        self.append_parts(kind, offset, length, &[payload], flags)
    }

    /// [`JournalWriter::append`] for a payload in pieces (as received from the network).
    pub fn append_parts(&mut self, kind: RecordKind, offset: u64, length: u64, payload: &[impl AsRef<[u8]>], flags: u16) -> Result<u64, AppendError> {
        let payload_len = payload.iter().map(|part| part.as_ref().len() as u64).sum::<u64>();
        if payload_len > self.journal.options.max_payload() {
            return Err(JournalError::RecordTooLarge { size: payload_len, segment_size: self.journal.options.segment_size }.into());
        }
        let encoded = align_up(RECORD_HEADER_SIZE as u64 + payload_len, RECORD_ALIGN) as usize;
        if self.position() + encoded as u64 > self.header.segment_size {
            self.roll_segment()?;
        }
        if self.buffer_len + encoded > self.buffer.len() {
            self.commit(false).map_err(AppendError::Failed)?;
        }
        let lsn = self.next_lsn;
        let header = RecordHeader {
            kind,
            flags,
            lsn,
            offset,
            length,
            payload_len: payload_len as u32,
            synced_lsn: self.journal.synced_lsn(),
            timestamp_us: fsutil::now_micros(),
        };
        let start = self.buffer_len;
        let exact = header.encoded_len();
        header.encode_parts(payload, self.header.salt, &mut self.buffer[start..start + exact]);
        self.buffer[start + exact..start + encoded].fill(0);
        self.buffer_len += encoded;
        self.next_lsn += 1;
        crate::lock(&self.journal.ledger).push(lsn, payload_len, header.timestamp_us);
        Ok(lsn)
    }

    /// Writes everything staged (one write through the page cache, padded to whole blocks)
    /// and, if `sync`, makes the journal durable through the last staged record. Without
    /// `sync`, [`Journal::sync`] (from any thread) makes it durable later.
    pub fn commit(&mut self, sync: bool) -> Result<(), JournalError> {
        let staged = self.staged_bytes() > 0;
        if !staged && (!sync || self.journal.synced_lsn() >= self.last_written_lsn) {
            return Ok(());
        }
        if crate::failpoint::hit("journal-power-cut-before-commit") {
            self.simulate_power_cut();
        }
        let padded = align_up(self.buffer_len as u64, BLOCK_SIZE as u64) as usize;
        self.buffer[self.buffer_len..padded].fill(0);
        let (data, offset) = if staged { (&self.buffer[..padded], self.buffer_file_offset) } else { (&self.buffer[..0], 0) };
        self.ring
            .write_and_maybe_sync(&self.file, data, offset, sync)
            .map_err(io_error(format!("write journal segment {}", self.segment_path.display())))?;
        self.last_written_lsn = self.next_lsn - 1;
        self.journal.written_lsn.store(self.last_written_lsn, Ordering::Release);
        if sync {
            self.journal.synced_lsn.fetch_max(self.last_written_lsn, Ordering::AcqRel);
        }
        let end = self.position();
        {
            let mut table = self.journal.lock_table();
            if let Some(active) = table.retained.last_mut() {
                active.end = end;
            }
        }
        // Keep only the partial last block for the next commit.
        let full_blocks = self.buffer_len / BLOCK_SIZE * BLOCK_SIZE;
        let partial = self.buffer_len - full_blocks;
        self.buffer.copy_within(full_blocks..self.buffer_len, 0);
        self.buffer_file_offset += full_blocks as u64;
        self.buffer_len = partial;
        self.committed_len = partial;
        Ok(())
    }

    /// Test failpoint: behave as if power failed now. Everything written since the last
    /// fdatasync is lost (zeroed on disk, the worst case a drive's cache allows), then the
    /// process dies without any cleanup.
    fn simulate_power_cut(&mut self) -> ! {
        let table = self.journal.lock_table();
        let synced_lsn = self.journal.synced_lsn();
        tracing::error!(synced_lsn, "failpoint: simulating a power cut (dropping unsynced journal bytes)");
        // Records after synced_lsn are in the active segment (rolling a segment syncs it).
        if let Ok(plain) = std::fs::OpenOptions::new().read(true).write(true).open(&self.segment_path) {
            let mut position = SEGMENT_HEADER_SIZE;
            let mut cut = None;
            while position + RECORD_HEADER_SIZE as u64 <= self.header.segment_size {
                let mut head = [0u8; RECORD_HEADER_SIZE];
                if plain.read_exact_at(&mut head, position).is_err() {
                    break;
                }
                match format::decode_header(&head, self.header.segment_size - position) {
                    Ok(header) if header.lsn > synced_lsn => {
                        cut = Some(position);
                        break;
                    }
                    Ok(header) => position += align_up(header.encoded_len() as u64, RECORD_ALIGN),
                    Err(_) => break,
                }
            }
            if let Some(cut) = cut {
                let end = self.position().max(cut);
                let zeros = vec![0u8; (end - cut) as usize];
                let _ = plain.write_all_at(&zeros, cut);
                let _ = plain.sync_data();
            }
        }
        // Die holding the table lock: a sync that finished meanwhile must not be published
        // (and acknowledge a FLUSH) after we zeroed what it covered.
        let _frozen = table;
        std::process::abort();
    }

    /// Seals the active segment (durably) and starts the next one.
    fn roll_segment(&mut self) -> Result<(), AppendError> {
        let next_first = self.next_lsn;
        let path = self.journal.dir.join(segment_file_name(next_first));
        let spare = {
            let mut table = self.journal.lock_table();
            // Only the preparer creates files (so the cap holds): while one is being made, or
            // may still be made, wait for it rather than calling the journal full. Normally a
            // few milliseconds; if creating files keeps failing (disk full), status shows the
            // journal as full while writes wait.
            while table.spare.is_empty() && (table.preparing || table.files() < self.journal.options.max_segments()) {
                self.journal.full.store(true, Ordering::Release);
                self.journal.spare_wanted.notify_all();
                table = self.journal.space_freed.wait_timeout(table, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            }
            let Some(spare) = table.spare.pop() else {
                self.journal.full.store(true, Ordering::Release);
                return Err(AppendError::JournalFull);
            };
            table.rolling = true;
            spare
        };
        self.journal.full.store(false, Ordering::Release);
        self.journal.spare_wanted.notify_all();
        let started = self.commit(true).and_then(|()| {
            let header = initialise_segment_file(&path, Some(&spare), next_first, &self.journal.options)?;
            fsutil::sync_dir(&self.journal.dir).map_err(io_error(format!("sync {}", self.journal.dir.display())))?;
            Ok((header, open_segment_for_writing(&path)?))
        });
        let mut table = self.journal.lock_table();
        table.rolling = false;
        let (header, file) = match started {
            Ok(started) => started,
            Err(error) => {
                // Keep the file in the pool, under whichever name it now has.
                table.spare.push(if spare.exists() { spare } else { path });
                return Err(error.into());
            }
        };
        table.retained.push(SegmentEntry { first_lsn: next_first, path: path.clone(), end: SEGMENT_HEADER_SIZE });
        drop(table);
        *self.journal.active_file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file.clone());
        self.file = file;
        self.header = header;
        self.segment_path = path;
        self.load_tail(SEGMENT_HEADER_SIZE)?;
        Ok(())
    }

    /// Waits until a trim frees a segment or `timeout` passes; true if space may be available.
    pub fn wait_for_space(&self, timeout: Duration) -> bool {
        let table = self.journal.lock_table();
        let has_space = |t: &SegmentTable| !t.spare.is_empty() || t.files() < self.journal.options.max_segments();
        if has_space(&table) {
            return true;
        }
        let (table, _) = self
            .journal
            .space_freed
            .wait_timeout_while(table, timeout, |t| !has_space(t))
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        has_space(&table)
    }
}

/// Keeps one zero-filled spare segment ready in the background while the cap allows, so a
/// growing journal never stalls writes on creating a segment. Owned by the writer, which stops
/// and joins it when dropped.
struct SegmentPreparer {
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SegmentPreparer {
    fn start(journal: &Arc<Journal>) -> SegmentPreparer {
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

/// Segments are written through the page cache: a write is acknowledged at memory speed and
/// made durable by fdatasync (FLUSH, FUA, background sync), like a disk's volatile cache.
fn open_segment_for_writing(path: &Path) -> Result<Arc<File>, JournalError> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io_error(format!("open {}", path.display())))?;
    Ok(Arc::new(file))
}

/// Applies one record's effect to a store (a volume's backing store or a replica image):
/// the one definition of what each record kind does to device bytes.
pub fn apply_record(store: &File, is_block_device: bool, kind: RecordKind, offset: u64, length: u64, payload: &[u8]) -> io::Result<()> {
    apply_record_parts(store, is_block_device, kind, offset, length, &[payload])
}

/// [`apply_record`] for a payload in pieces (as received from the network).
pub fn apply_record_parts(store: &File, is_block_device: bool, kind: RecordKind, offset: u64, length: u64, payload: &[impl AsRef<[u8]>]) -> io::Result<()> {
    match kind {
        RecordKind::Write => match payload {
            [single] => store.write_all_at(single.as_ref(), offset),
            parts => fsutil::write_all_vectored_at(store, parts, offset),
        },
        RecordKind::WriteZeroes => fsutil::zero_range(store, offset, length, false, is_block_device),
        RecordKind::Discard => fsutil::zero_range(store, offset, length, true, is_block_device),
        RecordKind::Marker => Ok(()),
    }
}

pub(crate) fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// Iterates over records from a retained LSN, up to what the writer has written.
pub struct JournalReader {
    journal: Arc<Journal>,
    next_lsn: u64,
    segment: Option<OpenSegment>,
}

struct OpenSegment {
    file: File,
    header: SegmentHeader,
    first_lsn: u64,
    position: u64,
    /// Read-ahead: bytes of the file from `ahead_start`. Records are handed out as slices of
    /// it (no copy per record), and small records cost no syscall each.
    ahead: Bytes,
    ahead_start: u64,
}

/// Bytes read ahead at a time.
const READ_AHEAD: usize = 1 << 20;

impl OpenSegment {
    /// The record at `position`, from the read-ahead buffer when it holds a valid one there,
    /// else from the file (refilling the buffer). A refill reads up to where the journal's
    /// table says this segment's written records end and no further, so a reader tailing the
    /// writer gets every new record with one read (the table is consulted only on a refill). The CRC still decides
    /// what is a record: bytes past the end (zeros, or a recycled file's old records, which
    /// fail the salted CRC) are never trusted, and a record that does not verify in the buffer
    /// is read again from the file.
    fn record_at(&mut self, position: u64, journal: &Journal) -> Result<Option<Record>, JournalError> {
        if let Some(record) = self.buffered_record(position) {
            return Ok(Some(record));
        }
        let written_end = journal.segment_end(self.first_lsn);
        let available = written_end.min(self.header.segment_size).saturating_sub(position);
        if available < RECORD_HEADER_SIZE as u64 {
            // The table's end lags the written LSN for a moment after a commit: read exactly.
            return read_record(&self.file, &self.header, position);
        }
        // A record larger than the read-ahead (a 1 MiB write) is read whole in one go: its
        // header is read first to size the buffer. (Growing the buffer for the rest of it
        // copied every large record once more: 10% of the sender's time in a 1 MiB drain.)
        let mut head = [0u8; RECORD_HEADER_SIZE];
        let whole = match self.file.read_exact_at(&mut head, position) {
            Ok(()) => format::decode_header(&head, self.header.segment_size - position).map_or(0, |header| RECORD_HEADER_SIZE + header.payload_len as usize),
            Err(_) => 0,
        };
        let length = READ_AHEAD.max(whole).min(available as usize);
        let mut buffer = BytesMut::with_capacity(length);
        // A short read leaves a record that does not verify: read_record decides.
        fsutil::read_at_into(&self.file, &mut buffer, length, position).map_err(io_error("read journal segment"))?;
        self.ahead = buffer.freeze();
        self.ahead_start = position;
        if let Some(record) = self.buffered_record(position) {
            return Ok(Some(record));
        }
        read_record(&self.file, &self.header, position)
    }

    fn buffered_record(&self, position: u64) -> Option<Record> {
        let offset = position.checked_sub(self.ahead_start)? as usize;
        let head: &[u8; RECORD_HEADER_SIZE] = self.ahead.get(offset..offset + RECORD_HEADER_SIZE)?.try_into().ok()?;
        let record_header = format::decode_header(head, self.header.segment_size - position).ok()?;
        let payload_range = offset + RECORD_HEADER_SIZE..offset + RECORD_HEADER_SIZE + record_header.payload_len as usize;
        format::verify_record(head, self.ahead.get(payload_range.clone())?, self.header.salt).ok()?;
        Some(Record { header: record_header, payload: self.ahead.slice(payload_range) })
    }
}

impl JournalReader {
    pub fn new(journal: Arc<Journal>, from_lsn: u64) -> Result<Self, JournalError> {
        journal.locate(from_lsn)?;
        Ok(JournalReader { journal, next_lsn: from_lsn, segment: None })
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The next record, or `None` once every written record has been read.
    pub fn next_record(&mut self) -> Result<Option<Record>, JournalError> {
        if self.next_lsn > self.journal.written_lsn() {
            return Ok(None);
        }
        loop {
            if self.segment.is_none() {
                let (path, first_lsn) = self.journal.locate(self.next_lsn)?;
                self.segment = Some(open_segment_at(&self.journal, &path, first_lsn, self.next_lsn)?);
            }
            let segment = self.segment.as_mut().expect("opened above");
            let position = segment.position;
            let found = segment.record_at(position, &self.journal)?;
            match found {
                Some(record) if record.header.lsn == self.next_lsn => {
                    segment.position += align_up(record.header.encoded_len() as u64, RECORD_ALIGN);
                    self.next_lsn += 1;
                    return Ok(Some(record));
                }
                other => {
                    // End of this segment's records: the next LSN must start the next segment.
                    match self.journal.next_segment(segment.first_lsn) {
                        Some((_, first)) if first == self.next_lsn => {
                            self.segment = None;
                        }
                        _ => {
                            return Err(JournalError::Corrupt(format!(
                                "reading segment starting at LSN {}: expected LSN {} at offset {}, found {}",
                                segment.first_lsn,
                                self.next_lsn,
                                segment.position,
                                match other {
                                    Some(record) => format!("LSN {}", record.header.lsn),
                                    None => "no valid record".into(),
                                }
                            )))
                        }
                    }
                }
            }
        }
    }
}

fn open_segment_at(journal: &Journal, path: &Path, first_lsn: u64, lsn: u64) -> Result<OpenSegment, JournalError> {
    let file = File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    let mut block = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut block, 0).map_err(io_error(format!("read header of {}", path.display())))?;
    let header = SegmentHeader::decode(&block).map_err(|problem| JournalError::Corrupt(format!("{}: {problem}", path.display())))?;
    let mut segment = OpenSegment { file, header, first_lsn, position: SEGMENT_HEADER_SIZE, ahead: Bytes::new(), ahead_start: 0 };
    // Skip to `lsn` (a reader resuming mid-segment); the segment's first record needs no scan.
    if lsn > first_lsn {
        while let Some(record) = segment.record_at(segment.position, journal)?.filter(|record| record.header.lsn < lsn) {
            segment.position += align_up(record.header.encoded_len() as u64, RECORD_ALIGN);
        }
    }
    Ok(segment)
}

/// Reads and verifies the record at `position`; `None` if there is no valid record there.
fn read_record(file: &File, header: &SegmentHeader, position: u64) -> Result<Option<Record>, JournalError> {
    if position + RECORD_HEADER_SIZE as u64 > header.segment_size {
        return Ok(None);
    }
    let mut head = [0u8; RECORD_HEADER_SIZE];
    file.read_exact_at(&mut head, position).map_err(io_error("read journal record header"))?;
    let Ok(record_header) = format::decode_header(&head, header.segment_size - position) else {
        return Ok(None);
    };
    let mut payload = BytesMut::zeroed(record_header.payload_len as usize);
    file.read_exact_at(&mut payload, position + RECORD_HEADER_SIZE as u64).map_err(io_error("read journal record payload"))?;
    if format::verify_record(&head, &payload, header.salt).is_err() {
        return Ok(None);
    }
    Ok(Some(Record { header: record_header, payload: payload.freeze() }))
}
