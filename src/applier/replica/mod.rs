//! A replica on the applier: the destination image, the applier's own journal of received
//! records (the same journal module as a volume's, continuing the source's LSNs) and its
//! checkpoints. No network here: the applier daemon feeds it decoded batches.
//!
//! `receive` makes a batch durable in the journal (the `received` checkpoint, after which
//! the source may trim); `apply` applies received records to the image strictly in LSN order,
//! makes them durable, and advances `applied`. After a crash, opening redoes the journal from
//! `applied` (applying is idempotent). The target half of a synchronisation is
//! `sync_target.rs`; the state file `state.rs`.

mod demoted;
mod journal;
mod promote;
mod range;
mod resync;
mod snapshots;
mod stage;
mod state;
mod sync_target;
#[cfg(test)]
mod tests;

mod verify;

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

pub use demoted::DemotedImage;
pub use promote::{PromoteOptions, Promoted};
pub use state::{Consistency, Promotion, ReplicaState, ResyncState};

use self::journal::{journal_options, new_journal, owner, restart_journal, NEW, RESETTING};
use super::config::ReplicaJournal;
use super::snapshot::{SnapshotError, SnapshotMeta, Snapshots};
use crate::extent::Extent;
use crate::generation::{History, Relation};
use crate::journal::placement;
use crate::journal::{AppendError, Journal, JournalError, JournalReader, JournalWriter, RecordKind, Retention};
use crate::layout::ReplicaDir;
use crate::protocol::wire::{history_from_wire, wire_history, Hello, ReceivedRecord, Refusal};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    State { path: std::path::PathBuf, message: String },
    /// Input from the network that does not fit this replica; nothing was changed.
    #[error("rejected batch: {0}")]
    Rejected(String),
    #[error("the applier journal is full: records must be applied before more are received")]
    JournalFull,
    #[error("resync stage: {0}")]
    Stage(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl ReplicaError {
    /// An error of the disk under the replica (its journal, image or state files), as
    /// opposed to bad input: the replica's files must be read again before it is trusted.
    pub fn is_disk_error(&self) -> bool {
        matches!(self, ReplicaError::Io { .. } | ReplicaError::Journal(JournalError::Io { .. }) | ReplicaError::Store(StoreError::Io { .. }))
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let context = context.into();
    move |source| ReplicaError::Io { context, source }
}

/// Counters the tests and status read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplicaCounters {
    pub records_received: u64,
    /// Records that arrived again after a reconnect (already received): skipped.
    pub records_duplicated: u64,
    pub records_applied: u64,
    /// Payload bytes of fresh records and of synchronisation chunks written.
    pub bytes_received: u64,
    /// Coalesced ranges received (their LSNs count in `records_received`).
    pub ranges_received: u64,
}

pub struct Replica {
    dir: ReplicaDir,
    state: ReplicaState,
    /// The volume's generation history as this replica follows it.
    history: History,
    /// Shared so a checkpoint can sync it while batches are still being applied.
    image: Arc<Store>,
    /// The applier's journal and how far it may be trimmed (through `applied`).
    retention: Arc<Retention>,
    writer: JournalWriter,
    counters: ReplicaCounters,
    /// Applied to the image but not yet made durable there (`state.applied_lsn` is durable).
    applied_unsynced: u64,
    /// Payload bytes applied since the last checkpoint began.
    unsynced_bytes: u64,
    /// Applied LSN that the last checkpoint begun covers.
    checkpoint_begun_lsn: u64,
    /// While a resync runs: where records and region contents go instead of the image.
    stage: Option<stage::Stage>,
    /// The thread closing the last committed stage (freeing its blocks): joined before a new
    /// stage is sized against the free space.
    closing_stage: Option<std::thread::JoinHandle<()>>,
    /// Chunks the running resync stored so far.
    chunks_stored: u64,
    /// Snapshots taken at markers; every image write goes through them first.
    snapshots: Snapshots,
    /// Snapshots kept (the oldest beyond are deleted when a new one is taken).
    keep_snapshots: usize,
    /// Snapshots taken since the daemon last looked (for group snapshots).
    taken: Vec<SnapshotMeta>,
}

/// The history a sender announced (one of a single generation if it sent none).
fn hello_history(hello: &Hello) -> History {
    history_from_wire(&hello.history).unwrap_or_else(|_| History::first(uuid::Uuid::from_bytes(hello.generation)))
}

const IMAGE: &str = "replica image";
/// The failpoints that inject disk errors into the applier's journal (`applier-journal-eio`,
/// `applier-journal-enospc`).
const JOURNAL_FAULTS: &str = "applier-journal";

impl Replica {
    /// Creates a replica for the volume described by `hello`: a sparse image (or `image`, an
    /// existing file or device of the right size) and an empty journal that continues at the
    /// source's next LSN after `applied_lsn`; in `journal` when the applier keeps replicas'
    /// journals on another filesystem (`applier.toml` `journal_dir`).
    pub fn create(dir: &Path, hello: &Hello, image: Option<&Path>, journal: Option<&ReplicaJournal>) -> Result<Replica, ReplicaError> {
        if let Some(placed) = journal {
            journal::journal_home(placed)?;
        }
        crate::permissions::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let dir = ReplicaDir::new(std::path::absolute(dir).map_err(io(format!("resolve {}", dir.display())))?);
        let image = match image {
            Some(path) => {
                let path = std::path::absolute(path).map_err(io(format!("resolve {}", path.display())))?;
                let size = Store::open(&path, IMAGE)?.size();
                if size != hello.size {
                    return Err(ReplicaError::Rejected(format!("replica image {} is {size} bytes, the volume is {}", path.display(), hello.size)));
                }
                path
            }
            None => {
                let path = dir.default_image();
                Store::create_sparse(&path, hello.size)?;
                path
            }
        };
        let state = ReplicaState {
            format_version: 1,
            volume_uuid: uuid::Uuid::from_bytes(hello.volume_uuid),
            volume_name: hello.volume_name.clone(),
            size: hello.size,
            generation: uuid::Uuid::from_bytes(hello.generation),
            image,
            applied_lsn: 0,
            // Nothing is known about the image yet (it may be empty, a copy, or stale): the
            // first session synchronises it.
            consistency: Consistency::NeedsSync,
            resync: None,
            promotion: None,
            demoted_from: None,
        };
        hello_history(hello).save(&dir.generations()).map_err(|error| ReplicaError::State { path: dir.generations(), message: error.to_string() })?;
        new_journal(&dir, &owner(&dir, &state.volume_name, state.volume_uuid), journal, 1)?;
        state.save(&dir)?;
        Self::open(dir.root())
    }

    /// Opens a replica: journal recovery, then redo of received records not yet applied.
    pub fn open(dir: &Path) -> Result<Replica, ReplicaError> {
        let dir = ReplicaDir::new(dir);
        let mut state = ReplicaState::load(&dir)?;
        if state.follow_move(&dir) {
            // A crash between the move of the directory and this update of the state.
            state.save(&dir)?;
        }
        let history = History::load_or_first(&dir.generations(), state.generation)
            .map_err(|e| ReplicaError::State { path: dir.generations(), message: e.to_string() })?;
        // A journal placed elsewhere must be there and this replica's before anything changes.
        let located =
            placement::check_or_interrupted(&dir.journal(), &owner(&dir, &state.volume_name, state.volume_uuid), RESETTING).map_err(JournalError::from)?;
        let image = Store::open(&state.image, IMAGE)?;
        // Leftovers of a journal replacement a crash interrupted (see `restart_journal`); the
        // old journal moved aside goes only once a journal is in place.
        let _ = std::fs::remove_dir_all(located.beside(NEW));
        if located.segments.exists() {
            let _ = std::fs::remove_dir_all(located.beside(RESETTING));
        }
        let (journal, writer) = if !located.segments.exists() {
            // A crash inside a journal replacement, between moving the old journal aside and
            // moving the new one in. The state was saved first and says where to continue.
            restart_journal(&dir, state.volume_uuid, state.applied_lsn + 1, None)?
        } else {
            let (journal, writer, _report) = Journal::open(&dir.journal(), journal_options(state.volume_uuid))?;
            if journal.synced_lsn() < state.applied_lsn && journal.first_lsn() <= state.applied_lsn {
                // The image is ahead of this journal (a sync completed but the journal reset
                // did not): everything through `applied` is in the image, so continue after it.
                let last = journal.written_lsn();
                drop((journal, writer));
                restart_journal(&dir, state.volume_uuid, state.applied_lsn + 1, Some(last))?
            } else {
                (journal, writer)
            }
        };
        let mut writer = writer;
        writer.set_fault_op(JOURNAL_FAULTS);
        let applied_unsynced = state.applied_lsn;
        let snapshots = Snapshots::open(&dir, &state.volume_name, state.size)?;
        let promoted = state.promotion.is_some();
        let mut replica = Replica {
            retention: Retention::unheld(journal, state.applied_lsn),
            dir,
            state,
            history,
            image: Arc::new(image),
            writer,
            counters: ReplicaCounters::default(),
            applied_unsynced,
            unsynced_bytes: 0,
            checkpoint_begun_lsn: applied_unsynced,
            stage: None,
            closing_stage: None,
            chunks_stored: 0,
            snapshots,
            keep_snapshots: super::snapshot::DEFAULT_KEEP,
            taken: Vec::new(),
        };
        if promoted {
            // The image is (or is becoming) a volume's backing store: nothing more is
            // applied to it from here.
            return Ok(replica);
        }
        replica.finish_or_abandon_resync()?;
        replica.apply()?;
        replica.discard_incomplete_range()?;
        Ok(replica)
    }

    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    pub fn counters(&self) -> ReplicaCounters {
        self.counters
    }

    fn journal(&self) -> &Arc<Journal> {
        self.retention.journal()
    }

    /// Highest LSN durable in the applier's journal.
    pub fn received_lsn(&self) -> u64 {
        self.journal().synced_lsn()
    }

    /// Writes every segment file this replica's journal may have (1 GiB), now rather than as
    /// it first grows (`applier.toml` `preallocate_journals`). For a replica just made: the
    /// initial synchronisation's journal replacement takes them over. Returns how many files
    /// were made.
    pub fn preallocate_journal(&self) -> Result<usize, ReplicaError> {
        journal::preallocate(&self.dir, self.state.volume_uuid)
    }

    /// Replaces the journal by an empty one that continues after `lsn` (`restart_journal`:
    /// its files are kept when that goes forward from the old journal's last LSN). Callers
    /// save the replica's state first.
    fn replace_journal(&mut self, lsn: u64) -> Result<(), ReplicaError> {
        let old_last = self.journal().written_lsn();
        let (journal, writer) = restart_journal(&self.dir, self.state.volume_uuid, lsn + 1, Some(old_last))?;
        self.retention = Retention::unheld(journal, lsn);
        self.writer = writer;
        Ok(())
    }

    pub fn applied_lsn(&self) -> u64 {
        self.state.applied_lsn
    }

    /// Refuses every change once a promote began: the image is becoming (or is) a volume's.
    fn writable(&self) -> Result<(), ReplicaError> {
        match &self.state.promotion {
            Some(promotion) => {
                Err(ReplicaError::Rejected(format!("the replica was promoted to the volume in {}: it takes no more changes", promotion.to.display())))
            }
            None => Ok(()),
        }
    }

    /// The image (for reads beside the applier: a restore).
    pub fn image(&self) -> Arc<Store> {
        self.image.clone()
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Refuses a sender that is not this replica's volume, or whose history this replica
    /// cannot follow (nothing changes then). A sender whose history extends the replica's
    /// (a promoted volume the replica was the source of, say) is followed from now on: the
    /// replica takes its history, and what it lacks comes as records or a resync.
    pub fn check_hello(&mut self, hello: &Hello) -> Result<(), Refusal> {
        let name = self.state.volume_name.clone();
        crate::protocol::wire::check_protocol(hello)?;
        if uuid::Uuid::from_bytes(hello.volume_uuid) != self.state.volume_uuid {
            return Err(Refusal::WrongVolume {
                name,
                expected: self.state.volume_uuid.to_string(),
                got: uuid::Uuid::from_bytes(hello.volume_uuid).to_string(),
            });
        }
        if hello.size != self.state.size {
            return Err(Refusal::WrongSize { name, replica: self.state.size, volume: hello.size });
        }
        let theirs = history_from_wire(&hello.history).map_err(|e| Refusal::Other(format!("the source's generation history is invalid: {e}")))?;
        if theirs.current().id != uuid::Uuid::from_bytes(hello.generation) {
            return Err(Refusal::Other("the source's generation history does not end at its generation".into()));
        }
        if let Some(promotion) = &self.state.promotion {
            let history = self.history.branch(promotion.generation, promotion.branch_lsn, promotion.created_us);
            return Err(Refusal::Promoted(Box::new(crate::protocol::wire::PromotedReplica {
                name,
                to: promotion.to.display().to_string(),
                generation: promotion.generation.to_string(),
                branch_lsn: promotion.branch_lsn,
                last_lsn: promotion.branch_lsn,
                written_bytes: None,
                history: wire_history(&history),
            })));
        }
        let (replica, volume) = (self.history.current().id.to_string(), theirs.current().id.to_string());
        match self.history.relation(self.received_lsn(), &theirs, hello.last_lsn) {
            Relation::Same => Ok(()),
            Relation::Unrelated => Err(Refusal::WrongGeneration { name, replica, volume }),
            Relation::Branched { ours_after: 0, .. } if theirs.contains(self.history.current().id) => {
                tracing::info!(volume = %name, from = %replica, to = %volume, "the source's history extends the replica's: following its generation");
                theirs.save(&self.dir.generations()).map_err(|e| Refusal::Other(format!("save the replica's history: {e}")))?;
                self.state.generation = theirs.current().id;
                self.state.save(&self.dir).map_err(|e| Refusal::Other(format!("save the replica's state: {e}")))?;
                self.history = theirs;
                Ok(())
            }
            Relation::Branched { common_lsn, ours_after, theirs_after } if theirs_after == 0 || self.history.contains(theirs.current().id) => {
                Err(Refusal::Stale { name, replica, volume, common_lsn, replica_after: ours_after })
            }
            Relation::Branched { common_lsn, ours_after, theirs_after } => {
                Err(Refusal::Diverged { name, replica, volume, common_lsn, replica_after: ours_after, volume_after: theirs_after })
            }
        }
    }

    /// Makes a batch durable in the applier's journal and returns the new `received` LSN.
    /// The whole batch is checked first; a bad one changes nothing.
    pub fn receive(&mut self, records: &[ReceivedRecord]) -> Result<u64, ReplicaError> {
        self.writable()?;
        if self.state.needs_sync() {
            return Err(ReplicaError::Rejected("the replica needs an initial synchronisation before it can take journal records".into()));
        }
        let received = self.received_lsn();
        // Records already received (resent after a reconnect) are skipped, and counted.
        let fresh: Vec<&ReceivedRecord> = records.iter().filter(|r| r.lsn > received).collect();
        self.counters.records_duplicated += (records.len() - fresh.len()) as u64;
        for (expected, record) in (received + 1..).zip(&fresh) {
            if record.lsn != expected {
                return Err(ReplicaError::Rejected(format!("expected LSN {expected}, got {} (a gap)", record.lsn)));
            }
            if !record.extent.fits(self.state.size) {
                return Err(ReplicaError::Rejected(format!(
                    "LSN {}: offset {} length {} is outside the replica ({} bytes)",
                    record.lsn, record.extent.offset, record.extent.length, self.state.size
                )));
            }
        }
        // The journal must continue exactly where the source's numbering is: the records'
        // LSNs come from the network, the journal's from its own count.
        if let Some(first) = fresh.first() {
            if self.writer.next_lsn() != first.lsn {
                return Err(ReplicaError::Rejected(format!(
                    "LSN {} does not continue the applier's journal, whose next LSN is {} (received through {received})",
                    first.lsn,
                    self.writer.next_lsn()
                )));
            }
        }
        for record in &fresh {
            let lsn = match self.writer.append_parts(record.kind, record.extent, record.payload.parts(), record.flags) {
                Ok(lsn) => lsn,
                Err(AppendError::JournalFull) => return Err(ReplicaError::JournalFull),
                Err(AppendError::Failed(error)) => return Err(error.into()),
            };
            if lsn != record.lsn {
                // Checked above for the batch's start, so only a journal that numbers its
                // records unlike the source could get here; what is staged is not committed.
                return Err(ReplicaError::Journal(JournalError::Corrupt(format!("the applier's journal gave LSN {lsn} to the source's LSN {}", record.lsn))));
            }
        }
        self.writer.commit(true)?;
        self.counters.records_received += fresh.len() as u64;
        self.counters.bytes_received += fresh.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        Ok(self.received_lsn())
    }

    /// Applies every received record not yet applied, in LSN order, makes the image durable,
    /// advances `applied`, and trims the journal. Returns the applied LSN.
    pub fn apply(&mut self) -> Result<u64, ReplicaError> {
        self.apply_unsynced()?;
        self.checkpoint()
    }

    /// Writes every received record not yet applied to the image, in LSN order, without
    /// making the image durable: `applied` does not move until [`Replica::checkpoint`]. (A crash
    /// meanwhile redoes them from the journal, which keeps them until then.) Returns the LSN
    /// applied so far.
    pub fn apply_unsynced(&mut self) -> Result<u64, ReplicaError> {
        self.writable()?;
        let target = self.received_lsn();
        if self.applied_unsynced >= target {
            return Ok(self.applied_unsynced);
        }
        let mut reader = JournalReader::new(self.journal().clone(), self.applied_unsynced + 1)?;
        while let Some(record) = reader.next_record()? {
            let h = record.header;
            match h.kind {
                // A range is applied whole or not at all: not before all of it is received.
                RecordKind::Range => {
                    if !self.apply_range_record(h.lsn, &record.payload, target)? {
                        break;
                    }
                }
                RecordKind::Covered if h.lsn <= self.applied_unsynced => {}
                RecordKind::Covered => {
                    return Err(ReplicaError::Journal(JournalError::Corrupt(format!("LSN {} is covered by a range whose record is missing", h.lsn))));
                }
                _ => self.apply_one(h.lsn, h.kind, h.extent(), std::slice::from_ref(&record.payload))?,
            }
        }
        Ok(self.applied_unsynced)
    }

    /// Like [`Replica::apply_unsynced`], for the batch [`Replica::receive`] just made durable:
    /// its records are applied from memory rather than read back from the journal. Records
    /// already applied are skipped; anything received but not in the batch (a gap) is read
    /// from the journal. Returns the LSN applied so far.
    pub fn apply_received(&mut self, records: &[ReceivedRecord]) -> Result<u64, ReplicaError> {
        let received = self.received_lsn();
        if self.stage.is_none() && self.snapshots.preserving() {
            // What the records up to the next marker change is preserved in one step (one
            // sync per snapshot store) rather than record by record.
            let writes: Vec<(u64, Extent)> = records
                .iter()
                .filter(|r| r.lsn > self.applied_unsynced && r.lsn <= received)
                .take_while(|r| r.kind != RecordKind::Marker)
                .map(|r| (r.lsn, r.extent))
                .collect();
            self.snapshots.preserve(&self.image, &writes);
        }
        for record in records {
            if record.lsn <= self.applied_unsynced {
                continue;
            }
            // Journal first: never apply what is not durable there (nor out of order).
            if record.lsn > received || record.lsn != self.applied_unsynced + 1 {
                break;
            }
            self.apply_one(record.lsn, record.kind, record.extent, record.payload.parts())?;
        }
        self.apply_unsynced()
    }

    fn apply_one(&mut self, lsn: u64, kind: RecordKind, extent: Extent, payload: &[bytes::Bytes]) -> Result<(), ReplicaError> {
        if kind == RecordKind::Marker {
            self.take_snapshot(lsn, payload);
        } else if let Some(stage) = self.stage.as_mut() {
            // A resync: the image stays the old consistent state until the stage commits.
            stage.apply(&self.image, kind, extent, payload)?;
        } else {
            self.snapshots.preserve(&self.image, &[(lsn, extent)]);
            // The error's context is formatted only on failure: this runs once per record.
            self.image
                .apply(kind, extent, payload)
                .map_err(|source| ReplicaError::Io { context: format!("apply LSN {lsn} to {}", self.state.image.display()), source })?;
        }
        self.applied_unsynced = lsn;
        self.unsynced_bytes += payload.iter().map(|part| part.len() as u64).sum::<u64>();
        self.counters.records_applied += 1;
        Ok(())
    }

    /// Records and payload bytes applied and not yet covered by a checkpoint (finished or
    /// in progress).
    pub fn unsynced(&self) -> (u64, u64) {
        (self.applied_unsynced - self.state.applied_lsn.max(self.checkpoint_begun_lsn), self.unsynced_bytes)
    }

    /// Makes what [`Replica::apply_unsynced`] wrote durable: image sync, `applied` advanced
    /// and saved, journal trimmed. Returns the applied LSN.
    pub fn checkpoint(&mut self) -> Result<u64, ReplicaError> {
        let Some(pending) = self.begin_checkpoint() else { return Ok(self.state.applied_lsn) };
        pending.sync_image()?;
        self.finish_checkpoint(pending)
    }

    /// The first half of a checkpoint that lets batches go on being applied while the image
    /// syncs (the slow part): what the sync will cover. `None` when nothing is unsynced.
    pub fn begin_checkpoint(&mut self) -> Option<PendingCheckpoint> {
        if self.stage.is_some() {
            // Records applied to the stage need not stay in the journal: a resync that does
            // not complete is discarded whole (the source's dirty map still covers it).
            self.trim_staged();
            return None;
        }
        if self.applied_unsynced <= self.state.applied_lsn {
            return None;
        }
        let pending = PendingCheckpoint { applied_lsn: self.applied_unsynced, image: self.image.clone() };
        self.unsynced_bytes = 0;
        self.checkpoint_begun_lsn = self.applied_unsynced;
        Some(pending)
    }

    /// The second half: after [`PendingCheckpoint::sync_image`], `applied` advances to what the
    /// sync covered and is saved; the journal is trimmed through it. Returns the applied LSN.
    pub fn finish_checkpoint(&mut self, pending: PendingCheckpoint) -> Result<u64, ReplicaError> {
        if pending.applied_lsn <= self.state.applied_lsn {
            return Ok(self.state.applied_lsn);
        }
        self.state.applied_lsn = pending.applied_lsn;
        self.state.settle();
        self.state.save(&self.dir)?;
        self.retention.checkpointed(self.state.applied_lsn)?;
        Ok(self.state.applied_lsn)
    }

    /// How full the replica's journal is (0.0 to 1.0): received but not yet checkpointed.
    pub fn journal_fill(&self) -> f64 {
        let usage = self.journal().usage();
        usage.used_bytes as f64 / usage.capacity_bytes.max(1) as f64
    }
}

/// A checkpoint in progress (see [`Replica::begin_checkpoint`]).
pub struct PendingCheckpoint {
    applied_lsn: u64,
    image: Arc<Store>,
}

impl PendingCheckpoint {
    /// Makes every write applied before the checkpoint began durable in the image. Needs no
    /// access to the replica, so it may run while more batches are applied.
    pub fn sync_image(&self) -> Result<(), ReplicaError> {
        self.image.sync_data().map_err(io(format!("sync {}", self.image.path().display())))
    }
}
