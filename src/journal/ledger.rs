//! How much of the journal lies past a given LSN, in payload bytes and age: what a mirror's
//! lag is in reality (records not yet applied on the replica, sent or not). One entry per
//! retained record, kept by the writer and trimmed with the segments.

use std::collections::VecDeque;

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
    /// Per record: payload bytes of every record up to and including it since `base`, and
    /// the record's append time.
    entries: VecDeque<(u64, u64)>,
    /// Cumulative payload bytes of the records trimmed away (the sum before `entries[0]`).
    base: u64,
}

impl Ledger {
    pub fn new(first_lsn: u64) -> Ledger {
        Ledger { first_lsn, entries: VecDeque::new(), base: 0 }
    }

    fn cumulative_at_end(&self) -> u64 {
        self.entries.back().map_or(self.base, |entry| entry.0)
    }

    /// Adds record `lsn`; records must come in order (a gap restarts the ledger there).
    pub fn push(&mut self, lsn: u64, payload_bytes: u64, timestamp_us: u64) {
        if lsn != self.first_lsn + self.entries.len() as u64 {
            *self = Ledger::new(lsn);
        }
        let cumulative = self.cumulative_at_end() + payload_bytes;
        self.entries.push_back((cumulative, timestamp_us));
    }

    /// Forgets records before `first_lsn` (they were trimmed).
    pub fn trim_before(&mut self, first_lsn: u64) {
        while self.first_lsn < first_lsn {
            match self.entries.pop_front() {
                Some(entry) => self.base = entry.0,
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
        let before = if skip == 0 { self.base } else { self.entries[skip - 1].0 };
        Backlog {
            records: (self.entries.len() - skip) as u64,
            payload_bytes: self.cumulative_at_end() - before,
            oldest_timestamp_us: self.entries.get(skip).map(|entry| entry.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_counts_records_after_an_lsn() {
        let mut ledger = Ledger::new(5);
        for lsn in 5..10 {
            ledger.push(lsn, lsn * 100, lsn * 1000);
        }
        assert_eq!(ledger.after(4), Backlog { records: 5, payload_bytes: 3500, oldest_timestamp_us: Some(5000) });
        assert_eq!(ledger.after(7), Backlog { records: 2, payload_bytes: 1700, oldest_timestamp_us: Some(8000) });
        assert_eq!(ledger.after(9), Backlog { records: 0, payload_bytes: 0, oldest_timestamp_us: None });
        ledger.trim_before(8);
        assert_eq!(ledger.after(0), Backlog { records: 2, payload_bytes: 1700, oldest_timestamp_us: Some(8000) });
        ledger.trim_before(20);
        ledger.push(20, 7, 1);
        assert_eq!(ledger.after(19), Backlog { records: 1, payload_bytes: 7, oldest_timestamp_us: Some(1) });
    }
}
