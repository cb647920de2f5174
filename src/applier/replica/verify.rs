//! The replica's half of an online verify (`mirror verify`): the source sends the hashes of
//! its chunks as they stand after record n, in the stream right after that record; records
//! are applied in LSN order as they arrive, so when the message is handled the image is the
//! source's state at exactly n, and the same chunks are hashed here.

use super::{Replica, ReplicaError};
use crate::protocol::wire::VERIFY_HASH_BATCH;

/// Verify chunk sizes accepted: from one dirty-map region to 16 MiB.
const CHUNK_BYTES: std::ops::RangeInclusive<u64> = (64 << 10)..=(16 << 20);

impl Replica {
    /// Compares the source's `hashes` of `chunks` (of `chunk_bytes`) after record `at_lsn`
    /// with this image's. `Ok(Err(reason))`: the replica cannot compare now (nothing was
    /// read); the source reports the verify as not done.
    pub fn verify_chunks(&mut self, at_lsn: u64, chunk_bytes: u64, chunks: &[u64], hashes: &[[u8; 32]]) -> Result<Result<Vec<u64>, String>, ReplicaError> {
        if chunks.len() != hashes.len() || chunks.len() > VERIFY_HASH_BATCH {
            return Err(ReplicaError::Rejected(format!(
                "a verify batch of {} chunks with {} hashes (at most {VERIFY_HASH_BATCH})",
                chunks.len(),
                hashes.len()
            )));
        }
        if !CHUNK_BYTES.contains(&chunk_bytes) || !chunk_bytes.is_power_of_two() {
            return Err(ReplicaError::Rejected(format!("verify chunk size {chunk_bytes} (a power of two from 64 KiB to 16 MiB)")));
        }
        let size = self.state.size;
        if let Some(chunk) = chunks.iter().find(|&&chunk| chunk.checked_mul(chunk_bytes).is_none_or(|offset| offset >= size)) {
            return Err(ReplicaError::Rejected(format!("verify chunk {chunk} of {chunk_bytes} bytes is outside the replica ({size} bytes)")));
        }
        if self.stage.is_some() {
            return Ok(Err("a resync is staged: the image is the replica's last consistent state, not the source's at this LSN".into()));
        }
        if !self.state.is_consistent() {
            return Ok(Err("the replica is not consistent yet (initial synchronisation)".into()));
        }
        if at_lsn != self.applied_unsynced {
            return Ok(Err(format!("the replica has applied LSN {}, not {at_lsn}", self.applied_unsynced)));
        }
        let mut buffer = vec![0u8; chunk_bytes as usize];
        let mut differ = Vec::new();
        for (&chunk, hash) in chunks.iter().zip(hashes) {
            let offset = chunk * chunk_bytes;
            let length = (size - offset).min(chunk_bytes) as usize;
            if &self.image_hash(offset, &mut buffer[..length])? != hash {
                differ.push(chunk);
            }
        }
        if !differ.is_empty() {
            tracing::warn!(at_lsn, chunks = ?differ, chunk_bytes, "verify: the replica differs from the source");
        }
        Ok(Ok(differ))
    }
}
