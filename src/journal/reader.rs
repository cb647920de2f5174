//! Readers: iterate over the retained records from any LSN, up to what the writer has
//! written, trusting only records that verify.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::format::{self, SegmentHeader, BLOCK_SIZE, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
use super::{align_up, io_error, Journal, JournalError, Record, RECORD_ALIGN};
use crate::fsutil;

/// Iterates over records from a retained LSN, up to what the writer has written.
pub struct JournalReader {
    journal: Arc<Journal>,
    next_lsn: u64,
    segment: Option<OpenSegment>,
    /// Where `next_lsn` is when the last record came from memory in a segment not opened
    /// (segment's first LSN, file offset): opening it then needs no scan.
    resume: Option<(u64, u64)>,
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
        Ok(JournalReader { journal, next_lsn: from_lsn, segment: None, resume: None })
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The next record, or `None` once every written record has been read.
    pub fn next_record(&mut self) -> Result<Option<Record>, JournalError> {
        if self.next_lsn > self.journal.written_lsn() {
            return Ok(None);
        }
        // Just written and kept in memory while a reader follows the writer (`recent.rs`).
        if let Some(recent) = self.journal.recent(self.next_lsn) {
            let next = recent.next_position();
            match self.segment.as_mut() {
                Some(segment) if segment.first_lsn == recent.segment => segment.position = next,
                _ => {
                    self.segment = None;
                    self.resume = Some((recent.segment, next));
                }
            }
            self.next_lsn += 1;
            return Ok(Some(recent.record));
        }
        loop {
            if self.segment.is_none() {
                let (path, first_lsn) = self.journal.locate(self.next_lsn)?;
                let resume = self.resume.take().filter(|(segment, _)| *segment == first_lsn).map(|(_, position)| position);
                self.segment = Some(open_segment_at(&self.journal, &path, first_lsn, self.next_lsn, resume)?);
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

/// Opens the segment starting at `first_lsn` positioned at `lsn`: at `known_position` when
/// the caller knows where that record is, else found by reading from the segment's start.
fn open_segment_at(journal: &Journal, path: &Path, first_lsn: u64, lsn: u64, known_position: Option<u64>) -> Result<OpenSegment, JournalError> {
    let file = File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    let mut block = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut block, 0).map_err(io_error(format!("read header of {}", path.display())))?;
    let header = SegmentHeader::decode(&block).map_err(|problem| JournalError::Corrupt(format!("{}: {problem}", path.display())))?;
    let mut segment = OpenSegment { file, header, first_lsn, position: SEGMENT_HEADER_SIZE, ahead: Bytes::new(), ahead_start: 0 };
    // Skip to `lsn` (a reader resuming mid-segment); the segment's first record needs no scan.
    if let Some(position) = known_position {
        segment.position = position;
    } else if lsn > first_lsn {
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
