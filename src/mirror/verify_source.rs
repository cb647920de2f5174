//! The source half of an online verify (`mirror verify`, `verify_every`): the replica is
//! compared with the volume chunk by chunk, each chunk as both sides stand after one and the
//! same record, so writes going on meanwhile cause no false difference.
//!
//! For each chunk the volume's writes are held for a moment (no new write gets an LSN; the
//! ones before all have theirs and are in the pending index), the chunk is read through the
//! index at that instant — the volume's state after record n, the last one assigned — and
//! the hold ends; the read is hashed after it. The hashes travel in the record stream right
//! after record n: the sender sends no record after n until they are sent. The applier,
//! which applies records in LSN order as they arrive, hashes its image when the message
//! comes, i.e. after exactly n, and answers which chunks differ.
//!
//! With `--repair`, the differing regions join the mirror's dirty map once every chunk is
//! compared, and the next connection resyncs them (staged: the replica is never torn).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::checkpoints;

use crate::dirty_map::{DirtyMap, DEFAULT_REGION_SIZE};
use crate::extent::Extent;
use crate::journal::Hold;
use crate::layout::VolumeDir;
use crate::lock;
use crate::protocol::framing::{write_control, LinkError};
use crate::protocol::wire::{Control, SYNC_CHUNK, VERIFY_HASH_BATCH};
use crate::status::{MirrorState, MirrorStatus, VerifyReport};
use crate::volume::Volume;

/// Bytes compared per chunk (what a difference is reported and repaired in).
pub const VERIFY_CHUNK: u64 = SYNC_CHUNK;
/// Chunks read per call of [`VerifySource::prepare`]: one write hold each, so a write waits
/// at most for one chunk's read.
const CHUNKS_PER_STEP: usize = 8;
/// Chunks hashed and not yet answered at most (32 MiB of the device).
const CHUNKS_IN_FLIGHT: usize = 32;
/// A write hold the volume does not grant this fast (a full journal, say) is given up and
/// tried again at the next step.
const HOLD_LIMIT: Duration = Duration::from_millis(500);

/// What the operator or the schedule asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyRequest {
    pub id: u64,
    pub repair: bool,
    pub scheduled: bool,
}

/// Chunks hashed as the volume stood after record `at_lsn`.
struct Batch {
    at_lsn: u64,
    chunks: Vec<u64>,
    hashes: Vec<[u8; 32]>,
}

pub(super) struct VerifySource {
    pub report: VerifyReport,
    size: u64,
    next_chunk: u64,
    chunks: u64,
    /// Hashed, waiting for the stream to reach their LSN.
    ready: VecDeque<Batch>,
    /// Sent, waiting for the applier's answer: (LSN, chunks).
    awaiting: VecDeque<(u64, Vec<u64>)>,
    differing: Vec<u64>,
    buffer: Vec<u8>,
}

impl VerifySource {
    pub fn new(request: VerifyRequest, size: u64) -> VerifySource {
        VerifySource {
            report: VerifyReport::start(request.id, request.scheduled, request.repair, VERIFY_CHUNK, size),
            size,
            next_chunk: 0,
            chunks: size.div_ceil(VERIFY_CHUNK),
            ready: VecDeque::new(),
            awaiting: VecDeque::new(),
            differing: Vec::new(),
            buffer: vec![0; VERIFY_CHUNK as usize],
        }
    }

    fn chunk_extent(&self, chunk: u64) -> Extent {
        let offset = chunk * VERIFY_CHUNK;
        Extent::new(offset, (self.size - offset).min(VERIFY_CHUNK))
    }

    fn in_flight(&self) -> usize {
        self.ready.iter().map(|b| b.chunks.len()).sum::<usize>() + self.awaiting.iter().map(|(_, c)| c.len()).sum::<usize>()
    }

    /// Reads and hashes the next chunks, each at an instant when no write is in flight.
    /// Returns whether it read anything.
    pub fn prepare(&mut self, volume: &Volume) -> Result<bool, String> {
        let mut read = false;
        // A full journal waits for this very sender to send: a hold would only wait for the
        // writer (up to a second each time) and slow the draining. Read once it has room.
        if volume.journal().is_full() {
            return Ok(false);
        }
        for _ in 0..CHUNKS_PER_STEP {
            if self.next_chunk >= self.chunks || self.in_flight() >= CHUNKS_IN_FLIGHT {
                break;
            }
            let chunk = self.next_chunk;
            let extent = self.chunk_extent(chunk);
            let buffer = &mut self.buffer[..extent.length as usize];
            let hold = match volume.hold_writes_for(HOLD_LIMIT) {
                Ok(hold) => hold,
                Err(crate::volume::VolumeError::Busy(why)) => {
                    tracing::debug!(%why, "verify: the volume did not grant a write hold; trying again");
                    break;
                }
                Err(error) => return Err(format!("hold the volume's writes: {error}")),
            };
            let at_lsn = volume.numbers().last_lsn;
            let hole = volume.read_for_scan(extent.offset, buffer).map_err(|error| format!("read chunk {chunk} of the volume: {error}"));
            drop(hold);
            let hash = crate::store::chunk_hash(buffer, hole?);
            match self.ready.back_mut() {
                Some(batch) if batch.at_lsn == at_lsn && batch.chunks.len() < VERIFY_HASH_BATCH => {
                    batch.chunks.push(chunk);
                    batch.hashes.push(hash);
                }
                _ => self.ready.push_back(Batch { at_lsn, chunks: vec![chunk], hashes: vec![hash] }),
            }
            self.next_chunk += 1;
            read = true;
        }
        Ok(read)
    }

    /// The LSN the stream must stop at (nothing after it may be sent before its hashes).
    pub fn stop_at(&self) -> Option<u64> {
        self.ready.front().map(|batch| batch.at_lsn)
    }

    /// Sends the hashes whose LSN the stream has reached (`position`: the last record sent).
    pub async fn send_ready(&mut self, send: &mut quinn::SendStream, position: u64) -> Result<bool, LinkError> {
        let mut sent = false;
        while self.ready.front().is_some_and(|batch| batch.at_lsn <= position) {
            let batch = self.ready.pop_front().expect("checked");
            if batch.at_lsn < position {
                // The stream never passes a batch's LSN (see `stop_at`): a bug if it did.
                return Err(LinkError::Protocol(format!("verify: the stream passed LSN {} before its hashes were sent", batch.at_lsn)));
            }
            write_control(send, &Control::VerifyHashes { at_lsn: batch.at_lsn, chunk_bytes: VERIFY_CHUNK, chunks: batch.chunks.clone(), hashes: batch.hashes })
                .await?;
            self.awaiting.push_back((batch.at_lsn, batch.chunks));
            sent = true;
        }
        Ok(sent)
    }

    /// The applier's answer to the oldest batch sent.
    pub fn answer(&mut self, at_lsn: u64, differ: Vec<u64>, skipped: Option<String>) -> Result<(), String> {
        let Some((lsn, chunks)) = self.awaiting.pop_front() else {
            return Err("the applier answered a verify batch that was not sent".into());
        };
        if lsn != at_lsn || differ.iter().any(|chunk| !chunks.contains(chunk)) {
            return Err(format!("the applier's verify answer (LSN {at_lsn}) does not match the batch sent at LSN {lsn}"));
        }
        if let Some(reason) = skipped {
            return Err(format!("the replica could not compare: {reason}"));
        }
        let compared = chunks.iter().map(|&chunk| self.chunk_extent(chunk).length).sum();
        let regions: Vec<(u64, u64)> = differ.iter().map(|&chunk| self.chunk_extent(chunk)).map(|e| (e.offset, e.length)).collect();
        self.report.record(lsn, compared, &regions);
        self.differing.extend(differ);
        Ok(())
    }

    pub fn finished(&self) -> bool {
        self.next_chunk >= self.chunks && self.ready.is_empty() && self.awaiting.is_empty()
    }

    /// The differing chunks as dirty-map regions (for the repair), if any differ.
    pub fn differing_map(&self) -> Option<DirtyMap> {
        if self.differing.is_empty() {
            return None;
        }
        let mut map = DirtyMap::new(self.size, DEFAULT_REGION_SIZE, 0);
        for &chunk in &self.differing {
            map.mark(self.chunk_extent(chunk));
        }
        Some(map)
    }
}

/// What the volume's side shares with a sender about verifies.
#[derive(Debug, Default)]
pub struct VerifyControl {
    /// Asked for by `mirror verify`, not yet begun.
    pub requested: Option<VerifyRequest>,
    /// The mirror's `verify_every`.
    pub every: Option<Duration>,
}

/// What a verify needs of its mirror's sender.
pub(super) struct VerifyPeer<'a> {
    pub name: &'a str,
    pub dir: &'a VolumeDir,
    pub hold: &'a Hold,
    pub status: &'a Mutex<MirrorStatus>,
    pub volume: &'a Volume,
    pub control: &'a Mutex<VerifyControl>,
}

/// How a verify step went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stepped {
    /// Something was read or sent.
    pub progress: bool,
    /// The verify is done and its differing regions await a resync (`--repair`): the
    /// session ends so the next one resyncs them.
    pub repair: bool,
}

/// One step of the mirror's verify, at this point of the stream (after record `position`):
/// begins a requested (or scheduled) one, reads and hashes chunks, sends the hashes the
/// stream has reached, and finishes it once every chunk is answered.
pub(super) async fn step(peer: &VerifyPeer<'_>, verify: &mut Option<VerifySource>, send: &mut quinn::SendStream, position: u64) -> Result<Stepped, LinkError> {
    if verify.is_none() {
        let Some(request) = due(peer) else { return Ok(Stepped::default()) };
        let source = VerifySource::new(request, peer.volume.size());
        tracing::info!(mirror = %peer.name, id = request.id, repair = request.repair, scheduled = request.scheduled, bytes = peer.volume.size(), "online verify started");
        lock(peer.status).show_verify(source.report.clone());
        *verify = Some(source);
    }
    let running = verify.as_mut().expect("just set");
    let read = match running.prepare(peer.volume) {
        Ok(read) => read,
        Err(reason) => {
            abandon(peer, verify, reason);
            return Ok(Stepped { progress: true, repair: false });
        }
    };
    let sent = running.send_ready(send, position).await?;
    if !running.finished() {
        return Ok(Stepped { progress: read || sent, repair: false });
    }
    let mut source = verify.take().expect("running");
    source.report.finish();
    let report = &source.report;
    tracing::info!(
        mirror = %peer.name,
        bytes = report.compared_bytes,
        seconds = report.duration_seconds,
        differing_regions = report.differing_regions,
        differing_bytes = report.differing_bytes,
        "online verify done"
    );
    let repair = match source.differing_map().filter(|_| report.repair) {
        Some(map) => {
            peer.hold.add_dirty_regions(&map);
            tracing::warn!(mirror = %peer.name, regions = report.differing_regions, "repairing the differing regions through a resync");
            true
        }
        None => false,
    };
    publish(peer, &source.report);
    Ok(Stepped { progress: true, repair })
}

/// A verify requested now, or one the schedule says is due (every `verify_every`, counted
/// from the last one's start; at once when none ran yet). Only on a consistent replica
/// that replicates: the caller steps verifies only while no resync runs.
fn due(peer: &VerifyPeer<'_>) -> Option<VerifyRequest> {
    // Never both locks at once: `Senders::verify` takes the status first.
    let (requested, every) = {
        let mut control = lock(peer.control);
        (control.requested.take(), control.every)
    };
    if requested.is_some() {
        return requested;
    }
    let every = every?;
    let status = lock(peer.status);
    if status.state() != MirrorState::Replicating || !status.consistent() {
        return None;
    }
    let now = crate::clock::now_micros();
    let last = status.verify.as_ref().map(|report| report.started_us);
    last.is_none_or(|started| now.saturating_sub(started) >= every.as_micros() as u64).then_some(VerifyRequest { id: now, repair: false, scheduled: true })
}

/// The applier's answer to a verify batch (an answer without a verify running is ignored:
/// one that was abandoned).
pub(super) fn answer(peer: &VerifyPeer<'_>, verify: &mut Option<VerifySource>, at_lsn: u64, differ: Vec<u64>, skipped: Option<String>) {
    let Some(running) = verify.as_mut() else { return };
    match running.answer(at_lsn, differ, skipped) {
        Ok(()) => lock(peer.status).show_verify(running.report.clone()),
        Err(reason) => abandon(peer, verify, reason),
    }
}

/// The verify cannot go on (the link dropped, the volume stops, a read failed): reported
/// as failed with what it compared so far.
/// A verify asked for and not yet begun fails the same way.
pub(super) fn abandon(peer: &VerifyPeer<'_>, verify: &mut Option<VerifySource>, reason: String) {
    let Some(mut source) = verify.take() else {
        let requested = lock(peer.control).requested.take();
        if let Some(request) = requested {
            let mut status = lock(peer.status);
            if let Some(report) = status.verify.as_mut().filter(|report| report.id == request.id) {
                report.fail(reason);
            }
        }
        return;
    };
    tracing::warn!(mirror = %peer.name, %reason, "online verify failed");
    source.report.fail(reason);
    publish(peer, &source.report);
}

/// A resync committed: if the last verify's differing regions were waiting for one, they
/// are repaired now.
pub(super) fn resync_committed(peer: &VerifyPeer<'_>) {
    let mut status = lock(peer.status);
    let Some(report) = status.verify.as_mut().filter(|r| r.repair && !r.repaired && r.differing_regions > 0 && !r.is_running()) else { return };
    report.repaired = true;
    let report = report.clone();
    drop(status);
    tracing::info!(mirror = %peer.name, regions = report.differing_regions, "the regions the verify found different are repaired");
    checkpoints::save_verify(peer.dir, peer.name, &report);
}

fn publish(peer: &VerifyPeer<'_>, report: &VerifyReport) {
    lock(peer.status).show_verify(report.clone());
    checkpoints::save_verify(peer.dir, peer.name, report);
}
