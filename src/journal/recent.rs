//! Recent records kept in memory for readers that follow the writer closely: a mirror's
//! sender, which sends what was just journaled. Such a reader takes a record from here rather
//! than reading back and verifying what the writer has just written: on the source of a
//! mirror, that page-cache copy and CRC were about a quarter of the sender's CPU per 4 KiB
//! record (perf, two hosts simulated).
//!
//! Records are kept only while a reader follows ([`Journal::follow`]): by reference when the
//! writer was handed the payload as one shared buffer of at least 1 KiB (a volume's write
//! requests), as a copy when it is at most 4 KiB, not at all otherwise (see the writer's
//! `kept_payload`); memory is bounded by [`RECENT_BYTES`], and a record every follower has
//! read ([`Following::passed`]) is let go at once. A record kept here is the one the
//! writer wrote, after its write succeeded: the same header and bytes a read of the file
//! would verify.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{align_up, Journal, Record, RECORD_ALIGN};

/// Bytes of recent records kept at most: their payloads, and [`RECORD_COST`] for each (so a
/// run of records without payload, discards or write-zeroes, stays bounded too). 64 ms of
/// writes at 500 MB/s: a sender that keeps up reads every record from here; one further
/// behind reads the files. Records every follower has read go at once, so a mirror that
/// keeps up holds only what it has not read yet; a follower that never says how far it read
/// keeps the budget full.
const RECENT_BYTES: u64 = 32 << 20;
/// What one kept record costs besides its payload (its entry, rounded up).
const RECORD_COST: u64 = 128;

/// A record as the writer wrote it, and where: a reader taking it keeps its file position.
#[derive(Clone)]
pub(super) struct Recent {
    pub record: Record,
    /// First LSN of the segment the record is in.
    pub segment: u64,
    /// File offset of the record in that segment.
    pub position: u64,
}

impl Recent {
    /// File offset of the record after this one, in the same segment.
    pub fn next_position(&self) -> u64 {
        self.position + align_up(self.record.header.encoded_len() as u64, RECORD_ALIGN)
    }
}

/// Consecutive recent records, oldest first.
#[derive(Default)]
pub(super) struct RecentRecords {
    records: VecDeque<Recent>,
    /// Payload bytes plus [`RECORD_COST`] per record.
    charged_bytes: u64,
    /// For each reader following the writer ([`Following`] handles alive, by id): the next
    /// LSN it will read (0 until it says).
    followers: std::collections::BTreeMap<u64, u64>,
    next_follower: u64,
}

impl std::fmt::Debug for RecentRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lsns = self.records.front().zip(self.records.back()).map(|(first, last)| (first.record.header.lsn, last.record.header.lsn));
        f.debug_struct("RecentRecords").field("lsns", &lsns).field("charged_bytes", &self.charged_bytes).field("followers", &self.followers.len()).finish()
    }
}

impl RecentRecords {
    /// Adds records the writer has just written, in LSN order. A gap (a record that was not
    /// kept) starts the run again: only consecutive LSNs are kept.
    pub fn extend(&mut self, written: impl IntoIterator<Item = Recent>) {
        if self.followers.is_empty() {
            return;
        }
        for recent in written {
            let follows = self.records.back().is_none_or(|last| last.record.header.lsn + 1 == recent.record.header.lsn);
            if !follows {
                self.clear();
            }
            self.charged_bytes += charge(&recent);
            self.records.push_back(recent);
        }
        while self.charged_bytes > RECENT_BYTES {
            self.pop_oldest();
        }
        self.let_go_of_passed();
    }

    fn pop_oldest(&mut self) {
        if let Some(oldest) = self.records.pop_front() {
            self.charged_bytes -= charge(&oldest);
        }
    }

    /// Drops the records every follower has read.
    fn let_go_of_passed(&mut self) {
        let Some(&slowest) = self.followers.values().min() else { return };
        while self.records.front().is_some_and(|oldest| oldest.record.header.lsn < slowest) {
            self.pop_oldest();
        }
    }

    fn add_follower(&mut self) -> u64 {
        let id = self.next_follower;
        self.next_follower += 1;
        self.followers.insert(id, 0);
        id
    }

    /// Returns whether a follower remains.
    fn remove_follower(&mut self, id: u64) -> bool {
        self.followers.remove(&id);
        if self.followers.is_empty() {
            self.clear();
            return false;
        }
        self.let_go_of_passed();
        true
    }

    fn passed(&mut self, id: u64, next_lsn: u64) {
        if let Some(position) = self.followers.get_mut(&id) {
            *position = next_lsn;
            self.let_go_of_passed();
        }
    }

    pub fn get(&self, lsn: u64) -> Option<Recent> {
        let first = self.records.front()?.record.header.lsn;
        let index = usize::try_from(lsn.checked_sub(first)?).ok()?;
        self.records.get(index).cloned()
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.charged_bytes = 0;
    }
}

fn charge(recent: &Recent) -> u64 {
    recent.record.payload.len() as u64 + RECORD_COST
}

/// A reader following the writer: while one is alive, the journal keeps recent records for
/// it. Dropping the last one frees them.
pub struct Following {
    journal: Arc<Journal>,
    id: u64,
}

impl Following {
    /// The follower will read `next_lsn` next: records before it that every follower has
    /// read are let go.
    pub fn passed(&self, next_lsn: u64) {
        self.journal.lock_recent().passed(self.id, next_lsn);
    }
}

impl Journal {
    /// Keeps recent records in memory for a reader that follows the writer closely, until the
    /// returned handle is dropped.
    pub fn follow(self: &Arc<Self>) -> Following {
        let id = self.lock_recent().add_follower();
        self.keeping_recent.store(true, Ordering::Release);
        Following { journal: self.clone(), id }
    }

    pub(super) fn lock_recent(&self) -> std::sync::MutexGuard<'_, RecentRecords> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes of recent records kept in memory for the readers that follow the writer, as
    /// charged against [`RECENT_BYTES`] (payloads, most of them buffers the volume's writeback
    /// holds anyway, plus [`RECORD_COST`] a record): 0 while none follows or every one has
    /// read everything. For status only: `usage()`, which writeback and trimming call, does not
    /// take this lock.
    pub fn recent_bytes(&self) -> u64 {
        if !self.keeping_recent.load(Ordering::Acquire) {
            return 0;
        }
        self.lock_recent().charged_bytes
    }

    /// The record with `lsn` if it is kept in memory.
    pub(super) fn recent(&self, lsn: u64) -> Option<Recent> {
        if !self.keeping_recent.load(Ordering::Acquire) {
            return None;
        }
        self.lock_recent().get(lsn)
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut recent = self.journal.lock_recent();
        if !recent.remove_follower(self.id) {
            self.journal.keeping_recent.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use crate::journal::{JournalOptions, JournalReader, RecordHeader, RecordKind};
    use bytes::Bytes;

    /// A reader following the writer gets every record as the files hold it: the ones handed
    /// over as one shared buffer from memory (the very buffer), the others (a large payload
    /// in pieces, records evicted while the reader lagged) from the files, across segment
    /// rolls; and a reader of the files after a reopen sees the same headers.
    #[test]
    fn a_follower_reads_what_the_files_hold_from_memory_where_it_can() {
        let tmp = tempfile::tempdir().unwrap();
        let options = JournalOptions { segment_size: 4 << 20, capacity: 256 << 20, journal_id: [9; 16] };
        Journal::create(tmp.path(), options).unwrap();
        let mut written = Vec::new();
        {
            let (journal, mut writer, _) = Journal::open(tmp.path(), options).unwrap();
            let following = journal.follow();
            let mut follower = JournalReader::new(journal.clone(), 1).unwrap();
            let mut from_memory = 0;
            let mut read = 0;
            for i in 0..400u64 {
                // Every 50th record is large and in pieces; from 200 on the reader lags by
                // more than the budget for a while, then catches up.
                let length = if i % 50 == 49 || (200..240).contains(&i) { 1 << 20 } else { 4096 + (i as usize % 3) * 512 };
                let bytes = Bytes::from((0..length).map(|j| (i as usize * 31 + j) as u8).collect::<Vec<u8>>());
                let extent = Extent::new(i * 4096, length as u64);
                let lsn = if i % 50 == 49 {
                    let pieces = [bytes.slice(..length / 2), bytes.slice(length / 2..)];
                    writer.append_parts(RecordKind::Write, extent, &pieces, 0).unwrap()
                } else {
                    writer.append_parts(RecordKind::Write, extent, std::slice::from_ref(&bytes), 0).unwrap()
                };
                written.push((lsn, bytes));
                writer.commit(i % 3 == 0).unwrap();
                if (200..240).contains(&i) {
                    continue;
                }
                while let Some(record) = follower.next_record().unwrap() {
                    let (lsn, bytes) = &written[read];
                    assert_eq!(record.header.lsn, *lsn);
                    assert!(record.payload == bytes, "LSN {lsn}: payload differs");
                    from_memory += usize::from(record.payload.as_ptr() == bytes.as_ptr());
                    read += 1;
                }
            }
            assert_eq!(read, written.len());
            // All but the pieced records and those evicted while the reader lagged.
            assert!(from_memory > 300 && from_memory < 392, "{from_memory} records from memory");
            // This follower has not said how far it read: the journal shows what is kept for
            // it, until it does.
            let kept = journal.recent_bytes();
            assert!(kept > 4096 && kept <= RECENT_BYTES, "{kept} bytes kept");
            following.passed(follower.next_lsn());
            assert_eq!(journal.recent_bytes(), 0, "everything read is let go");
            drop(following);
            assert!(journal.recent(written.len() as u64).is_none(), "the last follower gone, nothing is kept");
        }
        let (journal, _writer, _) = Journal::open(tmp.path(), options).unwrap();
        let mut reader = JournalReader::new(journal, 1).unwrap();
        for (lsn, bytes) in &written {
            let record = reader.next_record().unwrap().unwrap();
            assert_eq!(record.header.lsn, *lsn);
            assert!(record.payload == bytes);
        }
    }

    /// What every follower has read goes at once; a follower that has not said how far it
    /// read keeps everything; the slowest decides, and a follower leaving lets go of what it
    /// alone held.
    #[test]
    fn records_every_follower_has_read_are_let_go() {
        let mut records = RecentRecords::default();
        let first = records.add_follower();
        records.extend((1..=10).map(|lsn| recent(lsn, 10)));
        assert!(records.get(1).is_some(), "no position yet: all kept");
        records.passed(first, 4);
        assert!(records.get(3).is_none() && records.get(4).is_some());
        assert_eq!(records.charged_bytes, 7 * (10 + RECORD_COST), "the budget is given back");
        let second = records.add_follower();
        records.extend((11..=12).map(|lsn| recent(lsn, 10)));
        records.passed(first, 13);
        assert!(records.get(4).is_some(), "the second follower has not said: kept for it");
        records.passed(second, 8);
        assert!(records.get(7).is_none() && records.get(8).is_some(), "the slowest decides");
        assert!(records.remove_follower(second));
        assert!(records.get(12).is_none() && records.records.is_empty(), "the first had read everything");
        records.extend([recent(13, 10)]);
        assert!(records.get(13).is_some(), "what it has not read yet is kept");
        assert!(!records.remove_follower(first));
        assert!(records.get(13).is_none());
    }

    fn recent(lsn: u64, payload: usize) -> Recent {
        let header = RecordHeader {
            kind: RecordKind::Write,
            flags: 0,
            lsn,
            offset: 0,
            length: payload as u64,
            payload_len: payload as u32,
            synced_lsn: 0,
            timestamp_us: 0,
        };
        Recent { record: Record { header, payload: bytes::Bytes::from(vec![lsn as u8; payload]) }, segment: 1, position: 4096 }
    }

    #[test]
    fn keeps_consecutive_records_within_its_budget_and_only_while_followed() {
        let mut records = RecentRecords::default();
        records.extend([recent(1, 10)]);
        assert!(records.get(1).is_none(), "nothing is kept without a follower");
        records.add_follower();
        records.extend((1..=3).map(|lsn| recent(lsn, 10)));
        assert_eq!(records.get(2).unwrap().record.payload[0], 2);
        assert!(records.get(4).is_none() && records.get(0).is_none());
        // A gap starts the run again.
        records.extend([recent(5, 10)]);
        assert!(records.get(3).is_none());
        assert_eq!(records.get(5).unwrap().record.header.lsn, 5);
        // The budget evicts the oldest.
        let big = (RECENT_BYTES / 2) as usize;
        records.extend([recent(6, big), recent(7, big)]);
        assert!(records.get(5).is_none() && records.get(6).is_none(), "the oldest went first");
        assert_eq!(records.get(7).unwrap().record.payload.len(), big);
        // Records without payload count too: a long run of them stays bounded.
        records.extend((8..8 + RECENT_BYTES / RECORD_COST).map(|lsn| recent(lsn, 0)));
        assert!(records.records.len() as u64 <= RECENT_BYTES / RECORD_COST, "{} records kept", records.records.len());
        assert!(records.get(7).is_none());
    }
}
