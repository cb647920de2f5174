//! The single writer of a journal: group commit into the active segment, segment rolls, and
//! the power-cut failpoint.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::format::{self, segment_file_name, RecordHeader, RecordKind, SegmentHeader, BLOCK_SIZE, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
use super::ledger::LedgerEntry;
use super::preparer::SegmentPreparer;
use super::recent::Recent;
use super::table::{initialise_segment_file, open_segment_for_writing, SegmentEntry, SegmentTable};
use super::{align_up, io_error, uring, Journal, JournalError, Record, MAX_BATCH_BYTES, RECORD_ALIGN};
use crate::extent::Extent;
use crate::fsutil::{self, AlignedBuffer};

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

/// A piece of a record's payload.
pub trait PayloadPart: AsRef<[u8]> {
    /// The piece as a shared buffer the writer may keep until the commit and write from where
    /// it is, instead of copying it into the batch buffer.
    fn shared(&self) -> Option<&bytes::Bytes> {
        None
    }
}

impl PayloadPart for &[u8] {}

impl PayloadPart for bytes::Bytes {
    fn shared(&self) -> Option<&bytes::Bytes> {
        Some(self)
    }
}

/// Pieces shorter than this are copied into the batch buffer anyway: an iovec of its own
/// costs more than copying a few hundred bytes.
const REFERENCE_MIN: usize = 1024;

/// A payload piece staged by reference: its bytes belong at `at` in the batch buffer's
/// coordinates, and the buffer's own bytes there are not written.
struct Referenced {
    at: usize,
    bytes: bytes::Bytes,
}

/// The single writer of a journal. Records are staged in an aligned batch buffer and written
/// by [`JournalWriter::commit`]; the block holding the end of the previous commit is written
/// again with the new records after it (its earlier bytes are identical, so a torn rewrite
/// cannot damage records that were already durable). Payloads given as shared buffers (a
/// volume's write requests; the applier's, in the pieces QUIC handed over) are not copied
/// into the batch buffer: the
/// commit writes them from where they are, between the buffer's headers and padding, with
/// `pwritev` (one copy into the page cache instead of two).
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
    /// Staged payload pieces written from where they are, in buffer order.
    referenced: Vec<Referenced>,
    /// Staged records to keep in memory once written, while a reader follows the writer.
    staged_recent: Vec<Recent>,
    next_lsn: u64,
    last_written_lsn: u64,
    /// The failpoint prefix of this journal's writes (`journal-write`, `applier-journal`).
    fault_op: &'static str,
    /// Stopped and joined when the writer is dropped.
    _preparer: SegmentPreparer,
}

impl JournalWriter {
    pub(super) fn new(journal: Arc<Journal>, path: &Path, header: SegmentHeader, end: u64, next_lsn: u64) -> Result<Self, JournalError> {
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
            referenced: Vec::new(),
            staged_recent: Vec::new(),
            next_lsn,
            last_written_lsn: next_lsn - 1,
            fault_op: "journal-write",
            _preparer: SegmentPreparer::start(&journal),
            journal,
        };
        writer.load_tail(end)?;
        Ok(writer)
    }

    /// Positions the buffer at `end`, loading the partial block that holds it.
    fn load_tail(&mut self, end: u64) -> Result<(), JournalError> {
        debug_assert!(self.referenced.is_empty(), "a new segment starts after a commit");
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

    /// Names the failpoints that inject disk errors into this journal's writes
    /// (`OP-eio`, `OP-enospc`; see `failpoint::disk_error`).
    pub fn set_fault_op(&mut self, op: &'static str) {
        self.fault_op = op;
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
    pub fn append(&mut self, kind: RecordKind, extent: Extent, payload: &[u8], flags: u16) -> Result<u64, AppendError> {
        self.append_parts(kind, extent, &[payload], flags)
    }

    /// [`JournalWriter::append`] for a payload in pieces (as received from the network):
    /// pieces that are shared buffers of at least [`REFERENCE_MIN`] bytes are kept, not
    /// copied, until the commit writes them.
    pub fn append_parts(&mut self, kind: RecordKind, extent: Extent, payload: &[impl PayloadPart], flags: u16) -> Result<u64, AppendError> {
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
            offset: extent.offset,
            length: extent.length,
            payload_len: payload_len as u32,
            synced_lsn: self.journal.synced_lsn(),
            timestamp_us: crate::clock::now_micros(),
        };
        let start = self.buffer_len;
        let mut at = start + RECORD_HEADER_SIZE;
        header.encode_header(payload, self.header.salt, &mut self.buffer[start..at]);
        for part in payload {
            let bytes = part.as_ref();
            match part.shared().filter(|shared| shared.len() >= REFERENCE_MIN) {
                Some(shared) => self.referenced.push(Referenced { at, bytes: shared.clone() }),
                None => self.buffer[at..at + bytes.len()].copy_from_slice(bytes),
            }
            at += bytes.len();
        }
        debug_assert_eq!(at, start + header.encoded_len());
        if self.journal.keeping_recent.load(Ordering::Acquire) {
            if let Some(payload) = kept_payload(payload, payload_len) {
                let position = self.buffer_file_offset + start as u64;
                self.staged_recent.push(Recent { record: Record { header, payload }, segment: self.header.first_lsn, position });
            }
        }
        self.buffer[at..start + encoded].fill(0);
        self.buffer_len += encoded;
        self.next_lsn += 1;
        crate::lock(&self.journal.ledger).push(lsn, LedgerEntry::of(&header));
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
        let written = match crate::failpoint::disk_error(self.fault_op) {
            Some(injected) => Err(injected),
            None if self.referenced.is_empty() => self.ring.write_and_maybe_sync(&self.file, data, offset, sync),
            None => write_with_references(&self.file, data, &self.referenced, offset, sync),
        };
        if let Err(error) = written {
            // After a failed write or fdatasync the kernel may keep pages it will never write
            // (marked clean): drop them, so whatever reads the journal next (recovery after a
            // restart, a reader) sees what the disk holds, not what the cache pretends.
            fsutil::drop_from_cache(&self.file, 0, 0);
            self.staged_recent.clear();
            self.journal.lock_recent().clear();
            return Err(io_error(format!("write journal segment {}", self.segment_path.display()))(error));
        }
        if !self.staged_recent.is_empty() {
            // Before `written_lsn` moves: a reader never looks for a record it cannot read.
            self.journal.lock_recent().extend(self.staged_recent.drain(..));
        }
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
        // Keep only the partial last block for the next commit (with the bytes of any piece
        // written from elsewhere that ends in it).
        let full_blocks = self.buffer_len / BLOCK_SIZE * BLOCK_SIZE;
        let partial = self.buffer_len - full_blocks;
        for piece in self.referenced.drain(..) {
            let (from, to) = (piece.at.max(full_blocks), (piece.at + piece.bytes.len()).min(self.buffer_len));
            if from < to {
                self.buffer[from..to].copy_from_slice(&piece.bytes[from - piece.at..to - piece.at]);
            }
        }
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
                if let (false, Some((context, errno))) = (table.preparing, &table.prepare_failure) {
                    // The journal must grow and the disk cannot give it a segment: the record
                    // fails (ENOSPC when the disk is full) rather than waiting for room.
                    let source = std::io::Error::from_raw_os_error(*errno);
                    return Err(AppendError::Failed(JournalError::Io { context: context.clone(), source }));
                }
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
        let (table, _) = self.journal.space_freed.wait_timeout_while(table, timeout, |t| !has_space(t)).unwrap_or_else(|poisoned| poisoned.into_inner());
        has_space(&table)
    }
}

/// A record's payload as the journal keeps it in memory for readers that follow the writer:
/// the shared buffer it was given as (no copy), or a copy of a small one; `None` for a large
/// payload in pieces (its readers read it from the file).
fn kept_payload(payload: &[impl PayloadPart], payload_len: u64) -> Option<bytes::Bytes> {
    // A small slice is copied rather than kept by reference: it may be a piece of a much
    // larger buffer (a batch of received packets) that it would keep alive.
    let whole = match payload {
        [one] if payload_len >= REFERENCE_MIN as u64 => one.shared(),
        _ => None,
    };
    match whole {
        Some(shared) => Some(shared.clone()),
        None if payload_len <= BLOCK_SIZE as u64 => {
            let mut copy = bytes::BytesMut::with_capacity(payload_len as usize);
            for part in payload {
                copy.extend_from_slice(part.as_ref());
            }
            Some(copy.freeze())
        }
        None => None,
    }
}

/// Writes `batch` at `offset` with the `referenced` pieces in place of the buffer's bytes
/// under them (`pwritev`; the kernel copies each piece into the page cache once), then
/// fdatasyncs if `sync`.
fn write_with_references(file: &File, batch: &[u8], referenced: &[Referenced], offset: u64, sync: bool) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * referenced.len() + 1);
    let mut cursor = 0;
    for piece in referenced {
        if piece.at > cursor {
            parts.push(&batch[cursor..piece.at]);
        }
        parts.push(&piece.bytes);
        cursor = piece.at + piece.bytes.len();
    }
    parts.push(&batch[cursor..]);
    fsutil::write_all_vectored_at(file, &parts, offset)?;
    if sync {
        file.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{JournalOptions, JournalReader};
    use bytes::Bytes;

    /// Records whose payloads arrive as shared pieces (some referenced, some copied) among
    /// copied ones, committed at odd points (so pieces end inside the partial tail block that
    /// the next commit rewrites) and across segment rolls, read back intact after a reopen.
    #[test]
    fn payloads_written_from_where_they_are_read_back_as_appended() {
        let tmp = tempfile::tempdir().unwrap();
        let options = JournalOptions { segment_size: 1 << 20, capacity: 16 << 20, journal_id: [5; 16] };
        Journal::create(tmp.path(), options).unwrap();
        let mut expected = Vec::new();
        {
            let (_journal, mut writer, _) = Journal::open(tmp.path(), options).unwrap();
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut next = |below: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % below
            };
            for i in 0..300u64 {
                let pieces: Vec<Bytes> = (0..1 + next(6))
                    .map(|p| {
                        let len = [0, 100, 1023, 1024, 1500, 4096, 6500, 70_000][next(8) as usize];
                        Bytes::from((0..len).map(|j| (i * 7 + p * 13 + j) as u8).collect::<Vec<u8>>())
                    })
                    .collect();
                let payload: Vec<u8> = pieces.concat();
                let extent = Extent::new(i * 4096, payload.len() as u64);
                let lsn = if next(4) == 0 {
                    writer.append(RecordKind::Write, extent, &payload, 0).unwrap()
                } else {
                    writer.append_parts(RecordKind::Write, extent, &pieces, 0).unwrap()
                };
                expected.push((lsn, payload));
                match next(5) {
                    0 => writer.commit(true).unwrap(),
                    1 => writer.commit(false).unwrap(),
                    _ => {}
                }
            }
            writer.commit(true).unwrap();
        }
        let (journal, _writer, _) = Journal::open(tmp.path(), options).unwrap();
        let mut reader = JournalReader::new(journal, 1).unwrap();
        for (lsn, payload) in &expected {
            let record = reader.next_record().unwrap().unwrap_or_else(|| panic!("LSN {lsn} missing"));
            assert_eq!(record.header.lsn, *lsn);
            assert!(record.payload[..] == payload[..], "LSN {lsn}: payload differs");
        }
        assert!(reader.next_record().unwrap().is_none());
    }
}
