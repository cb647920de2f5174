//! A replica on the applier: the destination image, the applier's own journal of received
//! records (the same journal module as a volume's, continuing the source's LSNs) and its
//! checkpoints. No network here: the applier daemon feeds it decoded batches.
//!
//! `receive` makes a batch durable in the journal (the `received` checkpoint, after which
//! the source may trim); `apply` applies received records to the image strictly in LSN order,
//! makes them durable, and advances `applied`. After a crash, opening redoes the journal from
//! `applied` (applying is idempotent).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::wire::{Hello, ReceivedRecord, Refusal, SYNC_CHUNK, SYNC_HASH_BATCH};
use std::os::unix::fs::FileExt;
use crate::journal::{AppendError, Journal, JournalError, JournalOptions, JournalReader, JournalWriter};

pub const STATE_FILE: &str = "replica.json";
pub const JOURNAL_DIR: &str = "journal";
pub const DEFAULT_IMAGE: &str = "data.img";

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    /// Input from the network that does not fit this replica; nothing was changed.
    #[error("rejected batch: {0}")]
    Rejected(String),
    #[error("the applier journal is full: records must be applied before more are received")]
    JournalFull,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let context = context.into();
    move |source| ReplicaError::Io { context, source }
}

/// What the applier knows about one replica, replaced atomically at every checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub format_version: u32,
    pub volume_uuid: uuid::Uuid,
    pub volume_name: String,
    pub size: u64,
    pub generation: uuid::Uuid,
    pub image: PathBuf,
    /// Every record through this LSN is durable in the image.
    pub applied_lsn: u64,
    /// False while the image is not yet a consistent past state of the source (initial sync).
    pub consistent: bool,
    /// After an initial synchronisation: the image becomes consistent once `applied_lsn`
    /// reaches this LSN (the chunks were read while writes went on; replaying the journal
    /// written meanwhile completes them). `None` with `consistent == false`: a sync is needed.
    #[serde(default)]
    pub consistent_lsn: Option<u64>,
}

impl ReplicaState {
    /// True until an initial synchronisation has copied the device (new replicas, and ones
    /// whose synchronisation was interrupted).
    pub fn needs_sync(&self) -> bool {
        !self.consistent && self.consistent_lsn.is_none()
    }
}

impl ReplicaState {
    fn load(dir: &Path) -> Result<Self, ReplicaError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| ReplicaError::State { path, message: e.to_string() })
    }

    fn save(&self, dir: &Path) -> Result<(), ReplicaError> {
        let path = dir.join(STATE_FILE);
        crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(self).expect("state serialises")).map_err(io(format!("write {}", path.display())))
    }
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
}

pub struct Replica {
    dir: PathBuf,
    state: ReplicaState,
    /// Shared so a checkpoint can sync it while batches are still being applied.
    image: Arc<File>,
    image_is_device: bool,
    journal: Arc<Journal>,
    writer: JournalWriter,
    counters: ReplicaCounters,
    /// Applied to the image but not yet made durable there (`state.applied_lsn` is durable).
    applied_unsynced: u64,
    /// Payload bytes applied since the last checkpoint began.
    unsynced_bytes: u64,
    /// Applied LSN that the last checkpoint begun covers.
    checkpoint_begun_lsn: u64,
}

/// Journal sizing for replicas: room for bursts while the image catches up.
fn journal_options(uuid: uuid::Uuid) -> JournalOptions {
    JournalOptions { segment_size: 64 << 20, capacity: 1 << 30, journal_id: *uuid.as_bytes() }
}

impl Replica {
    /// Creates a replica for the volume described by `hello`: a sparse image (or `image`, an
    /// existing file or device of the right size) and an empty journal that continues at the
    /// source's next LSN after `applied_lsn`.
    pub fn create(dir: &Path, hello: &Hello, image: Option<&Path>) -> Result<Replica, ReplicaError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let dir = &std::path::absolute(dir).map_err(io(format!("resolve {}", dir.display())))?;
        let image = match image {
            Some(path) => {
                let path = &std::path::absolute(path).map_err(io(format!("resolve {}", path.display())))?;
                let file = File::open(path).map_err(io(format!("open replica image {}", path.display())))?;
                let size = crate::fsutil::storage_size(&file).map_err(io(format!("size of {}", path.display())))?;
                if size != hello.size {
                    return Err(ReplicaError::Rejected(format!("replica image {} is {size} bytes, the volume is {}", path.display(), hello.size)));
                }
                path.to_path_buf()
            }
            None => {
                let path = dir.join(DEFAULT_IMAGE);
                let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(format!("create {}", path.display())))?;
                file.set_len(hello.size).map_err(io(format!("size {}", path.display())))?;
                file.sync_all().map_err(io(format!("sync {}", path.display())))?;
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
            consistent: false,
            consistent_lsn: None,
        };
        Journal::create_at(&dir.join(JOURNAL_DIR), journal_options(state.volume_uuid), 1)?;
        state.save(dir)?;
        Self::open(dir)
    }

    /// Opens a replica: journal recovery, then redo of received records not yet applied.
    pub fn open(dir: &Path) -> Result<Replica, ReplicaError> {
        let state = ReplicaState::load(dir)?;
        let image = std::fs::OpenOptions::new().read(true).write(true).open(&state.image).map_err(io(format!("open replica image {}", state.image.display())))?;
        let journal_dir = dir.join(JOURNAL_DIR);
        let (journal, writer) = if !journal_dir.exists() {
            // A crash inside `sync_done` between moving the old journal aside and creating the new.
            restart_journal(dir, state.volume_uuid, state.applied_lsn + 1)?
        } else {
            let (journal, writer, _report) = Journal::open(&journal_dir, journal_options(state.volume_uuid))?;
            if journal.synced_lsn() < state.applied_lsn && journal.first_lsn() <= state.applied_lsn {
                // The image is ahead of this journal (a sync completed but the journal reset
                // did not): everything through `applied` is in the image, so continue after it.
                drop((journal, writer));
                restart_journal(dir, state.volume_uuid, state.applied_lsn + 1)?
            } else {
                (journal, writer)
            }
        };
        let applied_unsynced = state.applied_lsn;
        let image_is_device = crate::fsutil::is_block_device(&image).unwrap_or(false);
        let mut replica = Replica {
            dir: dir.to_path_buf(),
            state,
            image: Arc::new(image),
            image_is_device,
            journal,
            writer,
            counters: ReplicaCounters::default(),
            applied_unsynced,
            unsynced_bytes: 0,
            checkpoint_begun_lsn: applied_unsynced,
        };
        replica.apply()?;
        Ok(replica)
    }

    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    pub fn counters(&self) -> ReplicaCounters {
        self.counters
    }

    /// Highest LSN durable in the applier's journal.
    pub fn received_lsn(&self) -> u64 {
        self.journal.synced_lsn()
    }

    pub fn applied_lsn(&self) -> u64 {
        self.state.applied_lsn
    }

    /// Refuses a sender that is not this replica's volume (nothing changes either way).
    pub fn check_hello(&self, hello: &Hello) -> Result<(), Refusal> {
        let name = self.state.volume_name.clone();
        if hello.protocol != super::wire::PROTOCOL_VERSION {
            return Err(Refusal::Protocol(hello.protocol));
        }
        if uuid::Uuid::from_bytes(hello.volume_uuid) != self.state.volume_uuid {
            return Err(Refusal::WrongVolume { name, expected: self.state.volume_uuid.to_string(), got: uuid::Uuid::from_bytes(hello.volume_uuid).to_string() });
        }
        if hello.size != self.state.size {
            return Err(Refusal::WrongSize { name, replica: self.state.size, volume: hello.size });
        }
        if uuid::Uuid::from_bytes(hello.generation) != self.state.generation {
            return Err(Refusal::WrongGeneration { name, replica: self.state.generation.to_string(), volume: uuid::Uuid::from_bytes(hello.generation).to_string() });
        }
        Ok(())
    }

    /// Makes a batch durable in the applier's journal and returns the new `received` LSN.
    /// The whole batch is checked first; a bad one changes nothing.
    pub fn receive(&mut self, records: &[ReceivedRecord]) -> Result<u64, ReplicaError> {
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
            let end = record.offset.checked_add(record.length);
            if end.is_none_or(|end| end > self.state.size) {
                return Err(ReplicaError::Rejected(format!(
                    "LSN {}: offset {} length {} is outside the replica ({} bytes)",
                    record.lsn, record.offset, record.length, self.state.size
                )));
            }
        }
        for record in &fresh {
            let lsn = match self.writer.append_parts(record.kind, record.offset, record.length, record.payload.parts(), record.flags) {
                Ok(lsn) => lsn,
                Err(AppendError::JournalFull) => return Err(ReplicaError::JournalFull),
                Err(AppendError::Failed(error)) => return Err(error.into()),
            };
            debug_assert_eq!(lsn, record.lsn);
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
        let target = self.received_lsn();
        if self.applied_unsynced >= target {
            return Ok(self.applied_unsynced);
        }
        let mut reader = JournalReader::new(self.journal.clone(), self.applied_unsynced + 1)?;
        while let Some(record) = reader.next_record()? {
            let h = record.header;
            self.apply_one(h.lsn, h.kind, h.offset, h.length, std::slice::from_ref(&record.payload))?;
        }
        Ok(self.applied_unsynced)
    }

    /// Like [`Replica::apply_unsynced`], for the batch [`Replica::receive`] just made durable:
    /// its records are applied from memory rather than read back from the journal. Records
    /// already applied are skipped; anything received but not in the batch (a gap) is read
    /// from the journal. Returns the LSN applied so far.
    pub fn apply_received(&mut self, records: &[ReceivedRecord]) -> Result<u64, ReplicaError> {
        let received = self.received_lsn();
        for record in records {
            if record.lsn <= self.applied_unsynced {
                continue;
            }
            // Journal first: never apply what is not durable there (nor out of order).
            if record.lsn > received || record.lsn != self.applied_unsynced + 1 {
                break;
            }
            self.apply_one(record.lsn, record.kind, record.offset, record.length, record.payload.parts())?;
        }
        self.apply_unsynced()
    }

    fn apply_one(&mut self, lsn: u64, kind: crate::journal::RecordKind, offset: u64, length: u64, payload: &[bytes::Bytes]) -> Result<(), ReplicaError> {
        // The error's context is formatted only on failure: this runs once per record.
        crate::journal::apply_record_parts(&self.image, self.image_is_device, kind, offset, length, payload)
            .map_err(|source| ReplicaError::Io { context: format!("apply LSN {lsn} to {}", self.state.image.display()), source })?;
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
        if self.applied_unsynced <= self.state.applied_lsn {
            return None;
        }
        let pending = PendingCheckpoint { applied_lsn: self.applied_unsynced, image: self.image.clone(), path: self.state.image.clone() };
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
        self.settle_consistency();
        self.state.save(&self.dir)?;
        self.journal.trim_through(self.state.applied_lsn)?;
        Ok(self.state.applied_lsn)
    }

    /// How full the replica's journal is (0.0 to 1.0): received but not yet checkpointed.
    pub fn journal_fill(&self) -> f64 {
        let usage = self.journal.usage();
        usage.used_bytes as f64 / usage.capacity_bytes.max(1) as f64
    }
}

/// A checkpoint in progress (see [`Replica::begin_checkpoint`]).
pub struct PendingCheckpoint {
    applied_lsn: u64,
    image: Arc<File>,
    path: PathBuf,
}

impl PendingCheckpoint {
    /// Makes every write applied before the checkpoint began durable in the image. Needs no
    /// access to the replica, so it may run while more batches are applied.
    pub fn sync_image(&self) -> Result<(), ReplicaError> {
        self.image.sync_data().map_err(io(format!("sync {}", self.path.display())))
    }
}

/// Replaces a replica's journal by an empty one whose first record will be `first_lsn`: the
/// old one (if any) is moved aside first, so a crash leaves either it or nothing, never a
/// half-made journal, and `open` handles both.
fn restart_journal(dir: &Path, volume_uuid: uuid::Uuid, first_lsn: u64) -> Result<(Arc<Journal>, JournalWriter), ReplicaError> {
    let journal_dir = dir.join(JOURNAL_DIR);
    let aside = dir.join("journal.resetting");
    let _ = std::fs::remove_dir_all(&aside);
    if journal_dir.exists() {
        std::fs::rename(&journal_dir, &aside).map_err(io(format!("move aside {}", journal_dir.display())))?;
    }
    Journal::create_at(&journal_dir, journal_options(volume_uuid), first_lsn)?;
    let (journal, writer, _) = Journal::open(&journal_dir, journal_options(volume_uuid))?;
    let _ = std::fs::remove_dir_all(&aside);
    Ok((journal, writer))
}

/// Initial synchronisation (see `docs/replication-protocol.md`).
impl Replica {
    fn chunk_count(&self) -> u64 {
        self.state.size.div_ceil(SYNC_CHUNK)
    }

    fn chunk_range(&self, chunk: u64) -> Result<(u64, usize), ReplicaError> {
        if chunk >= self.chunk_count() {
            return Err(ReplicaError::Rejected(format!("chunk {chunk} is outside the replica ({} chunks)", self.chunk_count())));
        }
        let offset = chunk * SYNC_CHUNK;
        Ok((offset, (self.state.size - offset).min(SYNC_CHUNK) as usize))
    }

    /// A synchronisation begins: the image stops being a consistent state of the source.
    pub fn sync_start(&mut self) -> Result<(), ReplicaError> {
        self.checkpoint()?;
        self.state.consistent = false;
        self.state.consistent_lsn = None;
        self.state.save(&self.dir)
    }

    /// Which of the chunks `first_chunk..` differ from the source's `hashes`.
    pub fn differing_chunks(&self, first_chunk: u64, hashes: &[[u8; 32]]) -> Result<Vec<u64>, ReplicaError> {
        if hashes.len() > SYNC_HASH_BATCH {
            return Err(ReplicaError::Rejected(format!("{} hashes in one batch (at most {SYNC_HASH_BATCH})", hashes.len())));
        }
        let mut buffer = vec![0u8; SYNC_CHUNK as usize];
        let mut differ = Vec::new();
        for (index, hash) in hashes.iter().enumerate() {
            let chunk = first_chunk.checked_add(index as u64).ok_or_else(|| ReplicaError::Rejected("chunk index overflows".into()))?;
            let (offset, length) = self.chunk_range(chunk)?;
            // A hole is zeros: hashed without reading (nor filling the page cache with it).
            let ours = if !self.image_is_device && crate::fsutil::is_hole(&self.image, offset, length as u64) {
                super::wire::zero_chunk_hash(length)
            } else {
                self.image.read_exact_at(&mut buffer[..length], offset).map_err(io(format!("read {}", self.state.image.display())))?;
                crate::fsutil::drop_from_cache(&self.image, offset, length as u64);
                *blake3::hash(&buffer[..length]).as_bytes()
            };
            if &ours != hash {
                differ.push(chunk);
            }
        }
        Ok(differ)
    }

    /// Writes one chunk from the source (zeros when `zero`).
    pub fn write_chunk(&mut self, chunk: u64, zero: bool, data: &[u8]) -> Result<(), ReplicaError> {
        if self.state.consistent || self.state.consistent_lsn.is_some() {
            return Err(ReplicaError::Rejected("a chunk arrived outside a synchronisation".into()));
        }
        let (offset, length) = self.chunk_range(chunk)?;
        self.counters.bytes_received += data.len() as u64;
        if zero {
            if !data.is_empty() {
                return Err(ReplicaError::Rejected(format!("zero chunk {chunk} carries {} bytes", data.len())));
            }
            crate::fsutil::zero_range(&self.image, offset, length as u64, true, self.image_is_device).map_err(io(format!("zero chunk {chunk} of {}", self.state.image.display())))
        } else {
            if data.len() != length {
                return Err(ReplicaError::Rejected(format!("chunk {chunk} has {} bytes, expected {length}", data.len())));
            }
            self.image.write_all_at(data, offset).map_err(io(format!("write chunk {chunk} to {}", self.state.image.display())))
        }
    }

    /// Every chunk is copied: make the image durable, continue the journal after `base_lsn`,
    /// and become consistent once `consistent_lsn` is applied.
    pub fn sync_done(&mut self, base_lsn: u64, consistent_lsn: u64) -> Result<(), ReplicaError> {
        if !self.state.needs_sync() {
            return Err(ReplicaError::Rejected("SyncDone without a synchronisation in progress".into()));
        }
        if consistent_lsn < base_lsn {
            return Err(ReplicaError::Rejected(format!("consistent LSN {consistent_lsn} is before the base LSN {base_lsn}")));
        }
        self.image.sync_all().map_err(io(format!("sync {}", self.state.image.display())))?;
        self.state.applied_lsn = base_lsn;
        self.applied_unsynced = base_lsn;
        self.checkpoint_begun_lsn = base_lsn;
        self.unsynced_bytes = 0;
        self.state.consistent_lsn = Some(consistent_lsn);
        self.settle_consistency();
        // State first: `open` repairs a journal that is behind the state or missing.
        self.state.save(&self.dir)?;
        let (journal, writer) = restart_journal(&self.dir, self.state.volume_uuid, base_lsn + 1)?;
        self.journal = journal;
        self.writer = writer;
        Ok(())
    }

    fn settle_consistency(&mut self) {
        if let Some(target) = self.state.consistent_lsn {
            if self.state.applied_lsn >= target {
                self.state.consistent = true;
                self.state.consistent_lsn = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::RecordKind;

    fn hello(size: u64) -> Hello {
        Hello { protocol: super::super::wire::PROTOCOL_VERSION, volume_uuid: [4; 16], volume_name: "vol0".into(), size, generation: [5; 16], first_lsn: 1, last_lsn: 0 }
    }

    fn write(lsn: u64, offset: u64, byte: u8, len: usize) -> ReceivedRecord {
        ReceivedRecord { lsn, kind: RecordKind::Write, flags: 0, offset, length: len as u64, timestamp_us: 0, payload: vec![byte; len].into() }
    }

    /// A new 1 MiB replica past its (empty) initial synchronisation: it takes records.
    fn synced_replica(dir: &Path) -> Replica {
        let mut replica = Replica::create(dir, &hello(1 << 20), None).unwrap();
        replica.sync_start().unwrap();
        replica.sync_done(0, 0).unwrap();
        replica
    }

    #[test]
    fn receive_apply_and_recover() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let mut replica = Replica::create(&dir, &hello(1 << 20), None).unwrap();
        let refused = replica.receive(&[write(1, 0, 1, 4096)]).unwrap_err();
        assert!(refused.to_string().contains("initial synchronisation"), "{refused}");
        replica.sync_start().unwrap();
        replica.sync_done(0, 0).unwrap();
        assert!(replica.state().consistent);
        assert_eq!(replica.receive(&[write(1, 0, 1, 4096), write(2, 4096, 2, 4096)]).unwrap(), 2);
        // A resend after reconnect: duplicates skipped and counted.
        assert_eq!(replica.receive(&[write(2, 4096, 2, 4096), write(3, 0, 3, 512)]).unwrap(), 3);
        assert_eq!(replica.counters().records_duplicated, 1);
        let discard = ReceivedRecord { lsn: 4, kind: RecordKind::Discard, flags: 0, offset: 4096, length: 4096, timestamp_us: 0, payload: Default::default() };
        replica.receive(&[discard]).unwrap();
        assert_eq!(replica.applied_lsn(), 0, "receiving does not apply");
        drop(replica);
        // Crash before applying: reopening redoes from the journal.
        let replica = Replica::open(&dir).unwrap();
        assert_eq!(replica.applied_lsn(), 4);
        let image = std::fs::read(dir.join(DEFAULT_IMAGE)).unwrap();
        assert_eq!(&image[..512], &[3u8; 512][..]);
        assert_eq!(&image[512..4096], &[1u8; 3584][..]);
        assert!(image[4096..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_payload_in_pieces_is_journaled_and_applied_whole() {
        use super::super::wire::{self, Frame};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let mut replica = synced_replica(&dir);
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
        let header = crate::journal::RecordHeader { kind: RecordKind::Write, flags: 0, lsn: 1, offset: 8192, length: 12288, payload_len: 12288, synced_lsn: 0, timestamp_us: 0 };
        let mut frame = wire::encode_batch_header(&[(header, &data[..])]);
        frame.extend_from_slice(&data);
        // As QUIC may deliver it: the payload spans three chunks.
        let body = bytes::Bytes::from(frame).slice(4..);
        let chunks = vec![body.slice(..1000), body.slice(1000..9000), body.slice(9000..)];
        let Frame::Records(records) = wire::decode_frame(chunks).unwrap() else { panic!("records expected") };
        assert_eq!(records[0].payload.parts().len(), 3);
        assert_eq!(replica.receive(&records).unwrap(), 1);
        let journaled = crate::journal::JournalReader::new(replica.journal.clone(), 1).unwrap().next_record().unwrap().unwrap();
        assert_eq!(journaled.payload, &data[..], "journaled whole (and its CRC verified on reading)");
        replica.apply_received(&records).unwrap();
        replica.checkpoint().unwrap();
        let image = std::fs::read(dir.join(DEFAULT_IMAGE)).unwrap();
        assert_eq!(&image[8192..8192 + 12288], &data[..], "applied whole, in order");
        assert!(image[..8192].iter().chain(&image[8192 + 12288..]).all(|&b| b == 0));
    }

    #[test]
    fn bad_batches_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let mut replica = synced_replica(&dir);
        replica.receive(&[write(1, 0, 1, 4096)]).unwrap();
        let gap = replica.receive(&[write(3, 0, 9, 4096)]).unwrap_err();
        assert!(gap.to_string().contains("expected LSN 2"), "{gap}");
        let past_end = replica.receive(&[write(2, 4096, 9, 100), write(3, (1 << 20) - 10, 9, 100)]).unwrap_err();
        assert!(past_end.to_string().contains("outside the replica"), "{past_end}");
        assert_eq!(replica.received_lsn(), 1, "the partly good batch was not taken either");
        replica.apply().unwrap();
        let image = std::fs::read(dir.join(DEFAULT_IMAGE)).unwrap();
        assert!(image[4096..].iter().all(|&b| b == 0), "no byte of a rejected batch reached the image");

        let mut wrong = hello(1 << 20);
        wrong.volume_uuid = [9; 16];
        assert!(matches!(replica.check_hello(&wrong), Err(Refusal::WrongVolume { .. })));
        assert!(matches!(replica.check_hello(&hello(2 << 20)), Err(Refusal::WrongSize { .. })));
        let mut generation = hello(1 << 20);
        generation.generation = [1; 16];
        assert!(matches!(replica.check_hello(&generation), Err(Refusal::WrongGeneration { .. })));
        replica.check_hello(&hello(1 << 20)).unwrap();
    }

    #[test]
    fn sync_compares_copies_and_continues_the_journal_after_the_base() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let size = 3 * SYNC_CHUNK + 4096;
        let mut replica = Replica::create(&dir, &hello(size), None).unwrap();
        assert!(replica.state().needs_sync());
        replica.sync_start().unwrap();
        let zero_hash = *blake3::hash(&vec![0u8; SYNC_CHUNK as usize]).as_bytes();
        let tail_zero_hash = *blake3::hash(&[0u8; 4096]).as_bytes();
        let data = vec![7u8; SYNC_CHUNK as usize];
        let hashes = [zero_hash, *blake3::hash(&data).as_bytes(), zero_hash, tail_zero_hash];
        assert_eq!(replica.differing_chunks(0, &hashes).unwrap(), vec![1]);
        assert!(replica.differing_chunks(3, &hashes[..2]).is_err(), "chunk 4 is past the end");
        assert!(replica.write_chunk(1, false, &data[..100]).is_err(), "short chunk refused");
        assert!(replica.write_chunk(9, false, &data).is_err(), "chunk past the end refused");
        replica.write_chunk(1, false, &data).unwrap();
        assert!(replica.differing_chunks(0, &hashes).unwrap().is_empty());
        // Writes went on at the source during the sync: consistent only after LSN 12.
        replica.sync_done(10, 12).unwrap();
        assert!(!replica.state().consistent && !replica.state().needs_sync());
        assert_eq!((replica.received_lsn(), replica.applied_lsn()), (10, 10));
        replica.receive(&[write(11, 0, 1, 4096)]).unwrap();
        replica.apply().unwrap();
        assert!(!replica.state().consistent);
        drop(replica);
        let mut replica = Replica::open(&dir).unwrap();
        assert_eq!(replica.received_lsn(), 11, "the reset journal survives a restart");
        replica.receive(&[write(12, 4096, 2, 4096)]).unwrap();
        replica.apply().unwrap();
        assert!(replica.state().consistent);
        let image = std::fs::read(dir.join(DEFAULT_IMAGE)).unwrap();
        assert_eq!(&image[SYNC_CHUNK as usize..2 * SYNC_CHUNK as usize], &data[..]);
        assert_eq!(&image[..4096], &[1u8; 4096][..]);
    }
}
