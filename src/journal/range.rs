//! The payload of a coalesced range record (`RecordKind::Range`, journal format 2), which is
//! also the body of a range frame on the wire (`protocol::wire`): one encoding, so the
//! applier journals what it received as it is and replays exactly that.
//!
//! ```text
//! u64 last LSN   u32 piece count   count × (u8 kind, u64 offset, u64 length)   write data
//! ```
//!
//! A piece is the newest version of some device bytes in the range: a write (its data
//! follows, in piece order, after every piece header), write-zeroes or a discard. Pure: no
//! I/O, and nothing from the network or a damaged file can make it panic.

use super::format::RecordKind;
use super::{BLOCK_SIZE, MAX_BATCH_BYTES, RECORD_HEADER_SIZE};
use crate::extent::Extent;

/// A range record must fit one group commit of the journal writer (its buffer is
/// `MAX_BATCH_BYTES` plus a block), so the whole range is durable, or not, in one write.
pub const MAX_RANGE_PAYLOAD: usize = MAX_BATCH_BYTES - BLOCK_SIZE - RECORD_HEADER_SIZE;
/// Pieces one range may carry at most.
pub const MAX_PIECES: usize = 1 << 16;
/// Bytes of the fixed part (last LSN, piece count).
pub const HEAD_BYTES: usize = 12;
/// Bytes of one piece header.
pub const PIECE_BYTES: usize = 17;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("coalesced range: {0}")]
pub struct RangeError(pub String);

/// One piece's header: what it does to which bytes (a write's data is elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub kind: RecordKind,
    pub extent: Extent,
}

/// A range's pieces and where it ends (it starts at the record's, or the frame's, LSN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeMeta {
    pub last_lsn: u64,
    pub pieces: Vec<Piece>,
}

impl RangeMeta {
    /// Bytes of the encoded piece headers and fixed part.
    pub fn encoded_len(&self) -> usize {
        meta_len(self.pieces.len())
    }

    /// Bytes of write data that follow the headers.
    pub fn data_len(&self) -> u64 {
        self.pieces.iter().filter(|p| p.kind == RecordKind::Write).map(|p| p.extent.length).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.last_lsn.to_le_bytes());
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for piece in &self.pieces {
            out.push(piece.kind.code());
            out.extend_from_slice(&piece.extent.offset.to_le_bytes());
            out.extend_from_slice(&piece.extent.length.to_le_bytes());
        }
        out
    }

    /// Decodes exactly the headers (`head`'s count says how many bytes they are) of a range
    /// that starts at `first_lsn`, checking everything that can be checked without the data.
    pub fn decode(first_lsn: u64, bytes: &[u8]) -> Result<RangeMeta, RangeError> {
        let (last_lsn, count) = decode_head(bytes)?;
        if last_lsn < first_lsn {
            return Err(RangeError(format!("ends at LSN {last_lsn}, before its first LSN {first_lsn}")));
        }
        if bytes.len() != meta_len(count) {
            return Err(RangeError(format!("{} bytes of headers for {count} pieces", bytes.len())));
        }
        let mut pieces = Vec::with_capacity(count);
        let mut data: u64 = 0;
        for raw in bytes[HEAD_BYTES..].chunks_exact(PIECE_BYTES) {
            let kind = RecordKind::from_code(raw[0]).filter(|k| matches!(k, RecordKind::Write | RecordKind::WriteZeroes | RecordKind::Discard));
            let kind = kind.ok_or_else(|| RangeError(format!("piece of kind {} (only writes, write-zeroes and discards)", raw[0])))?;
            let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
            let extent = Extent::new(u64_at(1), u64_at(9));
            if extent.length == 0 || extent.end().is_none() {
                return Err(RangeError(format!("piece at {} of {} bytes", extent.offset, extent.length)));
            }
            if kind == RecordKind::Write {
                data = data.saturating_add(extent.length);
            }
            pieces.push(Piece { kind, extent });
        }
        if data.saturating_add(bytes.len() as u64) > MAX_RANGE_PAYLOAD as u64 {
            return Err(RangeError(format!("{data} bytes of data, more than a range may carry ({MAX_RANGE_PAYLOAD})")));
        }
        Ok(RangeMeta { last_lsn, pieces })
    }
}

/// Bytes of the headers of a range of `count` pieces.
pub fn meta_len(count: usize) -> usize {
    HEAD_BYTES + count * PIECE_BYTES
}

/// The fixed part: last LSN and piece count (bounded by [`MAX_PIECES`]).
pub fn decode_head(bytes: &[u8]) -> Result<(u64, usize), RangeError> {
    if bytes.len() < HEAD_BYTES {
        return Err(RangeError(format!("{} bytes, fewer than its fixed part", bytes.len())));
    }
    let last_lsn = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    // No pieces is a range of records that changed nothing (zero-length writes).
    if count > MAX_PIECES {
        return Err(RangeError(format!("{count} pieces (at most {MAX_PIECES})")));
    }
    Ok((last_lsn, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let meta = RangeMeta {
            last_lsn: 20,
            pieces: vec![Piece { kind: RecordKind::Write, extent: Extent::new(4096, 8192) }, Piece { kind: RecordKind::Discard, extent: Extent::new(0, 512) }],
        };
        let bytes = meta.encode();
        assert_eq!(bytes.len(), meta.encoded_len());
        assert_eq!(RangeMeta::decode(10, &bytes).unwrap(), meta);
        assert_eq!(meta.data_len(), 8192);
        assert!(RangeMeta::decode(21, &bytes).is_err(), "ends before it starts");
        assert!(RangeMeta::decode(10, &bytes[..bytes.len() - 1]).is_err(), "short");
        let mut marker = bytes.clone();
        marker[HEAD_BYTES] = RecordKind::Marker.code();
        assert!(RangeMeta::decode(10, &marker).is_err(), "no markers inside a range");
        let mut huge = bytes.clone();
        huge[HEAD_BYTES + 9..HEAD_BYTES + 17].copy_from_slice(&(64u64 << 20).to_le_bytes());
        assert!(RangeMeta::decode(10, &huge).is_err(), "more data than a range carries");
        let mut overflow = bytes;
        overflow[HEAD_BYTES + 1..HEAD_BYTES + 9].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(RangeMeta::decode(10, &overflow).is_err(), "offset + length overflows");
        assert!(decode_head(&[0; 4]).is_err());
    }
}
