//! A coalesced range on the replica (docs/coalescing.md): LSNs `first..=last` as the newest
//! version of each block they wrote, received and applied as one step, so the image is only
//! ever recovered to a prefix state of the source (a state at a range's end, never inside).
//!
//! In the applier's journal the range is one `Range` record at `first` (its payload the
//! range's encoding, one CRC over all of it) and one `Covered` record for each LSN after it,
//! which keeps the journal's LSNs strictly +1. `received` reaches `last` only once every one
//! of them is durable (one commit); `applied` moves from `first - 1` to `last` at once. A
//! crash can leave the `Range` record durable without all its `Covered` records: opening
//! then applies what comes before the range, and replaces the journal by an empty one that
//! continues at `first` (`discard_incomplete_range`), so the sender sends the range again.

use bytes::Bytes;

use super::{Replica, ReplicaError};
use crate::extent::Extent;
use crate::journal::range::{meta_len, RangeMeta, HEAD_BYTES};
use crate::journal::{AppendError, JournalError, JournalReader, RecordKind, RECORD_HEADER_SIZE};
use crate::protocol::wire::ReceivedRange;

/// LSNs one range may cover at most (each costs a `Covered` record's header in the journal).
pub const MAX_RANGE_LSNS: u64 = 1 << 20;

impl Replica {
    /// Makes a coalesced range durable in the applier's journal and returns the new
    /// `received` LSN (the range's last, or what it was for a range received before). The
    /// range is checked whole first; a bad one changes nothing.
    pub fn receive_range(&mut self, range: &ReceivedRange) -> Result<u64, ReplicaError> {
        self.writable()?;
        if self.state.needs_sync() {
            return Err(ReplicaError::Rejected("the replica needs an initial synchronisation before it can take journal records".into()));
        }
        if self.stage.is_some() {
            return Err(ReplicaError::Rejected("a coalesced range during a resync (the sender sends records one by one then)".into()));
        }
        let (first, last) = (range.first_lsn, range.last_lsn());
        let received = self.received_lsn();
        if last <= received {
            self.counters.records_duplicated += last - first + 1;
            return Ok(received);
        }
        if first != received + 1 || self.writer.next_lsn() != first {
            return Err(ReplicaError::Rejected(format!(
                "coalesced range {first}..={last} does not continue the applier's journal (received through {received}, next LSN {})",
                self.writer.next_lsn()
            )));
        }
        if last - first >= MAX_RANGE_LSNS {
            return Err(ReplicaError::Rejected(format!("coalesced range {first}..={last} covers more than {MAX_RANGE_LSNS} LSNs")));
        }
        if let Some(piece) = range.meta.pieces.iter().find(|p| !p.extent.fits(self.state.size)) {
            return Err(ReplicaError::Rejected(format!(
                "coalesced range {first}..={last}: offset {} length {} is outside the replica ({} bytes)",
                piece.extent.offset, piece.extent.length, self.state.size
            )));
        }
        // Nothing is staged unless all of it fits: a range cut short by a full journal could
        // otherwise become durable in part.
        let usage = self.journal().usage();
        let segment = self.journal().options().segment_size;
        let needed = (range.encoded.len() + RECORD_HEADER_SIZE) as u64 + (last - first) * RECORD_HEADER_SIZE as u64 + 2 * segment;
        if usage.capacity_bytes.saturating_sub(usage.used_bytes) < needed {
            return Err(ReplicaError::JournalFull);
        }
        self.append(RecordKind::Range, range.encoded.parts(), first)?;
        for lsn in first + 1..=last {
            self.append(RecordKind::Covered, &[] as &[Bytes], lsn)?;
        }
        self.writer.commit(true)?;
        self.counters.records_received += last - first + 1;
        self.counters.bytes_received += range.meta.data_len();
        self.counters.ranges_received += 1;
        Ok(self.received_lsn())
    }

    fn append(&mut self, kind: RecordKind, payload: &[Bytes], expected: u64) -> Result<(), ReplicaError> {
        let lsn = match self.writer.append_parts(kind, Extent::default(), payload, 0) {
            Ok(lsn) => lsn,
            Err(AppendError::JournalFull) => return Err(ReplicaError::JournalFull),
            Err(AppendError::Failed(error)) => return Err(error.into()),
        };
        if lsn != expected {
            return Err(ReplicaError::Journal(JournalError::Corrupt(format!("the applier's journal gave LSN {lsn} to the source's LSN {expected}"))));
        }
        Ok(())
    }

    /// Applies a range [`Replica::receive_range`] made durable, from memory when it is next
    /// (anything else received and not applied is read from the journal). Returns the LSN
    /// applied.
    pub fn apply_received_range(&mut self, range: &ReceivedRange) -> Result<u64, ReplicaError> {
        if self.applied_unsynced + 1 == range.first_lsn && range.last_lsn() <= self.received_lsn() {
            let pieces: Vec<_> = range.pieces().collect();
            self.apply_pieces(range.first_lsn, range.last_lsn(), &pieces)?;
        }
        self.apply_unsynced()
    }

    /// Applies the range record at `lsn` read back from the journal, if all of it is
    /// received (`false`: it is not, and nothing was applied).
    pub(super) fn apply_range_record(&mut self, lsn: u64, payload: &Bytes, received: u64) -> Result<bool, ReplicaError> {
        let corrupt = |e: String| ReplicaError::Journal(JournalError::Corrupt(format!("range record LSN {lsn}: {e}")));
        let count = crate::journal::range::decode_head(payload).map_err(|e| corrupt(e.to_string()))?.1;
        let headers = payload.get(..meta_len(count)).ok_or_else(|| corrupt("truncated".into()))?;
        let meta = RangeMeta::decode(lsn, headers).map_err(|e| corrupt(e.to_string()))?;
        if meta.last_lsn > received {
            return Ok(false);
        }
        if payload.len() as u64 != meta_len(count) as u64 + meta.data_len() {
            return Err(corrupt(format!("{} bytes for its pieces' {} ({HEAD_BYTES}-byte head)", payload.len(), meta.data_len())));
        }
        let mut at = meta_len(count);
        let mut data = Vec::with_capacity(meta.pieces.len());
        for piece in &meta.pieces {
            let length = if piece.kind == RecordKind::Write { piece.extent.length as usize } else { 0 };
            data.push([payload.slice(at..at + length)]);
            at += length;
        }
        let pieces: Vec<_> = meta.pieces.iter().zip(&data).map(|(piece, bytes)| (*piece, if bytes[0].is_empty() { &[][..] } else { &bytes[..] })).collect();
        self.apply_pieces(lsn, meta.last_lsn, &pieces)?;
        Ok(true)
    }

    fn apply_pieces(&mut self, first: u64, last: u64, pieces: &[(crate::journal::range::Piece, &[Bytes])]) -> Result<(), ReplicaError> {
        self.writable()?;
        if self.stage.is_some() {
            return Err(ReplicaError::Stage("a coalesced range cannot be applied to a resync's stage".into()));
        }
        if self.snapshots.preserving() {
            let writes: Vec<(u64, Extent)> = pieces.iter().map(|(piece, _)| (first, piece.extent)).collect();
            self.snapshots.preserve(&self.image, &writes);
        }
        for (piece, data) in pieces {
            self.image
                .apply(piece.kind, piece.extent, data)
                .map_err(|source| ReplicaError::Io { context: format!("apply range {first}..={last} to {}", self.state.image.display()), source })?;
            self.unsynced_bytes += data.iter().map(|d| d.len() as u64).sum::<u64>();
        }
        self.applied_unsynced = last;
        self.counters.records_applied += last - first + 1;
        Ok(())
    }

    /// After a crash: a range whose `Range` record is durable but not all of whose `Covered`
    /// records are (the commit was cut) was never acknowledged, and is not applied. What comes
    /// before it is applied and checkpointed, then the journal restarts at the range's first
    /// LSN, which the sender sends again.
    pub(super) fn discard_incomplete_range(&mut self) -> Result<(), ReplicaError> {
        let (applied, received) = (self.state.applied_lsn, self.received_lsn());
        if applied >= received || self.stage.is_some() {
            return Ok(());
        }
        let mut reader = JournalReader::new(self.journal().clone(), applied + 1)?;
        let Some(record) = reader.next_record()? else { return Ok(()) };
        if record.header.kind != RecordKind::Range {
            return Ok(());
        }
        tracing::warn!(volume = %self.state.volume_name, first = applied + 1, received, "a coalesced range was cut by a crash before it was whole: discarding it (the source sends it again)");
        drop(reader);
        self.replace_journal(applied)
    }
}

#[cfg(test)]
#[path = "range_tests.rs"]
mod tests;
