//! Replication wire format (see `docs/replication-protocol.md`). Pure encoding and
//! decoding: no sockets here, and nothing from the network can make it panic.
//!
//! Every frame: `u32` body length (little-endian), then the body. The body's first byte is the
//! frame kind: `1` control message (bincode 2 of [`Control`]), `2` record batch: a `u32`
//! header length, the bincode 2 [`BatchHeader`], then the records' payload bytes as they are;
//! `3` the same batch with the payloads as one zstd frame (`compression`); `4` a coalesced
//! range (version 7): `u64` first LSN, `u64` timestamp, then `journal::range`'s encoding.

use serde::{Deserialize, Serialize};

use super::compression::{self, CompressionError};
use crate::generation::{Generation, History};

use crate::extent::Extent;
use crate::journal::{RecordHeader, RecordKind};

/// Version 7: coalesced ranges (frame kind 4). Version 6: compressed record batches (frame
/// kind 3) and the codecs in `Welcome`.
pub const PROTOCOL_VERSION: u32 = 7;
/// Chunks whose hashes travel in one `VerifyHashes` at most.
pub const VERIFY_HASH_BATCH: usize = 64;
/// Initial synchronisation compares and copies the device in chunks of this size.
pub const SYNC_CHUNK: u64 = 1 << 20;
/// Chunks whose hashes travel in one `SyncHashes`.
pub const SYNC_HASH_BATCH: usize = 64;
pub use super::MAX_FRAME;
/// What one record's header costs on the wire at most (bincode varints; for the window).
pub const RECORD_HEADER_BYTES: u64 = 64;
const KIND_CONTROL: u8 = 1;
const KIND_RECORDS: u8 = 2;
const KIND_COMPRESSED_RECORDS: u8 = 3;
/// A coalesced range (`wire_range.rs`).
const KIND_RANGE: u8 = 4;
/// A coalesced range compressed as one zstd frame (protocol 7).
const KIND_COMPRESSED_RANGE: u8 = 5;

/// Control messages decode within 2 MiB: the largest is a `SyncChunk` (one 1 MiB chunk).
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_limit::<{ 2 << 20 }>()
}

/// Who the sender is and what it sends (first message on a new connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub volume_uuid: [u8; 16],
    pub volume_name: String,
    pub size: u64,
    pub generation: [u8; 16],
    /// Oldest LSN the sender's journal still holds.
    pub first_lsn: u64,
    /// Newest LSN the sender has journaled.
    pub last_lsn: u64,
    /// The sender's generation history, oldest first (ends with `generation`).
    pub history: Vec<WireGeneration>,
}

/// One generation of a history on the wire (see `crate::generation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGeneration {
    pub id: [u8; 16],
    pub parent: Option<[u8; 16]>,
    pub branch_lsn: u64,
    pub created_us: u64,
}

impl From<&Generation> for WireGeneration {
    fn from(g: &Generation) -> WireGeneration {
        WireGeneration { id: *g.id.as_bytes(), parent: g.parent.map(|p| *p.as_bytes()), branch_lsn: g.branch_lsn, created_us: g.created_us }
    }
}

/// The wire form of a history.
pub fn wire_history(history: &History) -> Vec<WireGeneration> {
    history.generations().iter().map(WireGeneration::from).collect()
}

/// A history received from the network, checked (an empty or broken list is refused).
pub fn history_from_wire(list: &[WireGeneration]) -> Result<History, String> {
    let generations: Vec<Generation> = list
        .iter()
        .map(|g| Generation {
            id: uuid::Uuid::from_bytes(g.id),
            parent: g.parent.map(uuid::Uuid::from_bytes),
            branch_lsn: g.branch_lsn,
            created_us: g.created_us,
        })
        .collect();
    History::try_from(generations)
}

/// A refusal because the replica was promoted: the promoted volume's history and how far it
/// has written, so the sender can say whether it is stale or split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotedReplica {
    pub name: String,
    pub to: String,
    pub generation: String,
    pub branch_lsn: u64,
    pub last_lsn: u64,
    /// Bytes written since the branch, at most (absent when not known).
    pub written_bytes: Option<u64>,
    pub history: Vec<WireGeneration>,
}

/// Why an applier refused a sender (also sent back so both sides log the same reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Sent by appliers of protocol 5 and older, which name only the sender's version; newer
    /// ones refuse with [`protocol_mismatch`] (text every version prints as it is).
    #[error("the applier does not speak replication protocol {0}: it is an older release (protocol {older} or earlier); upgrade both hosts to the same release", older = PROTOCOL_VERSION - 1)]
    Protocol(u32),
    #[error("replica {name} belongs to volume {expected}, not {got}")]
    WrongVolume { name: String, expected: String, got: String },
    #[error("replica {name} is {replica} bytes but the volume is {volume} bytes")]
    WrongSize { name: String, replica: u64, volume: u64 },
    #[error("replica {name} follows generation {replica}, the volume is at generation {volume}, and the two histories share no generation")]
    WrongGeneration { name: String, replica: String, volume: String },
    /// The replica was promoted to a volume: it takes no records (boxed: the other refusals
    /// are small).
    #[error("replica {} was promoted to the volume in {} on the applier's host (generation {}, branched at LSN {}; it has written through LSN {})", .0.name, .0.to, .0.generation, .0.branch_lsn, .0.last_lsn)]
    Promoted(Box<PromotedReplica>),
    /// The replica follows a newer generation than the sender's: the sender is stale.
    #[error("replica {name} follows generation {replica}, newer than this volume's {volume}: this volume is stale ({replica_after} records after LSN {common_lsn} on the replica's side); demote it (ublk-mirror volume demote) and mirror the newer primary to it")]
    Stale { name: String, replica: String, volume: String, common_lsn: u64, replica_after: u64 },
    /// Both wrote after their common point.
    #[error("split brain with replica {name}: after LSN {common_lsn} the replica holds {replica_after} records of generation {replica} and this volume wrote {volume_after} of generation {volume}; nothing was changed; on the side whose changes are to go: ublk-mirror volume demote --discard-local-changes")]
    Diverged { name: String, replica: String, volume: String, common_lsn: u64, replica_after: u64, volume_after: u64 },
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    Hello(Hello),
    /// The applier accepts; the sender resumes after `received_lsn`.
    /// `needs_sync`: the replica must be synchronised (new, or a sync was interrupted)
    /// before journal records are accepted.
    /// `consistent_lsn`: after a sync, the replica is consistent once it applied this LSN.
    Welcome {
        received_lsn: u64,
        applied_lsn: u64,
        consistent: bool,
        needs_sync: bool,
        consistent_lsn: Option<u64>,
        /// A demoted volume's replica (a failback): the regions its image may hold that
        /// the source's history lacks (an encoded dirty map); the source resyncs them with
        /// what it wrote since the branch. Absent otherwise.
        #[serde(with = "serde_bytes")]
        local_changes: Option<Vec<u8>>,
        /// The codecs this applier decodes in record batches (`compression::CODECS`);
        /// names unknown to the sender are ignored.
        codecs: Vec<String>,
    },
    Refused(Refusal),
    /// A planned swap (`mirror switchover`), on a connection of its own, first message: the
    /// source has stopped writes and the replica has applied everything through
    /// `hello.last_lsn`; the applier promotes the replica at that LSN into a volume in `to`
    /// (empty: its default place) that mirrors back to `applier_address` (the source's own
    /// applier, whose fingerprint is `applier_fingerprint`) under the name `mirror`.
    Switchover {
        hello: Hello,
        to: String,
        mirror: String,
        applier_address: String,
        applier_fingerprint: String,
    },
    /// The swap is done: the new primary's volume directory, generation and fingerprint.
    SwitchedOver {
        to: String,
        generation: [u8; 16],
        branch_lsn: u64,
        fingerprint: String,
        history: Vec<WireGeneration>,
    },
    /// `volume restore`, first message of a connection of its own: the volume's backing store
    /// died; it asks for the replica's contents. The applier answers `RestoreReady` with the
    /// LSN the image holds, then answers each `SyncHashes` (of the volume's new backing store)
    /// with `SyncDiffer` followed by one `SyncChunk` per chunk that differs.
    RestoreStart {
        hello: Hello,
    },
    RestoreReady {
        lsn: u64,
    },
    /// Checkpoints: `received` durable in the applier's journal, `applied` durable in the replica.
    Ack {
        received_lsn: u64,
        applied_lsn: u64,
    },
    /// Initial synchronisation begins: the replica is inconsistent from now until the journal
    /// replay after `SyncDone` passes the LSN it names. `base_lsn`: journal records after it
    /// will be streamed once the chunks are copied.
    SyncStart {
        base_lsn: u64,
    },
    /// BLAKE3 hashes of the source's chunks `first_chunk..` (chunk = `SYNC_CHUNK` bytes).
    SyncHashes {
        first_chunk: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// The applier's answer: which of those chunks differ on the replica.
    SyncDiffer {
        first_chunk: u64,
        differ: Vec<u64>,
    },
    /// One chunk's bytes (`zero`: the chunk is all zeros and `data` is empty).
    SyncChunk {
        chunk: u64,
        zero: bool,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Every chunk is copied. The applier makes the image durable and continues its journal
    /// at `base_lsn + 1`; the replica is consistent once `applied` reaches `consistent_lsn`.
    SyncDone {
        base_lsn: u64,
        consistent_lsn: u64,
    },
    /// A resync of a consistent replica begins (version 3): the replica keeps its image as it
    /// is and stages what follows (region contents and the records after `base_lsn`, which
    /// follow in the stream) until `ResyncDone`. `regions` regions of `region_bytes` will be
    /// compared, `bytes` in all (for the applier's space check).
    ResyncStart {
        base_lsn: u64,
        region_bytes: u64,
        regions: u64,
        bytes: u64,
    },
    /// Hashes of regions as they stand at this point of the stream (after record `at_lsn`).
    ResyncHashes {
        at_lsn: u64,
        regions: Vec<u64>,
        hashes: Vec<[u8; 32]>,
    },
    /// The applier's answer: which of those regions differ from its view at the same point.
    ResyncDiffer {
        regions: Vec<u64>,
    },
    /// A region's bytes as they stand at this point of the stream (after record `at_lsn`);
    /// `zero`: all zeros, `data` empty.
    ResyncChunk {
        at_lsn: u64,
        region: u64,
        zero: bool,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The applier stored `chunks` chunks of this resync so far (closes the sender's window).
    ResyncStored {
        chunks: u64,
    },
    /// Every region is sent: the replica commits its stage, and its image equals the source
    /// after record `at_lsn`.
    ResyncDone {
        at_lsn: u64,
    },
    /// The applier committed the resync: its image is the source after record `at_lsn`.
    ResyncCommitted {
        at_lsn: u64,
    },
    /// The applier cannot resync now (e.g. no room to stage); the replica is unchanged.
    ResyncRefused {
        reason: String,
    },
    /// Online verify (`mirror verify`, version 5): BLAKE3 hashes of the source's chunks
    /// `chunks` (`chunk_bytes` each, the last one of the device may be shorter) as they stand
    /// after record `at_lsn`, placed in the stream right after that record. The applier hashes
    /// its image when it has applied exactly `at_lsn` and answers `VerifyResult`.
    VerifyHashes {
        at_lsn: u64,
        chunk_bytes: u64,
        chunks: Vec<u64>,
        hashes: Vec<[u8; 32]>,
    },
    /// The chunks of that `VerifyHashes` that differ. `skipped`: why the replica could not
    /// compare them now (a resync is staged, the replica is not consistent); `differ` is
    /// then empty.
    VerifyResult {
        at_lsn: u64,
        differ: Vec<u64>,
        skipped: Option<String>,
    },
}

/// One record's header inside a batch (its payload follows the batch header, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub lsn: u64,
    pub kind: u8,
    pub flags: u16,
    pub offset: u64,
    pub length: u64,
    pub payload_len: u32,
    pub timestamp_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    pub records: Vec<WireRecord>,
}

/// A record as the applier receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRecord {
    pub lsn: u64,
    pub kind: RecordKind,
    pub flags: u16,
    /// The device bytes the record covers (its end is known not to overflow).
    pub extent: Extent,
    pub timestamp_us: u64,
    /// Slices of the chunks QUIC delivered the frame in (no copy).
    pub payload: Payload,
}

/// A record's payload as it arrived: the pieces of the received chunks it spans, in order.
/// Nothing gathers them into one buffer: the replica's journal copies them into its own
/// buffer and the image write takes them as they are (a gathering copy of every received
/// byte was 5-10% of the applier's time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    /// Never empty pieces, so an empty payload has none.
    parts: Vec<bytes::Bytes>,
}

impl Payload {
    pub fn len(&self) -> usize {
        self.parts.iter().map(bytes::Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    pub fn parts(&self) -> &[bytes::Bytes] {
        &self.parts
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

impl From<bytes::Bytes> for Payload {
    fn from(bytes: bytes::Bytes) -> Payload {
        Payload { parts: if bytes.is_empty() { Vec::new() } else { vec![bytes] } }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Payload {
        bytes::Bytes::from(bytes).into()
    }
}

/// Reads a frame body out of the chunks it arrived in, in order.
struct ChunkCursor {
    chunks: std::collections::VecDeque<bytes::Bytes>,
    remaining: usize,
}

impl ChunkCursor {
    fn new(chunks: Vec<bytes::Bytes>) -> ChunkCursor {
        let chunks: std::collections::VecDeque<_> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let remaining = chunks.iter().map(|c| c.len()).sum();
        ChunkCursor { chunks, remaining }
    }

    /// The next `n` bytes as slices of the chunks, or `None` if fewer remain.
    fn take(&mut self, n: usize) -> Option<Payload> {
        if n > self.remaining {
            return None;
        }
        let mut parts = Vec::with_capacity(1);
        let mut wanted = n;
        while wanted > 0 {
            let chunk = self.chunks.front_mut()?;
            if chunk.len() > wanted {
                parts.push(chunk.split_to(wanted));
                wanted = 0;
            } else {
                wanted -= chunk.len();
                parts.push(self.chunks.pop_front()?);
            }
        }
        self.remaining -= n;
        Some(Payload { parts })
    }

    /// The next `n` bytes in one buffer (copied only when they span chunks).
    fn take_contiguous(&mut self, n: usize) -> Option<bytes::Bytes> {
        let payload = self.take(n)?;
        Some(match <[bytes::Bytes; 1]>::try_from(payload.parts) {
            Ok([single]) => single,
            Err(parts) => parts.concat().into(),
        })
    }

    fn rest(&mut self) -> bytes::Bytes {
        let n = self.remaining;
        self.take_contiguous(n).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Control(Control),
    Records(Vec<ReceivedRecord>),
    Range(ReceivedRange),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(u32),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("undecodable {what}: {message}")]
    Decode { what: &'static str, message: String },
    #[error("record batch: {0}")]
    BadBatch(String),
    #[error("record batch: {0}")]
    Compressed(#[from] CompressionError),
    #[error(transparent)]
    Range(#[from] crate::journal::range::RangeError),
}

/// The refusal of a sender speaking another protocol version, naming both. Sent as
/// `Refusal::Other` on purpose: that variant has kept its place since protocol 1, so a sender
/// of any version decodes it and prints the text (an older sender would print a
/// `Refusal::Protocol` with its own version as the applier's).
pub fn protocol_mismatch(sender: u32) -> Refusal {
    Refusal::Other(format!(
        "the source speaks replication protocol {sender} and this applier protocol {PROTOCOL_VERSION}: the versions do not interoperate; upgrade both hosts to the same release"
    ))
}

/// Checks a `Hello`'s protocol version (before the applier touches any replica).
pub fn check_protocol(hello: &Hello) -> Result<(), Refusal> {
    if hello.protocol == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(protocol_mismatch(hello.protocol))
    }
}

/// Encodes a control message as a whole frame (length prefix included).
pub fn encode_control(message: &Control) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(message, config()).expect("control messages encode");
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&(body.len() as u32 + 1).to_le_bytes());
    frame.push(KIND_CONTROL);
    frame.extend_from_slice(&body);
    frame
}

/// Encodes the frame prefix and header for a batch of journal records; the caller sends the
/// payloads right after it, in order, untouched (no copy into the frame).
pub fn encode_batch_header(records: &[(RecordHeader, &[u8])]) -> Vec<u8> {
    let payload_total: usize = records.iter().map(|(_, p)| p.len()).sum();
    batch_prefix(KIND_RECORDS, records, payload_total)
}

/// Encodes the frame prefix and header for a batch whose payloads travel as `block_len`
/// bytes of one zstd frame (sent right after it); the header keeps every record's
/// uncompressed `payload_len`, which bounds the decompression.
pub fn encode_compressed_batch_header(records: &[(RecordHeader, &[u8])], block_len: usize) -> Vec<u8> {
    batch_prefix(KIND_COMPRESSED_RECORDS, records, block_len)
}

fn batch_prefix(kind: u8, records: &[(RecordHeader, &[u8])], payload_bytes: usize) -> Vec<u8> {
    let header = BatchHeader {
        records: records
            .iter()
            .map(|(h, payload)| WireRecord {
                lsn: h.lsn,
                kind: h.kind.code(),
                flags: h.flags,
                offset: h.offset,
                length: h.length,
                payload_len: payload.len() as u32,
                timestamp_us: h.timestamp_us,
            })
            .collect(),
    };
    let encoded = bincode::serde::encode_to_vec(&header, bincode::config::standard().with_little_endian()).expect("batch headers encode");
    let body_len = 1 + 4 + encoded.len() + payload_bytes;
    let mut prefix = Vec::with_capacity(9 + encoded.len());
    prefix.extend_from_slice(&(body_len as u32).to_le_bytes());
    prefix.push(kind);
    prefix.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&encoded);
    prefix
}

/// Checks a frame's length prefix before its body is read.
pub fn check_length(prefix: [u8; 4]) -> Result<usize, WireError> {
    let length = u32::from_le_bytes(prefix);
    if length == 0 {
        return Err(WireError::Empty);
    }
    if length > MAX_FRAME {
        return Err(WireError::TooLarge(length));
    }
    Ok(length as usize)
}

/// Decodes a frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, WireError> {
    decode_frame(vec![bytes::Bytes::copy_from_slice(body)])
}

/// Decodes a frame body handed over in the chunks it arrived in: record payloads stay slices
/// of them.
pub fn decode_frame(chunks: Vec<bytes::Bytes>) -> Result<Frame, WireError> {
    let mut body = ChunkCursor::new(chunks);
    let kind = body.take_contiguous(1).ok_or(WireError::Empty)?[0];
    match kind {
        KIND_CONTROL => {
            let rest = body.rest();
            let (message, used) = bincode::serde::decode_from_slice::<Control, _>(&rest, config())
                .map_err(|e| WireError::Decode { what: "control message", message: e.to_string() })?;
            if used != rest.len() {
                return Err(WireError::Decode { what: "control message", message: format!("{} trailing bytes", rest.len() - used) });
            }
            Ok(Frame::Control(message))
        }
        KIND_RECORDS => decode_batch(body, false).map(Frame::Records),
        KIND_COMPRESSED_RECORDS => decode_batch(body, true).map(Frame::Records),
        KIND_RANGE => range::decode_range(body).map(Frame::Range),
        KIND_COMPRESSED_RANGE => range::decode_compressed_range(body).map(Frame::Range),
        other => Err(WireError::UnknownKind(other)),
    }
}

/// A batch's records; `compressed`: the payloads follow as one zstd frame, decompressed to
/// exactly the sum of the header's `payload_len`s.
fn decode_batch(mut body: ChunkCursor, compressed: bool) -> Result<Vec<ReceivedRecord>, WireError> {
    let bad = |m: String| WireError::BadBatch(m);
    let length_bytes = body.take_contiguous(4).ok_or_else(|| bad("truncated header length".into()))?;
    let header_len = u32::from_le_bytes(length_bytes[..].try_into().expect("4")) as usize;
    let header_bytes = body.take_contiguous(header_len).ok_or_else(|| bad(format!("header of {header_len} bytes runs past the frame")))?;
    let (header, used) =
        bincode::serde::decode_from_slice::<BatchHeader, _>(&header_bytes, bincode::config::standard().with_little_endian().with_limit::<{ 8 << 20 }>())
            .map_err(|e| WireError::Decode { what: "batch header", message: e.to_string() })?;
    if used != header_len {
        return Err(bad("batch header has trailing bytes".into()));
    }
    if compressed {
        let expected: u64 = header.records.iter().map(|r| r.payload_len as u64).sum();
        let block = body.rest();
        body = ChunkCursor::new(vec![compression::decompress(&block, expected)?.into()]);
    }
    let mut records = Vec::with_capacity(header.records.len());
    let mut previous: Option<u64> = None;
    for wire in header.records {
        // The applier's range kinds never travel in a batch: a range has its own frame.
        let kind = RecordKind::from_code(wire.kind)
            .filter(|kind| kind.is_source_kind())
            .ok_or_else(|| bad(format!("LSN {}: unknown record kind {}", wire.lsn, wire.kind)))?;
        if let Some(previous) = previous {
            // Checked: a batch from the network may claim LSN u64::MAX and one more after it.
            if previous.checked_add(1) != Some(wire.lsn) {
                return Err(bad(format!("LSN {} follows {previous} in one batch", wire.lsn)));
            }
        }
        previous = Some(wire.lsn);
        let consistent = match kind {
            RecordKind::Write => wire.length == wire.payload_len as u64,
            RecordKind::WriteZeroes | RecordKind::Discard => wire.payload_len == 0,
            RecordKind::Marker => wire.length == 0,
            RecordKind::Range | RecordKind::Covered => false,
        };
        let extent = Extent::new(wire.offset, wire.length);
        if !consistent || extent.end().is_none() {
            return Err(bad(format!("LSN {}: inconsistent lengths", wire.lsn)));
        }
        let n = wire.payload_len as usize;
        let payload = body.take(n).ok_or_else(|| bad(format!("LSN {}: payload of {n} bytes runs past the frame", wire.lsn)))?;
        records.push(ReceivedRecord { lsn: wire.lsn, kind, flags: wire.flags, extent, timestamp_us: wire.timestamp_us, payload });
    }
    if body.remaining != 0 {
        return Err(bad(format!("{} bytes after the last payload", body.remaining)));
    }
    Ok(records)
}

#[path = "wire_range.rs"]
mod range;
pub use range::{encode_compressed_range_header, encode_range_header, ReceivedRange};

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
