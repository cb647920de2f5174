//! The target half of a synchronisation (see `docs/replication-protocol.md`): the replica
//! compares the source's chunk hashes with its own, takes the chunks that differ, and then
//! continues its journal after the synchronisation's base LSN.

use super::{io, Consistency, Replica, ReplicaError};
use crate::extent::Extent;
use crate::protocol::wire::{SYNC_CHUNK, SYNC_HASH_BATCH};

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

    /// BLAKE3 of the image's `buffer.len()` bytes at `offset` (read into `buffer`), as the
    /// source hashes its chunks. A hole is zeros: hashed without reading (nor filling the
    /// page cache with it).
    pub(super) fn image_hash(&self, offset: u64, buffer: &mut [u8]) -> Result<[u8; 32], ReplicaError> {
        let hole = self.image.read_for_scan(buffer, offset, true).map_err(io(format!("read {}", self.state.image.display())))?;
        Ok(crate::store::chunk_hash(buffer, hole))
    }

    /// A synchronisation begins: the image stops being a consistent state of the source.
    pub fn sync_start(&mut self) -> Result<(), ReplicaError> {
        self.writable()?;
        self.checkpoint()?;
        self.state.consistency = Consistency::NeedsSync;
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
            if &self.image_hash(offset, &mut buffer[..length])? != hash {
                differ.push(chunk);
            }
        }
        Ok(differ)
    }

    /// Writes one chunk from the source (zeros when `zero`).
    pub fn write_chunk(&mut self, chunk: u64, zero: bool, data: &[u8]) -> Result<(), ReplicaError> {
        self.writable()?;
        if !self.state.needs_sync() {
            return Err(ReplicaError::Rejected("a chunk arrived outside a synchronisation".into()));
        }
        let (offset, length) = self.chunk_range(chunk)?;
        self.counters.bytes_received += data.len() as u64;
        self.snapshots.preserve(&self.image, &[(u64::MAX, Extent::new(offset, length as u64))]);
        if zero {
            if !data.is_empty() {
                return Err(ReplicaError::Rejected(format!("zero chunk {chunk} carries {} bytes", data.len())));
            }
            self.image.zero(Extent::new(offset, length as u64), true).map_err(io(format!("zero chunk {chunk} of {}", self.state.image.display())))
        } else {
            if data.len() != length {
                return Err(ReplicaError::Rejected(format!("chunk {chunk} has {} bytes, expected {length}", data.len())));
            }
            self.image.write_bulk_at(data, offset).map_err(io(format!("write chunk {chunk} to {}", self.state.image.display())))
        }
    }

    /// Every chunk is copied: make the image durable, continue the journal after `base_lsn`,
    /// and become consistent once `consistent_lsn` is applied.
    pub fn sync_done(&mut self, base_lsn: u64, consistent_lsn: u64) -> Result<(), ReplicaError> {
        self.writable()?;
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
        self.state.consistency = Consistency::Converging { at: consistent_lsn };
        self.state.settle();
        // State first: `open` repairs a journal that is behind the state or missing.
        self.state.save(&self.dir)?;
        self.replace_journal(base_lsn)
    }
}
