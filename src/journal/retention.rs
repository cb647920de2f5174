//! Retention: the one place that decides how far a journal may be trimmed.
//!
//! A record may go once the store holds it durably (the local checkpoint) and every holder
//! of a **hold** is done with it. A volume's mirrors each have a named hold: the LSN through
//! which that mirror's applier has `received` (journaled durably at its end). The volume's
//! caller gives the holds at open (from the mirrors' saved checkpoints), so the volume never
//! reads mirror files itself; senders move their hold through a [`Hold`] handle as the applier
//! acknowledges. A replica's journal has no holds: its checkpoint alone decides.
//!
//! Trimming recycles whole segments (`Journal::trim_through`); it happens at checkpoints
//! and, when the journal is full and writers wait, as soon as a hold moves.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Journal, JournalError};

/// What may be trimmed from one journal, and the trimming itself.
#[derive(Debug)]
pub struct Retention {
    journal: Arc<Journal>,
    /// Every record through this LSN is durable in the store.
    checkpoint_lsn: AtomicU64,
    /// Each holder's LSN: the journal keeps every record after it.
    holds: Mutex<BTreeMap<String, u64>>,
}

impl Retention {
    /// Retention for `journal` whose store is durable through `checkpoint_lsn`, with the
    /// given named holds.
    pub fn new(journal: Arc<Journal>, checkpoint_lsn: u64, holds: impl IntoIterator<Item = (String, u64)>) -> Arc<Retention> {
        Arc::new(Retention { journal, checkpoint_lsn: AtomicU64::new(checkpoint_lsn), holds: Mutex::new(holds.into_iter().collect()) })
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The LSN through which the journal may be trimmed now.
    pub fn trim_floor(&self) -> u64 {
        let checkpoint = self.checkpoint_lsn.load(Ordering::Acquire);
        crate::lock(&self.holds).values().copied().fold(checkpoint, u64::min)
    }

    pub fn checkpoint_lsn(&self) -> u64 {
        self.checkpoint_lsn.load(Ordering::Acquire)
    }

    /// The hold named `name`, if it exists.
    pub fn hold(self: &Arc<Self>, name: &str) -> Option<Hold> {
        crate::lock(&self.holds).contains_key(name).then(|| Hold { retention: self.clone(), name: name.to_string() })
    }

    /// The hold named `name`, made at `lsn` if it does not exist yet.
    pub fn add_hold(self: &Arc<Self>, name: &str, lsn: u64) -> Hold {
        crate::lock(&self.holds).entry(name.to_string()).or_insert(lsn);
        Hold { retention: self.clone(), name: name.to_string() }
    }

    /// The holds by name with their LSNs (for status and tests).
    pub fn holds(&self) -> Vec<(String, u64)> {
        crate::lock(&self.holds).iter().map(|(name, lsn)| (name.clone(), *lsn)).collect()
    }

    /// The store is durable through `lsn`: trims what no hold keeps.
    pub fn checkpointed(&self, lsn: u64) -> Result<usize, JournalError> {
        self.checkpoint_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.trim()
    }

    /// Recycles every segment whose records all lie at or below the trim floor.
    pub fn trim(&self) -> Result<usize, JournalError> {
        if crate::failpoint::enabled("journal-no-trim") {
            return Ok(0);
        }
        self.journal.trim_through(self.trim_floor())
    }

    fn set_hold(&self, name: &str, lsn: u64) {
        let previous = crate::lock(&self.holds).insert(name.to_string(), lsn);
        // A full journal held by a lagging mirror: writers wait for a trim, and the volume's
        // writeback (idle, everything applied) has no reason to checkpoint. Trim now, through
        // what is already durable in the store, so the mirror's progress frees space at once.
        if previous.is_some_and(|previous| lsn > previous) && self.journal.is_full() {
            if let Err(error) = self.trim() {
                tracing::warn!(error = %error, "journal trim failed; will retry at the next checkpoint");
            }
        }
    }
}

/// One holder's claim on a journal: records after its LSN are kept.
#[derive(Debug, Clone)]
pub struct Hold {
    retention: Arc<Retention>,
    name: String,
}

impl Hold {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn lsn(&self) -> u64 {
        crate::lock(&self.retention.holds).get(&self.name).copied().unwrap_or(u64::MAX)
    }

    /// Keeps every record after `lsn` from now on (it may move back: a synchronisation
    /// re-bases a mirror on an older LSN while it chooses its base).
    pub fn set(&self, lsn: u64) {
        self.retention.set_hold(&self.name, lsn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use crate::journal::{JournalOptions, RecordKind};

    #[test]
    fn the_floor_is_the_checkpoint_and_every_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let options = JournalOptions { segment_size: 1 << 20, capacity: 8 << 20, journal_id: [3; 16] };
        Journal::create(tmp.path(), options).unwrap();
        let (journal, mut writer, _) = Journal::open(tmp.path(), options).unwrap();
        // Three segments' worth of records.
        for i in 0..48u64 {
            writer.append(RecordKind::Write, Extent::new(0, 65536), &vec![i as u8; 65536], 0).unwrap();
        }
        writer.commit(true).unwrap();
        let retention = Retention::new(journal.clone(), 0, [("a".to_string(), 10), ("b".to_string(), 40)]);
        assert_eq!(retention.trim_floor(), 0);
        retention.checkpointed(48).unwrap();
        assert_eq!(retention.trim_floor(), 10, "hold a keeps the journal");
        assert!(journal.first_lsn() <= 11);
        let a = retention.hold("a").unwrap();
        a.set(45);
        assert_eq!(retention.trim_floor(), 40);
        retention.trim().unwrap();
        assert!(journal.first_lsn() > 11 && journal.first_lsn() <= 41, "first LSN {}", journal.first_lsn());
        assert!(retention.hold("c").is_none());
        assert_eq!(retention.add_hold("a", 1).lsn(), 45, "an existing hold is not moved by add_hold");
        assert_eq!(retention.holds(), vec![("a".to_string(), 45), ("b".to_string(), 40)]);
    }
}
