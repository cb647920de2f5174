//! The coalesced-range frame (kind 4, protocol 7; docs/coalescing.md): `u64` first LSN,
//! `u64` timestamp, then `journal::range`'s encoding (piece headers, then the write data).
//! Like the rest of `wire`: pure, and nothing from the network makes it panic.

use super::{ChunkCursor, Payload, WireError, KIND_RANGE};
use crate::journal::range::{self as journal_range, Piece, RangeMeta};
use crate::journal::RecordKind;

/// A coalesced range as the applier receives it: LSNs `first_lsn..=meta.last_lsn` as one
/// step (docs/coalescing.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRange {
    pub first_lsn: u64,
    pub timestamp_us: u64,
    pub meta: RangeMeta,
    /// The range's encoding as it arrived (headers, then data): what the journal keeps.
    pub encoded: Payload,
    /// Each write piece's data, in piece order (slices of `encoded`).
    pub data: Vec<Payload>,
}

impl ReceivedRange {
    pub fn last_lsn(&self) -> u64 {
        self.meta.last_lsn
    }

    /// The pieces with their data (empty for zeroes and discards).
    pub fn pieces(&self) -> impl Iterator<Item = (Piece, &[bytes::Bytes])> {
        let mut data = self.data.iter();
        self.meta.pieces.iter().map(move |piece| (*piece, if piece.kind == RecordKind::Write { data.next().map_or(&[][..], Payload::parts) } else { &[][..] }))
    }
}

/// Encodes the frame prefix of a coalesced range and its headers; the write data (`data_len`
/// bytes, the pieces' data in order) is sent right after it, untouched.
pub fn encode_range_header(first_lsn: u64, timestamp_us: u64, meta: &RangeMeta) -> Vec<u8> {
    let encoded = meta.encode();
    let body_len = 1 + 16 + encoded.len() as u64 + meta.data_len();
    let mut prefix = Vec::with_capacity(21 + encoded.len());
    prefix.extend_from_slice(&(body_len as u32).to_le_bytes());
    prefix.push(KIND_RANGE);
    prefix.extend_from_slice(&first_lsn.to_le_bytes());
    prefix.extend_from_slice(&timestamp_us.to_le_bytes());
    prefix.extend_from_slice(&encoded);
    prefix
}

/// A coalesced range: every length is checked against the frame before anything is taken.
pub(super) fn decode_range(mut body: ChunkCursor) -> Result<ReceivedRange, WireError> {
    let bad = |m: &str| WireError::BadBatch(format!("coalesced range: {m}"));
    let fixed = body.take_contiguous(16).ok_or_else(|| bad("truncated"))?;
    let first_lsn = u64::from_le_bytes(fixed[0..8].try_into().expect("8"));
    let timestamp_us = u64::from_le_bytes(fixed[8..16].try_into().expect("8"));
    if first_lsn == 0 {
        return Err(bad("LSN 0"));
    }
    let total = body.remaining;
    if total > journal_range::MAX_RANGE_PAYLOAD {
        return Err(bad("larger than a range may be"));
    }
    let encoded = body.take(total).expect("exactly what remains");
    let mut body = ChunkCursor::new(encoded.parts().to_vec());
    let head = body.take_contiguous(journal_range::HEAD_BYTES).ok_or_else(|| bad("truncated"))?;
    let (_, count) = journal_range::decode_head(&head)?;
    let rest = body.take_contiguous(journal_range::meta_len(count) - journal_range::HEAD_BYTES).ok_or_else(|| bad("piece headers run past the frame"))?;
    let meta = RangeMeta::decode(first_lsn, &[&head[..], &rest[..]].concat())?;
    let mut data = Vec::new();
    for piece in meta.pieces.iter().filter(|p| p.kind == RecordKind::Write) {
        data.push(body.take(piece.extent.length as usize).ok_or_else(|| bad("write data runs past the frame"))?);
    }
    if body.remaining != 0 {
        return Err(bad("bytes after the last piece's data"));
    }
    Ok(ReceivedRange { first_lsn, timestamp_us, meta, encoded, data })
}
