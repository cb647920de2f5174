//! What the journal holds, per retained record and in memory: payload bytes and age (so a
//! mirror's lag is what the replica lacks in reality: records not yet applied, sent or not)
//! and the extent each record changed (so records trimmed before a tracking mirror received
//! them can be folded into its dirty map without reading them back). One entry per retained
//! record, kept by the writer (rebuilt by recovery) and trimmed with the segments.

use std::collections::VecDeque;

use super::format::{RecordHeader, RecordKind};
use crate::extent::Extent;

/// One record as the ledger keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LedgerEntry {
    pub payload_bytes: u64,
    pub timestamp_us: u64,
    /// The device bytes the record changes (empty for a marker).
    pub extent: Extent,
}

impl LedgerEntry {
    pub fn of(header: &RecordHeader) -> LedgerEntry {
        let extent = if header.kind == RecordKind::Marker { Extent::default() } else { header.extent() };
        LedgerEntry { payload_bytes: header.payload_len as u64, timestamp_us: header.timestamp_us, extent }
    }
}

/// A retained record: cumulative payload bytes through it, its time and extent.
#[derive(Debug, Clone, Copy)]
struct Entry {
    cumulative: u64,
    timestamp_us: u64,
    extent: Extent,
}

/// What the journal holds after some LSN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub records: u64,
    /// Payload bytes of those records (what still has to cross the link).
    pub payload_bytes: u64,
    /// Append time of the oldest of them, microseconds since the Unix epoch.
    pub oldest_timestamp_us: Option<u64>,
}

#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// LSN of `entries[0]`.
    first_lsn: u64,
    /// Per record: payload bytes of every record up to and including it since `base`, the
    /// record's append time and extent.
    entries: VecDeque<Entry>,
    /// Cumulative payload bytes of the records trimmed away (the sum before `entries[0]`).
    base: u64,
}

impl Ledger {
    pub fn new(first_lsn: u64) -> Ledger {
        Ledger { first_lsn, entries: VecDeque::new(), base: 0 }
    }

    fn cumulative_at_end(&self) -> u64 {
        self.entries.back().map_or(self.base, |entry| entry.cumulative)
    }

    /// Adds record `lsn`; records must come in order (a gap restarts the ledger there).
    pub fn push(&mut self, lsn: u64, entry: LedgerEntry) {
        if lsn != self.first_lsn + self.entries.len() as u64 {
            *self = Ledger::new(lsn);
        }
        let cumulative = self.cumulative_at_end() + entry.payload_bytes;
        self.entries.push_back(Entry { cumulative, timestamp_us: entry.timestamp_us, extent: entry.extent });
    }

    /// The extents of the retained records in `from..=through` (the part the ledger holds).
    pub fn extents(&self, from: u64, through: u64) -> impl Iterator<Item = Extent> + '_ {
        let start = from.saturating_sub(self.first_lsn).min(self.entries.len() as u64) as usize;
        let end = (through + 1).saturating_sub(self.first_lsn).min(self.entries.len() as u64) as usize;
        self.entries.range(start..end.max(start)).map(|entry| entry.extent)
    }

    /// Of the retained records in `from..=through`: how many, the device bytes they cover, and
    /// how many were appended at or after `since_us`.
    pub fn written(&self, from: u64, through: u64, since_us: u64) -> (u64, u64, u64) {
        let start = from.saturating_sub(self.first_lsn).min(self.entries.len() as u64) as usize;
        let end = (through + 1).saturating_sub(self.first_lsn).min(self.entries.len() as u64) as usize;
        self.entries
            .range(start..end.max(start))
            .fold((0, 0, 0), |(records, bytes, since), entry| (records + 1, bytes + entry.extent.length, since + (entry.timestamp_us >= since_us) as u64))
    }

    /// LSN of the oldest record the ledger holds.
    pub fn first_lsn(&self) -> u64 {
        self.first_lsn
    }

    /// Forgets records before `first_lsn` (they were trimmed).
    pub fn trim_before(&mut self, first_lsn: u64) {
        while self.first_lsn < first_lsn {
            match self.entries.pop_front() {
                Some(entry) => self.base = entry.cumulative,
                None => {
                    self.first_lsn = first_lsn;
                    return;
                }
            }
            self.first_lsn += 1;
        }
    }

    /// Records after `lsn`. Records already trimmed are not counted (only the part of the
    /// backlog the journal still holds is known).
    pub fn after(&self, lsn: u64) -> Backlog {
        let skip = (lsn + 1).saturating_sub(self.first_lsn).min(self.entries.len() as u64) as usize;
        let before = if skip == 0 { self.base } else { self.entries[skip - 1].cumulative };
        Backlog {
            records: (self.entries.len() - skip) as u64,
            payload_bytes: self.cumulative_at_end() - before,
            oldest_timestamp_us: self.entries.get(skip).map(|entry| entry.timestamp_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_counts_records_after_an_lsn() {
        let entry = |lsn: u64, bytes: u64, time: u64| LedgerEntry { payload_bytes: bytes, timestamp_us: time, extent: Extent::new(lsn * 4096, bytes) };
        let mut ledger = Ledger::new(5);
        for lsn in 5..10 {
            ledger.push(lsn, entry(lsn, lsn * 100, lsn * 1000));
        }
        assert_eq!(ledger.extents(6, 7).collect::<Vec<_>>(), vec![Extent::new(6 * 4096, 600), Extent::new(7 * 4096, 700)]);
        assert_eq!(ledger.extents(0, 5).count(), 1);
        assert_eq!(ledger.extents(9, 30).count(), 1);
        assert_eq!(ledger.written(6, 8, 7000), (3, 600 + 700 + 800, 2));
        assert_eq!(ledger.written(0, 30, 0), (5, 3500, 5));
        assert_eq!(ledger.after(4), Backlog { records: 5, payload_bytes: 3500, oldest_timestamp_us: Some(5000) });
        assert_eq!(ledger.after(7), Backlog { records: 2, payload_bytes: 1700, oldest_timestamp_us: Some(8000) });
        assert_eq!(ledger.after(9), Backlog { records: 0, payload_bytes: 0, oldest_timestamp_us: None });
        ledger.trim_before(8);
        assert_eq!(ledger.after(0), Backlog { records: 2, payload_bytes: 1700, oldest_timestamp_us: Some(8000) });
        ledger.trim_before(20);
        ledger.push(20, entry(20, 7, 1));
        assert_eq!(ledger.after(19), Backlog { records: 1, payload_bytes: 7, oldest_timestamp_us: Some(1) });
    }
}
