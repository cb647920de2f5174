//! The coalesced-range frames (protocol 7; docs/coalescing.md). Kind 4: `u64` first LSN,
//! `u64` timestamp, then `journal::range`'s encoding (piece headers, then the write data).
//! Kind 5, the same compressed: `u64` first LSN, `u64` timestamp, `u64` length of the
//! encoding, then the encoding as one zstd frame.
//! Like the rest of `wire`: pure, and nothing from the network makes it panic.

use super::{ChunkCursor, Payload, WireError, KIND_COMPRESSED_RANGE, KIND_RANGE};
use crate::journal::range::{self as journal_range, Piece, RangeMeta};
use crate::journal::RecordKind;
use crate::protocol::compression;

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

/// The frame prefix of a compressed coalesced range: `block_len` bytes of zstd follow, which
/// decompress to the range's encoding (`encoded_len` bytes: piece headers, then data).
pub fn encode_compressed_range_header(first_lsn: u64, timestamp_us: u64, encoded_len: u64, block_len: usize) -> Vec<u8> {
    let body_len = 1 + 24 + block_len as u64;
    let mut prefix = Vec::with_capacity(29);
    prefix.extend_from_slice(&(body_len as u32).to_le_bytes());
    prefix.push(KIND_COMPRESSED_RANGE);
    prefix.extend_from_slice(&first_lsn.to_le_bytes());
    prefix.extend_from_slice(&timestamp_us.to_le_bytes());
    prefix.extend_from_slice(&encoded_len.to_le_bytes());
    prefix
}

fn bad(message: &str) -> WireError {
    WireError::BadBatch(format!("coalesced range: {message}"))
}

/// First LSN and timestamp, the start of both range frames.
fn range_prefix(body: &mut ChunkCursor) -> Result<(u64, u64), WireError> {
    let fixed = body.take_contiguous(16).ok_or_else(|| bad("truncated"))?;
    let first_lsn = u64::from_le_bytes(fixed[0..8].try_into().expect("8"));
    let timestamp_us = u64::from_le_bytes(fixed[8..16].try_into().expect("8"));
    if first_lsn == 0 {
        return Err(bad("LSN 0"));
    }
    Ok((first_lsn, timestamp_us))
}

/// A coalesced range: every length is checked against the frame before anything is taken.
pub(super) fn decode_range(mut body: ChunkCursor) -> Result<ReceivedRange, WireError> {
    let (first_lsn, timestamp_us) = range_prefix(&mut body)?;
    let total = body.remaining;
    if total > journal_range::MAX_RANGE_PAYLOAD {
        return Err(bad("larger than a range may be"));
    }
    let encoded = body.take(total).expect("exactly what remains");
    parse_range(first_lsn, timestamp_us, encoded)
}

/// A compressed coalesced range: its stated length is bounded before anything is
/// decompressed, and the decompressed encoding is checked as a raw range's.
pub(super) fn decode_compressed_range(mut body: ChunkCursor) -> Result<ReceivedRange, WireError> {
    let (first_lsn, timestamp_us) = range_prefix(&mut body)?;
    let length = body.take_contiguous(8).ok_or_else(|| bad("truncated"))?;
    let encoded_len = u64::from_le_bytes(length[..].try_into().expect("8"));
    if encoded_len > journal_range::MAX_RANGE_PAYLOAD as u64 {
        return Err(bad("larger than a range may be"));
    }
    let block = body.take_contiguous(body.remaining).ok_or_else(|| bad("truncated"))?;
    let encoded = compression::decompress(&block, encoded_len)?;
    parse_range(first_lsn, timestamp_us, Payload::from(encoded))
}

/// The range's encoding (piece headers, then the write data), checked against its length.
fn parse_range(first_lsn: u64, timestamp_us: u64, encoded: Payload) -> Result<ReceivedRange, WireError> {
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
