//! Coalescing a backlog (docs/coalescing.md): for a run of records that ends before a marker
//! (or at a size cap), only the newest version of every device byte is sent, as one range
//! the applier journals and applies as one step. This module is the pure part: the setting,
//! when `auto` coalesces, and the extent map that keeps the newest version of each byte
//! (overlapping extents of any size and alignment are cut, not matched by block keys).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::extent::Extent;
use crate::journal::range::{meta_len, Piece, RangeMeta, MAX_PIECES, MAX_RANGE_PAYLOAD};
use crate::journal::{Record, RecordKind};

/// `auto` coalesces while the mirror is at least this far behind (journal payload bytes
/// durable at the source and not yet sent).
pub const AUTO_BACKLOG_BYTES: u64 = 64 << 20;
/// Write data one range carries at most: it fits one group commit of the applier's journal
/// with room for the piece headers, and the sender's 16 MiB window twice over.
pub const RANGE_DATA_BYTES: u64 = 7 << 20;
/// Source records one range covers at most (bounds the sender's time and memory per range,
/// whatever the overwrite rate: the payloads stay slices of what it read).
pub const RANGE_RECORDS: u64 = 16384;
/// Source payload bytes one range covers at most (the same bound in bytes).
pub const RANGE_SOURCE_BYTES: u64 = 256 << 20;

/// A mirror's `coalesce` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coalesce {
    /// Never: every record is sent.
    Off,
    /// While the backlog is at least [`AUTO_BACKLOG_BYTES`].
    #[default]
    Auto,
    /// Whenever more than one record is ready (tests, links that are always the bottleneck).
    On,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("coalesce must be off, auto or on, not {0:?}")]
pub struct CoalesceError(String);

impl std::str::FromStr for Coalesce {
    type Err = CoalesceError;
    fn from_str(text: &str) -> Result<Coalesce, CoalesceError> {
        match text {
            "off" => Ok(Coalesce::Off),
            "auto" => Ok(Coalesce::Auto),
            "on" => Ok(Coalesce::On),
            other => Err(CoalesceError(other.to_string())),
        }
    }
}

impl std::fmt::Display for Coalesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Coalesce::Off => "off",
            Coalesce::Auto => "auto",
            Coalesce::On => "on",
        })
    }
}

impl Coalesce {
    /// Whether the next records go as a range, given the backlog (payload bytes ready).
    pub fn wanted(self, backlog_bytes: u64) -> bool {
        match self {
            Coalesce::Off => false,
            Coalesce::Auto => backlog_bytes >= AUTO_BACKLOG_BYTES,
            Coalesce::On => true,
        }
    }
}

/// One piece of the map: the newest version of `[start, end)`.
#[derive(Debug, Clone)]
struct Entry {
    end: u64,
    kind: RecordKind,
    /// A write's bytes (exactly `end - start`); empty for zeroes and discards.
    data: Bytes,
}

/// Non-overlapping pieces by start offset: inserting an extent cuts away whatever older
/// pieces it overlaps (keeping their parts outside it).
#[derive(Debug, Default)]
pub struct ExtentMap {
    pieces: BTreeMap<u64, Entry>,
    data_bytes: u64,
}

impl ExtentMap {
    /// Write data the map holds.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Records that `kind` of `extent` is now the newest version of those bytes. `data` is a
    /// write's payload (`extent.length` bytes). Zero-length extents and markers change nothing.
    pub fn insert(&mut self, kind: RecordKind, extent: Extent, data: Bytes) {
        let Some(end) = extent.end() else { return };
        if extent.length == 0 || !matches!(kind, RecordKind::Write | RecordKind::WriteZeroes | RecordKind::Discard) {
            return;
        }
        let start = extent.offset;
        let overlapping: Vec<u64> = self.pieces.range(..end).rev().take_while(|(_, e)| e.end > start).map(|(&s, _)| s).collect();
        for piece_start in overlapping {
            let old = self.pieces.remove(&piece_start).expect("listed above");
            self.data_bytes -= old.data.len() as u64;
            if piece_start < start {
                let data = if old.kind == RecordKind::Write { old.data.slice(..(start - piece_start) as usize) } else { Bytes::new() };
                self.put(piece_start, Entry { end: start, kind: old.kind, data });
            }
            if old.end > end {
                let data = if old.kind == RecordKind::Write { old.data.slice((end - piece_start) as usize..) } else { Bytes::new() };
                self.put(end, Entry { end: old.end, kind: old.kind, data });
            }
        }
        let data = if kind == RecordKind::Write { data } else { Bytes::new() };
        self.put(start, Entry { end, kind, data });
    }

    fn put(&mut self, start: u64, entry: Entry) {
        self.data_bytes += entry.data.len() as u64;
        self.pieces.insert(start, entry);
    }

    /// The pieces in offset order, and the write data in the same order.
    pub fn into_parts(self) -> (Vec<Piece>, Vec<Bytes>) {
        let mut pieces = Vec::with_capacity(self.pieces.len());
        let mut data = Vec::new();
        for (start, entry) in self.pieces {
            pieces.push(Piece { kind: entry.kind, extent: Extent::new(start, entry.end - start) });
            if entry.kind == RecordKind::Write {
                data.push(entry.data);
            }
        }
        (pieces, data)
    }
}

/// A range ready to send: LSNs `first_lsn..=meta.last_lsn` as the newest version of what
/// their records wrote.
#[derive(Debug)]
pub struct Coalesced {
    pub first_lsn: u64,
    pub timestamp_us: u64,
    pub meta: RangeMeta,
    pub data: Vec<Bytes>,
    /// Source records and their payload bytes the range stands for.
    pub records: u64,
    pub source_bytes: u64,
}

/// Why a record was not taken into the range being built: the range ends before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A marker: a range never spans one, so its snapshot stays exact.
    Marker,
    /// The range is full.
    Full,
}

/// Gathers consecutive records into one range.
#[derive(Debug, Default)]
pub struct RangeBuilder {
    first_lsn: Option<u64>,
    last_lsn: u64,
    timestamp_us: u64,
    map: ExtentMap,
    records: u64,
    source_bytes: u64,
}

impl RangeBuilder {
    /// Takes the next record (LSNs must follow each other), or says why the range ends
    /// before it.
    pub fn offer(&mut self, record: &Record) -> Result<(), Refused> {
        let h = &record.header;
        if !h.kind.is_source_kind() || h.kind == RecordKind::Marker {
            return Err(Refused::Marker);
        }
        if let Some(first) = self.first_lsn {
            debug_assert_eq!(h.lsn, self.last_lsn + 1, "records of a range follow each other from {first}");
        }
        let length = if h.kind == RecordKind::Write { h.length } else { 0 };
        // At most two more pieces (the cut-off ends of an older one) per record.
        let full = self.records >= RANGE_RECORDS
            || self.source_bytes + record.payload.len() as u64 > RANGE_SOURCE_BYTES
            || self.map.data_bytes() + length > RANGE_DATA_BYTES
            || self.map.len() + 2 > MAX_PIECES
            || meta_len(self.map.len() + 2) as u64 + self.map.data_bytes() + length > MAX_RANGE_PAYLOAD as u64;
        if full && self.records > 0 {
            return Err(Refused::Full);
        }
        self.first_lsn.get_or_insert(h.lsn);
        self.last_lsn = h.lsn;
        self.timestamp_us = h.timestamp_us;
        self.records += 1;
        self.source_bytes += record.payload.len() as u64;
        self.map.insert(h.kind, h.extent(), record.payload.clone());
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// The range, if any record was taken (one of records that changed nothing has no
    /// pieces, and still covers its LSNs).
    pub fn finish(self) -> Option<Coalesced> {
        let first_lsn = self.first_lsn?;
        let (pieces, data) = self.map.into_parts();
        Some(Coalesced {
            first_lsn,
            timestamp_us: self.timestamp_us,
            meta: RangeMeta { last_lsn: self.last_lsn, pieces },
            data,
            records: self.records,
            source_bytes: self.source_bytes,
        })
    }
}

#[cfg(test)]
#[path = "coalesce_tests.rs"]
mod tests;
