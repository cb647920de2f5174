//! On-disk format of journal segments, version 2 (see `docs/journal-format.md`; version 1,
//! which lacks the coalesced-range kinds, is read as well).
//!
//! Pure encoding and decoding: no I/O here, so every rule can be tested on byte slices.

use crc32c::crc32c_append;

/// Alignment of every journal write (O_DIRECT) and size of the segment header block.
pub const BLOCK_SIZE: usize = 4096;
/// The segment header occupies the whole first block; records start after it.
pub const SEGMENT_HEADER_SIZE: u64 = BLOCK_SIZE as u64;
pub const SEGMENT_MAGIC: [u8; 8] = *b"UBMJSEG\0";
pub const RECORD_MAGIC: u32 = 0x524a_4d55; // "UMJR" little-endian
/// Written in every segment header and record. Version 2 added the record kinds `Range` and
/// `Covered` (coalesced ranges, only in an applier's journal); a version-1 binary refuses a
/// version-2 segment by its header rather than mistaking a range record for a torn tail.
pub const FORMAT_VERSION: u8 = 2;
/// The oldest version this build reads.
pub const OLDEST_FORMAT_VERSION: u8 = 1;

fn known_version(version: u8) -> bool {
    (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version)
}
pub const RECORD_HEADER_SIZE: usize = 64;
/// Bytes of the segment header covered by its CRC (the CRC follows them).
const SEGMENT_HEADER_CRC_OFFSET: usize = 56;

/// What a record does to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    /// `length` bytes of payload written at `offset`.
    Write,
    /// `length` bytes at `offset` become zero; no payload.
    WriteZeroes,
    /// `length` bytes at `offset` are discarded; this project guarantees they read as zero.
    Discard,
    /// A named consistency point; the payload is the name. Changes no device byte.
    Marker,
    /// A coalesced range (version 2, applier journals only): this LSN through the range's
    /// last, as one step; the payload is `journal::range`'s encoding of the newest version of
    /// every block the range's records wrote. `offset` and `length` are 0.
    Range,
    /// An LSN inside the range whose `Range` record comes before it: changes nothing itself
    /// (it keeps LSNs strictly +1). No payload, `offset` and `length` 0.
    Covered,
}

impl RecordKind {
    pub fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::WriteZeroes => 2,
            RecordKind::Discard => 3,
            RecordKind::Marker => 4,
            RecordKind::Range => 5,
            RecordKind::Covered => 6,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => RecordKind::Write,
            2 => RecordKind::WriteZeroes,
            3 => RecordKind::Discard,
            4 => RecordKind::Marker,
            5 => RecordKind::Range,
            6 => RecordKind::Covered,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Write => "write",
            RecordKind::WriteZeroes => "write-zeroes",
            RecordKind::Discard => "discard",
            RecordKind::Marker => "marker",
            RecordKind::Range => "range",
            RecordKind::Covered => "covered",
        }
    }

    /// Kinds a volume journals and a sender streams one by one (not the applier's range kinds).
    pub fn is_source_kind(self) -> bool {
        !matches!(self, RecordKind::Range | RecordKind::Covered)
    }
}

/// Record flag: the write was issued with FUA (forced unit access).
pub const FLAG_FUA: u16 = 1;

/// The fixed-size header in front of every record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u16,
    pub lsn: u64,
    pub offset: u64,
    /// Device bytes the record covers (write: the payload length; marker: 0).
    pub length: u64,
    /// Bytes of payload that follow the header.
    pub payload_len: u32,
    /// The journal was durable through this LSN when the record was written. A valid record
    /// whose `synced_lsn` is at or past a damaged record's LSN proves that the damaged record
    /// had been durable: that is corruption, not a torn tail.
    pub synced_lsn: u64,
    /// Wall-clock time of the append, microseconds since the Unix epoch (for lag in seconds).
    pub timestamp_us: u64,
}

impl RecordHeader {
    /// The device bytes the record covers.
    pub fn extent(&self) -> crate::extent::Extent {
        crate::extent::Extent::new(self.offset, self.length)
    }

    /// Size of the record on disk.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_SIZE + self.payload_len as usize
    }

    /// Writes header and payload into `out` (exactly `encoded_len()` bytes), CRC included.
    pub fn encode(&self, payload: &[u8], salt: u64, out: &mut [u8]) {
        debug_assert_eq!(out.len(), self.encoded_len());
        out[RECORD_HEADER_SIZE..].copy_from_slice(payload);
        self.encode_header(&[payload], salt, &mut out[..RECORD_HEADER_SIZE]);
    }

    /// Writes only the header (`RECORD_HEADER_SIZE` bytes), its CRC computed over `payload`,
    /// for a writer that writes the payload from where it is.
    pub fn encode_header(&self, payload: &[impl AsRef<[u8]>], salt: u64, header: &mut [u8]) {
        debug_assert_eq!(header.len(), RECORD_HEADER_SIZE);
        debug_assert_eq!(payload.iter().map(|p| p.as_ref().len()).sum::<usize>(), self.payload_len as usize);
        header.fill(0);
        header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        header[4] = FORMAT_VERSION;
        header[5] = self.kind.code();
        header[6..8].copy_from_slice(&self.flags.to_le_bytes());
        header[8..16].copy_from_slice(&self.lsn.to_le_bytes());
        header[16..24].copy_from_slice(&self.offset.to_le_bytes());
        header[24..32].copy_from_slice(&self.length.to_le_bytes());
        header[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        // 36..40: CRC, computed with these bytes zero.
        header[40..48].copy_from_slice(&self.synced_lsn.to_le_bytes());
        header[48..56].copy_from_slice(&self.timestamp_us.to_le_bytes());
        let crc = record_crc(salt, header, payload);
        header[36..40].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Why bytes at a position are not a valid record. Recovery decides whether that is the end
/// of the journal or corruption; these only say what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordProblem {
    /// No record magic: never-written space (zeros) or the end of what was written.
    NoMagic,
    UnsupportedVersion(u8),
    UnknownKind(u8),
    /// The header claims more bytes than the segment has left.
    TooLong {
        payload_len: u32,
    },
    /// Header fields that contradict each other (e.g. a write whose length differs from its payload).
    Inconsistent(&'static str),
    /// The CRC does not match: torn write, flipped bit, or a stale record from an earlier
    /// use of a recycled segment (its CRC was salted differently).
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
}

impl std::fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordProblem::NoMagic => write!(f, "no record magic"),
            RecordProblem::UnsupportedVersion(v) => write!(f, "unsupported record version {v}"),
            RecordProblem::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            RecordProblem::TooLong { payload_len } => {
                write!(f, "payload length {payload_len} runs past the end of the segment")
            }
            RecordProblem::Inconsistent(what) => write!(f, "inconsistent header: {what}"),
            RecordProblem::CrcMismatch { stored, computed } => {
                write!(f, "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
        }
    }
}

fn record_crc(salt: u64, header: &[u8], payload: &[impl AsRef<[u8]>]) -> u32 {
    let mut zeroed = [0u8; RECORD_HEADER_SIZE];
    zeroed.copy_from_slice(header);
    zeroed[36..40].fill(0);
    let seed = crc32c_append(0, &salt.to_le_bytes());
    payload.iter().fold(crc32c_append(seed, &zeroed), |crc, part| crc32c_append(crc, part.as_ref()))
}

/// Parses a header without checking the CRC (that needs the payload). `room` is how many bytes
/// the segment has from this header's start to its end.
pub fn decode_header(bytes: &[u8; RECORD_HEADER_SIZE], room: u64) -> Result<RecordHeader, RecordProblem> {
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != RECORD_MAGIC {
        return Err(RecordProblem::NoMagic);
    }
    if !known_version(bytes[4]) {
        return Err(RecordProblem::UnsupportedVersion(bytes[4]));
    }
    let kind = RecordKind::from_code(bytes[5]).ok_or(RecordProblem::UnknownKind(bytes[5]))?;
    let header = RecordHeader {
        kind,
        flags: u16::from_le_bytes([bytes[6], bytes[7]]),
        lsn: u64_at(8),
        offset: u64_at(16),
        length: u64_at(24),
        payload_len: u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes")),
        synced_lsn: u64_at(40),
        timestamp_us: u64_at(48),
    };
    if header.encoded_len() as u64 > room {
        return Err(RecordProblem::TooLong { payload_len: header.payload_len });
    }
    match kind {
        RecordKind::Write if header.length != header.payload_len as u64 => return Err(RecordProblem::Inconsistent("write length differs from payload length")),
        RecordKind::WriteZeroes | RecordKind::Discard if header.payload_len != 0 => {
            return Err(RecordProblem::Inconsistent("zero/discard record carries a payload"))
        }
        RecordKind::Marker if header.length != 0 => return Err(RecordProblem::Inconsistent("marker covers device bytes")),
        RecordKind::Range | RecordKind::Covered if bytes[4] < 2 => return Err(RecordProblem::Inconsistent("range kinds need record version 2")),
        RecordKind::Range if header.offset != 0 || header.length != 0 => return Err(RecordProblem::Inconsistent("a range record covers no extent of its own")),
        RecordKind::Covered if header.offset != 0 || header.length != 0 || header.payload_len != 0 => {
            return Err(RecordProblem::Inconsistent("a covered record has no extent or payload"))
        }
        _ => {}
    }
    if header.offset.checked_add(header.length).is_none() {
        return Err(RecordProblem::Inconsistent("offset + length overflows"));
    }
    Ok(header)
}

/// Checks the CRC of a decoded header and its payload.
pub fn verify_record(header_bytes: &[u8; RECORD_HEADER_SIZE], payload: &[u8], salt: u64) -> Result<(), RecordProblem> {
    let stored = u32::from_le_bytes(header_bytes[36..40].try_into().expect("4 bytes"));
    let computed = record_crc(salt, header_bytes, &[payload]);
    if stored != computed {
        return Err(RecordProblem::CrcMismatch { stored, computed });
    }
    Ok(())
}

/// The first block of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// LSN of the first record this incarnation of the segment holds (or will hold).
    pub first_lsn: u64,
    /// Random per incarnation: seeds every record CRC so records left over from an earlier
    /// incarnation of a recycled file never verify.
    pub salt: u64,
    pub segment_size: u64,
    /// The journal this segment belongs to (the volume or replica UUID).
    pub journal_id: [u8; 16],
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut block = [0u8; BLOCK_SIZE];
        block[0..8].copy_from_slice(&SEGMENT_MAGIC);
        block[8] = FORMAT_VERSION;
        block[16..24].copy_from_slice(&self.first_lsn.to_le_bytes());
        block[24..32].copy_from_slice(&self.salt.to_le_bytes());
        block[32..40].copy_from_slice(&self.segment_size.to_le_bytes());
        block[40..56].copy_from_slice(&self.journal_id);
        let crc = crc32c::crc32c(&block[..SEGMENT_HEADER_CRC_OFFSET]);
        block[56..60].copy_from_slice(&crc.to_le_bytes());
        block
    }

    pub fn decode(block: &[u8]) -> Result<Self, SegmentHeaderProblem> {
        if block.len() < SEGMENT_HEADER_CRC_OFFSET + 4 {
            return Err(SegmentHeaderProblem::Short);
        }
        if block[0..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderProblem::NoMagic);
        }
        let stored = u32::from_le_bytes(block[56..60].try_into().expect("4 bytes"));
        if stored != crc32c::crc32c(&block[..SEGMENT_HEADER_CRC_OFFSET]) {
            return Err(SegmentHeaderProblem::CrcMismatch);
        }
        if !known_version(block[8]) {
            return Err(SegmentHeaderProblem::UnsupportedVersion(block[8]));
        }
        let u64_at = |i: usize| u64::from_le_bytes(block[i..i + 8].try_into().expect("8 bytes"));
        Ok(SegmentHeader { first_lsn: u64_at(16), salt: u64_at(24), segment_size: u64_at(32), journal_id: block[40..56].try_into().expect("16 bytes") })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderProblem {
    #[error("file shorter than a segment header")]
    Short,
    #[error("no segment magic")]
    NoMagic,
    #[error("segment header CRC mismatch")]
    CrcMismatch,
    #[error("unsupported segment format version {0}")]
    UnsupportedVersion(u8),
}

/// File name of the segment whose first record has `first_lsn`: sorting names sorts segments.
/// Suffix of a segment file still being created (renamed away once its header is durable).
pub const CREATING_SUFFIX: &str = ".creating";

pub fn segment_file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.seg")
}

/// Whether `name` is a spare segment file's (`free-*.seg`: made ahead of need, or a
/// trimmed segment kept for reuse).
pub fn is_spare_file_name(name: &str) -> bool {
    name.starts_with("free-") && name.ends_with(".seg")
}

/// Inverse of [`segment_file_name`]; `None` for any other file.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: RecordKind, payload: &[u8]) -> RecordHeader {
        RecordHeader {
            kind,
            flags: 0,
            lsn: 42,
            offset: 8192,
            length: if kind == RecordKind::Write { payload.len() as u64 } else { 0 },
            payload_len: payload.len() as u32,
            synced_lsn: 40,
            timestamp_us: 1,
        }
    }

    #[test]
    fn record_round_trip_and_salt() {
        let payload = b"hello journal";
        let header = sample(RecordKind::Write, payload);
        let mut buf = vec![0u8; header.encoded_len()];
        header.encode(payload, 7, &mut buf);
        let head: [u8; RECORD_HEADER_SIZE] = buf[..RECORD_HEADER_SIZE].try_into().unwrap();
        assert_eq!(decode_header(&head, 1 << 20).unwrap(), header);
        verify_record(&head, payload, 7).unwrap();
        // The same bytes under another segment incarnation's salt are stale.
        assert!(matches!(verify_record(&head, payload, 8), Err(RecordProblem::CrcMismatch { .. })));
        // Any flipped payload bit is caught.
        let mut bad = payload.to_vec();
        bad[3] ^= 0x10;
        assert!(verify_record(&head, &bad, 7).is_err());
    }

    #[test]
    fn header_rejects_nonsense() {
        let zeros = [0u8; RECORD_HEADER_SIZE];
        assert_eq!(decode_header(&zeros, 4096), Err(RecordProblem::NoMagic));
        let header = sample(RecordKind::Write, &[1; 100]);
        let mut buf = vec![0u8; header.encoded_len()];
        header.encode(&[1; 100], 1, &mut buf);
        let head: [u8; RECORD_HEADER_SIZE] = buf[..RECORD_HEADER_SIZE].try_into().unwrap();
        assert!(matches!(decode_header(&head, 100), Err(RecordProblem::TooLong { .. })));
        let mut kind = head;
        kind[5] = 9;
        assert_eq!(decode_header(&kind, 4096), Err(RecordProblem::UnknownKind(9)));
    }

    #[test]
    fn segment_header_round_trip() {
        let header = SegmentHeader { first_lsn: 5, salt: 99, segment_size: 1 << 20, journal_id: [3; 16] };
        let block = header.encode();
        assert_eq!(SegmentHeader::decode(&block).unwrap(), header);
        let mut bad = block;
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(SegmentHeaderProblem::CrcMismatch));
        assert_eq!(parse_segment_file_name(&segment_file_name(77)), Some(77));
        assert_eq!(parse_segment_file_name("free-1.seg"), None);
    }
}
