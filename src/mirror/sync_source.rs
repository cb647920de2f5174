//! The source half of a synchronisation: BLAKE3 hashes of every chunk compared with the
//! replica's, the chunks that differ sent (zeros as a flag, not data), then the journal from
//! the base LSN streamed as usual, which completes chunks read while they changed. See
//! `docs/replication-protocol.md`.

use std::sync::atomic::Ordering;

use super::rate::RateLimiter;
use super::session::Sender;
use crate::lock;
use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::wire::{self, Control, Frame};

impl Sender {
    /// Initial synchronisation: compares BLAKE3 hashes of every chunk with the replica's and
    /// sends the chunks that differ (zeros as a flag, not data). Writes go on meanwhile; the
    /// journal from the returned base LSN is kept and streamed afterwards, which completes
    /// chunks read while they changed.
    pub(super) async fn synchronise(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        replica_applied: u64,
        limiter: &mut RateLimiter,
    ) -> Result<u64, LinkError> {
        let journal = self.volume.journal().clone();
        // Hold the whole retained journal while choosing the base, then everything after it.
        // (`received` of a syncing mirror is the sync's base: what the journal must keep.
        // `applied` stays what the replica had until the copy is done.)
        self.set_checkpoints(journal.first_lsn().saturating_sub(1), replica_applied.min(journal.first_lsn().saturating_sub(1)));
        let base = journal.synced_lsn().max(journal.first_lsn().saturating_sub(1));
        self.set_checkpoints(base, replica_applied.min(base));
        let size = self.volume.size();
        let total = size.div_ceil(wire::SYNC_CHUNK);
        lock(&self.status).start_sync(wire::SYNC_CHUNK, total).map_err(|error| LinkError::Protocol(error.to_string()))?;
        tracing::info!(mirror = %self.config.name, base, chunks = total, "initial synchronisation");
        write_control(send, &Control::SyncStart { base_lsn: base }).await?;
        // Each batch is read and hashed on a blocking thread while the applier compares the
        // one before and its chunks go out (read inline, in turns with the network, a 2 GiB
        // volume took twice as long). A batch still being read when the session ends runs
        // to its end on its own, holding the volume that long (one batch: a bounded read,
        // and nothing waits for it); it is not worth a cancellation flag in every read.
        let read_batch = |first: u64| {
            let volume = self.volume.clone();
            tokio::task::spawn_blocking(move || read_chunks(&volume, first, (total - first).min(wire::SYNC_HASH_BATCH as u64)))
        };
        let mut next = (total > 0).then(|| read_batch(0));
        let mut first = 0u64;
        while let Some(reading) = next.take() {
            if self.stop.load(Ordering::SeqCst) {
                return Err(LinkError::Protocol("volume stopping during synchronisation".into()));
            }
            let (mut chunks, hashes) = reading.await.map_err(|e| LinkError::Protocol(format!("the volume read of a synchronisation failed: {e}")))??;
            let count = chunks.len() as u64;
            write_control(send, &Control::SyncHashes { first_chunk: first, hashes }).await?;
            if first + count < total {
                next = Some(read_batch(first + count));
            }
            let differ = match read_frame(recv).await? {
                Some(Frame::Control(Control::SyncDiffer { first_chunk, differ })) if first_chunk == first => differ,
                other => return Err(LinkError::Protocol(format!("expected SyncDiffer for chunk {first}, got {other:?}"))),
            };
            for chunk in differ {
                let Some(data) = chunk.checked_sub(first).and_then(|i| chunks.get_mut(i as usize)) else {
                    return Err(LinkError::Protocol(format!("the applier named chunk {chunk}, outside the batch at {first}")));
                };
                let zero = data.iter().all(|&b| b == 0);
                let data = if zero { Vec::new() } else { std::mem::take(data) };
                let bytes = data.len() as u64;
                limiter.pace(bytes).await;
                write_control(send, &Control::SyncChunk { chunk, zero, data }).await?;
                let mut status = lock(&self.status);
                status.sync_chunks_sent += 1;
                status.sync_chunks_zeroed += zero as u64;
                status.sent_bytes += bytes;
                status.payload_bytes += bytes;
            }
            first += count;
            lock(&self.status).sync_chunks_compared = first;
        }
        // The replica is consistent once it applied every write the chunk reads could have
        // seen: all LSNs assigned so far. Those are streamed only once durable here, so the
        // replica waits for them. (No FLUSH through the volume's queue: behind writes waiting
        // for journal space that this very sync holds, it would never complete.)
        let consistent_lsn = self.volume.numbers().last_lsn.max(base);
        self.synced_here.store(true, Ordering::SeqCst);
        write_control(send, &Control::SyncDone { base_lsn: base, consistent_lsn }).await?;
        lock(&self.status).finish_copy(consistent_lsn).map_err(|error| LinkError::Protocol(error.to_string()))?;
        tracing::info!(mirror = %self.config.name, base, consistent_lsn, sent = lock(&self.status).sync_chunks_sent, "synchronisation copied; replaying the journal");
        Ok(base)
    }
}

/// A batch of chunks read for a synchronisation: their bytes and their hashes.
type ChunkBatch = (Vec<Vec<u8>>, Vec<[u8; 32]>);

/// Reads chunks `first..first + count` of the volume for a synchronisation: their bytes and
/// hashes (a hole of the backing store is not read).
fn read_chunks(volume: &crate::volume::Volume, first: u64, count: u64) -> Result<ChunkBatch, LinkError> {
    let size = volume.size();
    let mut chunks = Vec::with_capacity(count as usize);
    let mut hashes = Vec::with_capacity(count as usize);
    for chunk in first..first + count {
        let offset = chunk * wire::SYNC_CHUNK;
        let mut data = vec![0u8; (size - offset).min(wire::SYNC_CHUNK) as usize];
        let hole = volume.read_for_scan(offset, &mut data).map_err(|e| LinkError::Protocol(format!("read chunk {chunk} of the volume: {e}")))?;
        hashes.push(crate::store::chunk_hash(&data, hole));
        chunks.push(data);
    }
    Ok((chunks, hashes))
}
