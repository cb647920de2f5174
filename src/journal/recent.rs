//! Recent records kept in memory for readers that follow the writer closely: a mirror's
//! sender, which sends what was just journaled. Such a reader takes a record from here rather
//! than reading back and verifying what the writer has just written: on the source of a
//! mirror, that page-cache copy and CRC were about a quarter of the sender's CPU per 4 KiB
//! record (perf, two hosts simulated).
//!
//! Records are kept only while a reader follows ([`Journal::follow`]): by reference when the
//! writer was handed the payload as one shared buffer of at least 1 KiB (a volume's write
//! requests), as a copy when it is at most 4 KiB, not at all otherwise (see the writer's
//! `kept_payload`); memory is bounded by [`RECENT_BYTES`]. A record kept here is the one the
//! writer wrote, after its write succeeded: the same header and bytes a read of the file
//! would verify.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{align_up, Journal, Record, RECORD_ALIGN};

/// Bytes of recent records kept at most: their payloads, and [`RECORD_COST`] for each (so a
/// run of records without payload, discards or write-zeroes, stays bounded too). 64 ms of
/// writes at 500 MB/s: a sender that keeps up reads every record from here; one further
/// behind reads the files. The budget stays filled while a reader follows, even once it has
/// read everything: up to this much of a mirrored volume's memory holds write buffers the
/// volume has already applied.
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
    /// Readers following the writer ([`Following`] handles alive).
    followers: usize,
}

impl std::fmt::Debug for RecentRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lsns = self.records.front().zip(self.records.back()).map(|(first, last)| (first.record.header.lsn, last.record.header.lsn));
        f.debug_struct("RecentRecords").field("lsns", &lsns).field("charged_bytes", &self.charged_bytes).field("followers", &self.followers).finish()
    }
}

impl RecentRecords {
    /// Adds records the writer has just written, in LSN order. A gap (a record that was not
    /// kept) starts the run again: only consecutive LSNs are kept.
    pub fn extend(&mut self, written: impl IntoIterator<Item = Recent>) {
        if self.followers == 0 {
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
            let Some(oldest) = self.records.pop_front() else { break };
            self.charged_bytes -= charge(&oldest);
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
}

impl Journal {
    /// Keeps recent records in memory for a reader that follows the writer closely, until the
    /// returned handle is dropped.
    pub fn follow(self: &Arc<Self>) -> Following {
        self.lock_recent().followers += 1;
        self.keeping_recent.store(true, Ordering::Release);
        Following { journal: self.clone() }
    }

    pub(super) fn lock_recent(&self) -> std::sync::MutexGuard<'_, RecentRecords> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        recent.followers -= 1;
        if recent.followers == 0 {
            recent.clear();
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
        records.followers = 1;
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
