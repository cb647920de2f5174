//! Journal recovery: find the retained segments, verify every record (CRC, LSN continuity),
//! cut a torn tail, refuse corruption in the middle.
//!
//! How a torn tail is told apart from corruption: every record stores `synced_lsn`, how far
//! the journal was durable when it was written. If a damaged record at LSN n is followed by
//! any valid record with `synced_lsn >= n`, record n had been durable (and perhaps
//! acknowledged to a FLUSH) before it went bad: that is corruption and recovery stops with
//! an error. Otherwise the damage lies in the last, never-synced commit: a torn tail.

use std::path::{Path, PathBuf};

use super::format::{self, parse_segment_file_name, SegmentHeader, BLOCK_SIZE, RECORD_HEADER_SIZE, RECORD_MAGIC, SEGMENT_HEADER_SIZE};
use super::ledger::LedgerEntry;
use super::table::SegmentEntry;
use super::{align_up, io_error, JournalError, JournalOptions, RECORD_ALIGN};
use crate::fsutil;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Cut a torn tail (zero its bytes) and make the journal durable: used when opening to write.
    Repair,
    /// Change nothing; report what Repair would do.
    Inspect,
}

/// What recovery found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// Oldest retained LSN.
    pub first_lsn: u64,
    /// Newest valid LSN (`first_lsn - 1` when the journal holds no record).
    pub last_lsn: u64,
    pub segments: usize,
    pub spare_segments: usize,
    pub segment_size: u64,
    /// Bytes of records held (excluding segment headers).
    pub used_bytes: u64,
    /// A torn tail that was cut (Repair) or would be (Inspect).
    pub torn_tail: Option<String>,
}

pub(super) struct Recovered {
    pub report: RecoveryReport,
    pub retained: Vec<SegmentEntry>,
    pub spare: Vec<PathBuf>,
    pub active_header: SegmentHeader,
    /// Payload bytes, append time and extent of every retained record, in LSN order.
    pub records: Vec<LedgerEntry>,
}

/// Where and why the scan of one segment stopped.
struct ScanStop {
    position: u64,
    reason: String,
}

pub(super) fn recover(dir: &Path, options: Option<&JournalOptions>, mode: RecoveryMode) -> Result<Recovered, JournalError> {
    let mut segments = Vec::new();
    let mut spare = Vec::new();
    let listing = std::fs::read_dir(dir).map_err(io_error(format!("list journal directory {}", dir.display())))?;
    for entry in listing {
        let entry = entry.map_err(io_error(format!("list journal directory {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(first_lsn) = parse_segment_file_name(&name) {
            segments.push((first_lsn, entry.path()));
        } else if format::is_spare_file_name(&name) {
            spare.push(entry.path());
        } else if name.ends_with(format::CREATING_SUFFIX) && mode == RecoveryMode::Repair {
            // A segment whose creation a crash interrupted (see `initialise_segment_file`).
            let _ = std::fs::remove_file(entry.path());
        }
    }
    segments.sort();
    if segments.is_empty() {
        return Err(JournalError::Corrupt(format!("no segment files in {}", dir.display())));
    }

    let mut retained: Vec<SegmentEntry> = Vec::new();
    let mut records: Vec<LedgerEntry> = Vec::new();
    let mut active_header = None;
    let mut previous_stop: Option<(PathBuf, ScanStop)> = None;
    let mut expected_lsn: Option<u64> = None;
    let mut torn_tail = None;
    let count = segments.len();
    for (index, (name_lsn, path)) in segments.into_iter().enumerate() {
        let is_last = index + 1 == count;
        let bytes = std::fs::read(&path).map_err(io_error(format!("read segment {}", path.display())))?;
        let header = match SegmentHeader::decode(&bytes) {
            // LSNs start at 1: a journal from LSN 0 would report its last LSN as -1.
            Ok(header) if header.first_lsn == name_lsn && header.first_lsn != 0 => header,
            other => {
                let problem = match other {
                    Ok(header) if header.first_lsn == 0 => "header says first LSN 0 (LSNs start at 1)".to_string(),
                    Ok(header) => format!("header says first LSN {} but the file name says {name_lsn}", header.first_lsn),
                    Err(problem) => problem.to_string(),
                };
                if is_last && index > 0 {
                    // A crash while a new segment was being set up: it holds no record yet.
                    tracing::warn!(segment = %path.display(), %problem, "unfinished segment set-up; returning the file to the spare pool");
                    if mode == RecoveryMode::Repair {
                        let spare_path = dir.join(format!("free-{}", format::segment_file_name(name_lsn)));
                        std::fs::rename(&path, &spare_path).map_err(io_error(format!("recycle {}", path.display())))?;
                        fsutil::sync_dir(dir).map_err(io_error(format!("sync {}", dir.display())))?;
                        spare.push(spare_path);
                    }
                    break;
                }
                return Err(JournalError::Corrupt(format!("segment {}: bad header: {problem}", path.display())));
            }
        };
        if let Some(options) = options {
            if header.journal_id != options.journal_id {
                return Err(JournalError::Corrupt(format!(
                    "segment {} belongs to another journal (id {}, expected {})",
                    path.display(),
                    uuid::Uuid::from_bytes(header.journal_id),
                    uuid::Uuid::from_bytes(options.journal_id)
                )));
            }
            if header.segment_size != options.segment_size {
                return Err(JournalError::Corrupt(format!(
                    "segment {} has size {} but the journal is configured for {}",
                    path.display(),
                    header.segment_size,
                    options.segment_size
                )));
            }
        }
        if bytes.len() as u64 != header.segment_size {
            return Err(JournalError::Corrupt(format!("segment {} is {} bytes long, its header says {}", path.display(), bytes.len(), header.segment_size)));
        }
        if let Some(expected) = expected_lsn {
            if header.first_lsn != expected {
                let (previous, stop) = previous_stop.take().expect("set with expected_lsn");
                return Err(JournalError::Corrupt(format!(
                    "segment {} offset {}: expected record LSN {expected}, found {}; the next segment {} starts at LSN {}",
                    previous.display(),
                    stop.position,
                    stop.reason,
                    path.display(),
                    header.first_lsn
                )));
            }
        }

        let (next_lsn, stop) = scan_segment(&bytes, &header, &mut records);
        if is_last {
            let damage = find_later_records(&bytes, &header, stop.position, next_lsn);
            if let Some((position, lsn, synced_lsn)) = damage.proof {
                return Err(JournalError::Corrupt(format!(
                    "segment {} offset {}: expected record LSN {next_lsn}, found {}; yet record LSN {lsn} at offset {position} \
                     was written when the journal was durable through LSN {synced_lsn}, so acknowledged records follow the damage",
                    path.display(),
                    stop.position,
                    stop.reason
                )));
            }
            if damage.valid_end > stop.position || stop.reason != "no record magic" {
                let cut_end = damage.valid_end.max(stop.position);
                torn_tail = Some(format!(
                    "segment {} offset {}: {} (expected LSN {next_lsn}); {} bytes of an unsynced commit cut",
                    path.display(),
                    stop.position,
                    stop.reason,
                    cut_end - stop.position
                ));
                if mode == RecoveryMode::Repair {
                    tracing::warn!(tail = torn_tail.as_deref().unwrap_or_default(), "journal recovery cut a torn tail");
                    if damage.valid_end > stop.position {
                        zero_range(&path, stop.position, damage.valid_end)?;
                    }
                }
            }
            if mode == RecoveryMode::Repair {
                // After kill -9 the tail may sit only in the page cache: make it durable before
                // anything is redone from it.
                let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(io_error(format!("open {}", path.display())))?;
                file.sync_data().map_err(io_error(format!("sync {}", path.display())))?;
            }
            active_header = Some(header);
        }
        retained.push(SegmentEntry { first_lsn: header.first_lsn, path: path.clone(), end: stop.position });
        expected_lsn = Some(next_lsn);
        previous_stop = Some((path, stop));
        if active_header.is_none() && is_last {
            active_header = Some(header);
        }
    }
    // The last segment may have been returned to the pool: the one before it is active then.
    let active_header = match active_header {
        Some(header) => header,
        None => {
            let last = retained.last().expect("the first segment is always retained");
            let bytes = std::fs::read(&last.path).map_err(io_error(format!("read segment {}", last.path.display())))?;
            SegmentHeader::decode(&bytes).map_err(|problem| JournalError::Corrupt(format!("{}: {problem}", last.path.display())))?
        }
    };
    let spare = usable_spares(spare, active_header.segment_size, mode);
    let first_lsn = retained[0].first_lsn;
    let last_lsn = expected_lsn.expect("at least one segment scanned") - 1;
    let report = RecoveryReport {
        first_lsn,
        last_lsn,
        segments: retained.len(),
        spare_segments: spare.len(),
        segment_size: active_header.segment_size,
        used_bytes: retained.iter().map(|s| s.end - SEGMENT_HEADER_SIZE).sum(),
        torn_tail,
    };
    // Segments before a gap were dropped: keep the records of the retained LSN range only.
    let retained_records = (last_lsn + 1 - first_lsn) as usize;
    records.drain(..records.len().saturating_sub(retained_records));
    Ok(Recovered { report, retained, spare, active_header, records })
}

/// The spare files a writer may take: those of the segment size. Another length is a spare
/// whose zero-filling a crash interrupted in a version that made spares in place, or a file
/// someone cut: used as a segment it would make the journal unreadable at the next recovery
/// ("N bytes long, its header says M"), so Repair removes it and Inspect leaves it out.
fn usable_spares(spare: Vec<PathBuf>, segment_size: u64, mode: RecoveryMode) -> Vec<PathBuf> {
    spare
        .into_iter()
        .filter(|path| match std::fs::metadata(path) {
            Ok(meta) if meta.len() == segment_size => true,
            found => {
                let length = found.map_or_else(|e| e.to_string(), |meta| format!("{} bytes", meta.len()));
                tracing::warn!(spare = %path.display(), %length, segment_size, "a spare segment file is not a whole segment; not using it");
                if mode == RecoveryMode::Repair {
                    let _ = std::fs::remove_file(path);
                }
                false
            }
        })
        .collect()
}

/// Reads records from the start of the segment while they verify and their LSNs follow on.
fn scan_segment(bytes: &[u8], header: &SegmentHeader, records: &mut Vec<LedgerEntry>) -> (u64, ScanStop) {
    let mut position = SEGMENT_HEADER_SIZE;
    let mut lsn = header.first_lsn;
    loop {
        match record_at(bytes, header, position) {
            // No record has LSN u64::MAX (the next one would have none): it ends the scan.
            Ok(record) if record.lsn == lsn && lsn != u64::MAX => {
                records.push(LedgerEntry::of(&record));
                position += align_up(record.encoded_len() as u64, RECORD_ALIGN);
                lsn += 1;
            }
            Ok(record) => return (lsn, ScanStop { position, reason: format!("a record with LSN {}", record.lsn) }),
            Err(reason) => return (lsn, ScanStop { position, reason }),
        }
    }
}

fn record_at(bytes: &[u8], header: &SegmentHeader, position: u64) -> Result<format::RecordHeader, String> {
    let start = position as usize;
    if start + RECORD_HEADER_SIZE > bytes.len() {
        return Err("end of segment".into());
    }
    let head: &[u8; RECORD_HEADER_SIZE] = bytes[start..start + RECORD_HEADER_SIZE].try_into().expect("sized");
    let record = format::decode_header(head, header.segment_size - position).map_err(|p| p.to_string())?;
    let payload = &bytes[start + RECORD_HEADER_SIZE..start + record.encoded_len()];
    format::verify_record(head, payload, header.salt).map_err(|p| p.to_string())?;
    Ok(record)
}

struct LaterRecords {
    /// A valid record past the damage that proves the damaged one had been durable.
    proof: Option<(u64, u64, u64)>,
    /// End of the furthest valid record (of this incarnation) past the damage.
    valid_end: u64,
}

/// Looks past the stop position for records of this segment incarnation.
fn find_later_records(bytes: &[u8], header: &SegmentHeader, stop: u64, stopped_lsn: u64) -> LaterRecords {
    let mut later = LaterRecords { proof: None, valid_end: stop };
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut position = stop + RECORD_ALIGN;
    while (position as usize) + RECORD_HEADER_SIZE <= bytes.len() {
        let start = position as usize;
        if bytes[start..start + 4] == magic {
            if let Ok(record) = record_at(bytes, header, position) {
                if record.lsn >= stopped_lsn && record.synced_lsn >= stopped_lsn {
                    later.proof = Some((position, record.lsn, record.synced_lsn));
                    return later;
                }
                later.valid_end = later.valid_end.max(position + align_up(record.encoded_len() as u64, RECORD_ALIGN));
            }
        }
        position += RECORD_ALIGN;
    }
    later
}

/// Overwrites `[start, end)` of a segment with zeros, durably.
fn zero_range(path: &Path, start: u64, end: u64) -> Result<(), JournalError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io_error(format!("open {}", path.display())))?;
    let end = align_up(end, BLOCK_SIZE as u64);
    let zeros = vec![0u8; (end - start) as usize];
    file.write_all_at(&zeros, start).map_err(io_error(format!("cut torn tail of {}", path.display())))?;
    file.sync_data().map_err(io_error(format!("sync {}", path.display())))
}
