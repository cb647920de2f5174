//! The source half of a resync: a tracking mirror (or one whose replica the journal no
//! longer reaches) is brought back without a full copy, while writes go on.
//!
//! At the start the journal's records through the resync's base are folded into the dirty
//! map and the mirror's hold is taken at the base again; the records after it stream as
//! usual, interleaved with the regions of the map: their hashes first (a batch at a time),
//! then the bytes of those that differ from the replica. Every region is read right before
//! its message is sent, and the message is placed at that point of the stream (after the
//! last record sent), so the replica's view and the source's are compared and replaced at
//! the same position; a read may also see writes not yet streamed, which the records that
//! follow overwrite again. The replica stages all of it and commits when `ResyncDone`
//! arrives, which is sent only once the stream has passed every write any read could have
//! seen. The replica is therefore never torn: before the commit it is its old consistent
//! state, after it the source at the commit's LSN.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::rate::RateLimiter;
use crate::dirty_map::{run_length, DirtyMap};
use crate::journal::{Hold, BRANCH_HOLD};
use crate::lock;
use crate::protocol::framing::{write_control, LinkError};
use crate::protocol::wire::Control;
use crate::status::MirrorStatus;
use crate::volume::Volume;

/// Regions hashed per `ResyncHashes` message.
const HASH_BATCH: usize = 64;
/// Hash batches awaiting the applier's answer at most.
const HASH_BATCHES_IN_FLIGHT: usize = 2;
/// Region bytes sent and not yet stored by the applier at most.
const CHUNK_WINDOW: u64 = 8 << 20;

/// Most bytes of consecutive regions read at once.
const MAX_READ: u64 = 4 << 20;

/// What the applier says about a resync (read by the acknowledgement task).
#[derive(Debug)]
pub(super) enum ResyncEvent {
    Differ(Vec<u64>),
    Stored(u64),
    Committed(u64),
    Refused(String),
}

/// What a resync needs of its mirror's sender (so this module does not depend on the
/// session that drives it).
pub(super) struct ResyncPeer<'a> {
    pub name: &'a str,
    pub hold: &'a Hold,
    pub status: &'a Mutex<MirrorStatus>,
    pub volume: &'a Arc<Volume>,
}

pub(super) struct ResyncSource {
    map: DirtyMap,
    /// The next region of `map` to hash.
    cursor: u64,
    /// Regions of hash batches sent and not yet answered, oldest first.
    awaiting: VecDeque<Vec<u64>>,
    /// Regions that differ, to send.
    to_send: VecDeque<u64>,
    chunks_sent: u64,
    chunks_stored: u64,
    chunk_bytes_in_flight: VecDeque<(u64, u64)>,
    /// The stream must pass this LSN before the commit: every write a read could have seen.
    needed_lsn: u64,
    done_at: Option<u64>,
    started: Instant,
    buffer: Vec<u8>,
    comparing: Comparing,
}

/// Whether comparing a batch of regions by hash before sending them pays. It saves the link
/// the bytes of the regions the replica already holds, and costs a read and a hash at each end
/// and a round trip. A dirty map names regions written since the replica's state, which
/// nearly always differ (a 2 GiB volume written whole: every region): once the batches
/// answered lately found at least [`SEND_UNCOMPARED_SHARE`] of their regions different,
/// regions are sent without asking (DRBD's resync without `csums-alg`), and one batch in
/// [`RECHECK_EVERY`] is still compared, so a stretch of equal regions (a whole-device
/// resync of a replica that is mostly right) turns comparing back on.
#[derive(Debug, Default)]
struct Comparing {
    /// Share of the regions that differed, over the batches answered lately (halved weight
    /// per batch).
    differ_share: Option<f64>,
    /// Batches sent uncompared since the last compared one.
    uncompared: u32,
    /// Regions compared by hash, and regions sent without, in this resync (for its log).
    compared_regions: u64,
    uncompared_regions: u64,
}

/// Regions that differ, of those compared lately, from which on regions go uncompared.
const SEND_UNCOMPARED_SHARE: f64 = 0.9;
/// While regions go uncompared, one batch in this many is compared.
const RECHECK_EVERY: u32 = 8;

impl Comparing {
    /// A compared batch of `asked` regions had `differ` that differ.
    fn answered(&mut self, asked: usize, differ: usize) {
        // At most 1: the applier's list is not trusted to name each region once.
        let share = (differ as f64 / asked.max(1) as f64).min(1.0);
        self.differ_share = Some(self.differ_share.map_or(share, |earlier| (earlier + share) / 2.0));
    }

    /// Whether to compare the next batch (else its regions are sent as they are).
    fn compare_next(&mut self) -> bool {
        if self.differ_share.is_some_and(|share| share >= SEND_UNCOMPARED_SHARE) && self.uncompared + 1 < RECHECK_EVERY {
            self.uncompared += 1;
            return false;
        }
        self.uncompared = 0;
        true
    }
}

impl ResyncSource {
    /// Begins a resync at `base` (after which records stream): takes the hold, sends
    /// `ResyncStart`. `whole_device` when there is no dirty map to go by.
    /// `failback`: the regions a demoted replica may hold that this volume lacks; they are
    /// resynced with every region this volume wrote since its branch.
    pub async fn start(
        sender: &ResyncPeer<'_>,
        send: &mut quinn::SendStream,
        base: u64,
        whole_device: bool,
        failback: Option<DirtyMap>,
    ) -> Result<ResyncSource, LinkError> {
        let begun = match failback {
            Some(local_changes) => sender.hold.begin_failback(base, BRANCH_HOLD, &local_changes),
            None => sender.hold.begin_resync(base, whole_device),
        };
        let map = match begun {
            Ok(map) => map,
            Err(reason) => {
                tracing::warn!(mirror = %sender.name, %reason, "resyncing the whole device");
                sender.hold.begin_resync(base, true).map_err(LinkError::Protocol)?
            }
        };
        let bytes = map.dirty_bytes();
        write_control(send, &Control::ResyncStart { base_lsn: base, region_bytes: map.region_size(), regions: map.dirty_regions(), bytes }).await?;
        lock(sender.status).start_resync(bytes).map_err(|error| LinkError::Protocol(error.to_string()))?;
        tracing::info!(mirror = %sender.name, base, dirty_bytes = bytes, regions = map.dirty_regions(), whole_device, "resync started: the replica stays at its last consistent state until it commits");
        Ok(ResyncSource {
            map,
            cursor: 0,
            awaiting: VecDeque::new(),
            to_send: VecDeque::new(),
            chunks_sent: 0,
            chunks_stored: 0,
            chunk_bytes_in_flight: VecDeque::new(),
            needed_lsn: base,
            done_at: None,
            started: Instant::now(),
            buffer: Vec::new(),
            comparing: Comparing::default(),
        })
    }

    /// Region bytes sent and not yet stored (they count against the sender's window).
    pub fn bytes_in_flight(&self) -> u64 {
        self.chunk_bytes_in_flight.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Takes the applier's answers. Returns the commit LSN once the resync is committed.
    pub fn handle(&mut self, sender: &ResyncPeer<'_>, event: ResyncEvent) -> Result<Option<u64>, LinkError> {
        match event {
            ResyncEvent::Differ(regions) => {
                let Some(batch) = self.awaiting.pop_front() else {
                    return Err(LinkError::Protocol("the applier answered a resync hash batch that was not sent".into()));
                };
                if regions.iter().any(|region| !batch.contains(region)) {
                    return Err(LinkError::Protocol("the applier named a region outside the hash batch".into()));
                }
                self.comparing.answered(batch.len(), regions.len());
                let equal = batch.iter().filter(|region| !regions.contains(region)).map(|&region| self.map.region_extent(region).length).sum::<u64>();
                lock(sender.status).resync_done_bytes += equal;
                self.to_send.extend(regions);
                Ok(None)
            }
            ResyncEvent::Stored(chunks) => {
                self.chunks_stored = self.chunks_stored.max(chunks);
                while self.chunk_bytes_in_flight.front().is_some_and(|(seq, _)| *seq <= self.chunks_stored) {
                    self.chunk_bytes_in_flight.pop_front();
                }
                Ok(None)
            }
            ResyncEvent::Committed(lsn) if self.done_at == Some(lsn) => Ok(Some(lsn)),
            ResyncEvent::Committed(lsn) => Err(LinkError::Protocol(format!("the applier committed a resync at LSN {lsn}, not at {:?}", self.done_at))),
            ResyncEvent::Refused(reason) => Err(LinkError::Protocol(format!("the applier refused the resync: {reason}"))),
        }
    }

    /// Sends what can be sent at this point of the stream (after record `position`): region
    /// bytes first, then a hash batch, then `ResyncDone` when everything is through. Returns
    /// whether anything was sent.
    pub async fn step(&mut self, sender: &ResyncPeer<'_>, send: &mut quinn::SendStream, position: u64, limiter: &mut RateLimiter) -> Result<bool, LinkError> {
        let mut sent = false;
        // The next batch of dirty regions: compared by hash first, or (when comparing does
        // not pay) queued to send as they are. Not while enough is queued already.
        if self.awaiting.len() < HASH_BATCHES_IN_FLIGHT && self.to_send.len() < HASH_BATCH && self.cursor < self.map.regions() {
            let regions: Vec<u64> = (self.cursor..self.map.regions()).filter(|&r| self.map.is_dirty(r)).take(HASH_BATCH).collect();
            self.cursor = regions.last().map_or(self.map.regions(), |last| last + 1);
            if !regions.is_empty() && !self.comparing.compare_next() {
                self.comparing.uncompared_regions += regions.len() as u64;
                self.to_send.extend(regions);
            } else if !regions.is_empty() {
                self.comparing.compared_regions += regions.len() as u64;
                let mut hashes = Vec::with_capacity(regions.len());
                let mut next = 0;
                while next < regions.len() {
                    let (first, most) = (regions[next], self.map.regions_in(MAX_READ));
                    let count = run_length(regions[next..].iter().copied(), most);
                    let hole = self.read_run(sender, first, count, true).await?;
                    hashes.extend(self.map.run_regions(first, count).map(|(_, bytes)| crate::store::chunk_hash(&self.buffer[bytes], hole)));
                    next += count;
                }
                write_control(send, &Control::ResyncHashes { at_lsn: position, regions: regions.clone(), hashes }).await?;
                self.awaiting.push_back(regions);
                sent = true;
            }
        }
        while let Some(&first) = self.to_send.front() {
            let in_flight = self.bytes_in_flight();
            if in_flight >= CHUNK_WINDOW {
                break;
            }
            // Consecutive regions are read at once (one read of a run instead of one per
            // region: the reads were the resync's bottleneck), as far as the window allows.
            let most = self.map.regions_in(MAX_READ.min(CHUNK_WINDOW - in_flight));
            let count = run_length(self.to_send.iter().copied(), most);
            self.to_send.drain(..count);
            self.read_run(sender, first, count, false).await?;
            for (region, bytes) in self.map.run_regions(first, count) {
                let length = bytes.len() as u64;
                let bytes = &self.buffer[bytes];
                let zero = bytes.iter().all(|&b| b == 0);
                let data = if zero { Vec::new() } else { bytes.to_vec() };
                limiter.pace(data.len() as u64).await;
                write_control(send, &Control::ResyncChunk { at_lsn: position, region, zero, data }).await?;
                self.chunks_sent += 1;
                self.chunk_bytes_in_flight.push_back((self.chunks_sent, length));
                let mut status = lock(sender.status);
                status.resync_done_bytes += length;
                status.resync_sent_bytes += if zero { 0 } else { length };
                status.sent_bytes += if zero { 0 } else { length };
                status.payload_bytes += if zero { 0 } else { length };
            }
            sent = true;
        }
        let everything_sent = self.cursor >= self.map.regions() && self.awaiting.is_empty() && self.to_send.is_empty();
        if everything_sent && self.done_at.is_none() && position >= self.needed_lsn {
            write_control(send, &Control::ResyncDone { at_lsn: position }).await?;
            self.done_at = Some(position);
            let (compared, uncompared) = (self.comparing.compared_regions, self.comparing.uncompared_regions);
            tracing::info!(mirror = %sender.name, lsn = position, compared, uncompared, "resync sent; waiting for the applier to commit");
            sent = true;
        }
        self.update_eta(sender);
        Ok(sent)
    }

    /// Reads `count` consecutive regions from `first` into `buffer` at once, for a scan
    /// (hashing: a hole is not read) or to send. Returns whether the run was a hole (scans
    /// only). Every write the read could have seen
    /// must be streamed before the commit (`needed_lsn`). The read runs on a blocking thread:
    /// this runtime also drives the connection, which goes on sending what was written to it
    /// meanwhile (read inline, a resync over loopback read and sent in turns, at half the
    /// rate).
    async fn read_run(&mut self, sender: &ResyncPeer<'_>, first: u64, count: usize, scan: bool) -> Result<bool, LinkError> {
        let run = self.map.run_extent(first, count);
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.resize(run.length as usize, 0);
        let volume = sender.volume.clone();
        let (buffer, read, last_lsn) = tokio::task::spawn_blocking(move || {
            let read = if scan { volume.read_for_scan(run.offset, &mut buffer) } else { volume.read(run.offset, &mut buffer).map(|()| false) };
            let last_lsn = volume.numbers().last_lsn;
            (buffer, read, last_lsn)
        })
        .await
        .map_err(|e| LinkError::Protocol(format!("the volume read of a resync failed: {e}")))?;
        self.buffer = buffer;
        let hole = read.map_err(|e| LinkError::Protocol(format!("read regions {first}..{} of the volume: {e}", first + count as u64)))?;
        self.needed_lsn = self.needed_lsn.max(last_lsn);
        Ok(hole)
    }

    fn update_eta(&self, sender: &ResyncPeer<'_>) {
        let mut status = lock(sender.status);
        let elapsed = self.started.elapsed().as_secs_f64();
        let remaining = status.resync_total_bytes.saturating_sub(status.resync_done_bytes);
        status.resync_eta_seconds = (status.resync_done_bytes > 0 && elapsed > 0.5).then(|| remaining as f64 * elapsed / status.resync_done_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::{Comparing, RECHECK_EVERY};

    /// Regions that nearly all differ go uncompared, one batch in eight still compared; a
    /// compared batch of equal regions turns comparing back on.
    #[test]
    fn comparing_stops_paying_when_nearly_everything_differs() {
        let mut comparing = Comparing::default();
        assert!(comparing.compare_next(), "nothing known: compare");
        comparing.answered(64, 40);
        assert!(comparing.compare_next(), "most but not nearly all differ");
        comparing.answered(64, 64);
        comparing.answered(64, 64);
        let compared: Vec<bool> = (0..2 * RECHECK_EVERY).map(|_| comparing.compare_next()).collect();
        assert_eq!(compared.iter().filter(|&&c| c).count(), 2, "{compared:?}");
        assert!(!compared[0] && compared[RECHECK_EVERY as usize - 1]);
        comparing.answered(64, 0);
        assert!(comparing.compare_next(), "a stretch of equal regions: compare again");
        assert!(comparing.compare_next());
    }
}
