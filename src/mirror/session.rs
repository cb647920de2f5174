//! One mirror's sender, inside `run`: connects to the applier, says who it is, and streams
//! the volume's journal from the applier's `received` checkpoint — only records already
//! durable at the source (so a replica never holds a write the source could lose), with a
//! bounded window of unacknowledged bytes — and reconnects after any failure: with backoff,
//! or at once after an attempt the applier did not answer (`link::HANDSHAKE_ATTEMPT`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::batches::{BatchEncoder, Lookahead};
use super::checkpoints::{self, Checkpoints};
use super::coalesce::{Coalesce, RangeBuilder, RANGE_DATA_BYTES};
use super::config::MirrorConfig;
use super::flight::{AbortOnDrop, AckReader, ApplierEvent, Flight, InFlight};
use super::link::{connect, hello_of, LinkStatsTask};
use super::rate::RateLimiter;
use super::resync_source::{ResyncPeer, ResyncSource};
use super::verify_source::{self, VerifyControl, VerifyPeer, VerifySource};
use crate::cpu_idle::IdleMeter;
use crate::dirty_map::DirtyMap;
use crate::journal::{Hold, HoldState, JournalReader};
use crate::layout::VolumeDir;
use crate::lock;
use crate::protocol::compression::Compression;
use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::wire::{Control, Frame};
use crate::protocol::{tls, transport};
use crate::status::MirrorStatus;
use crate::volume::Volume;

/// Bytes on the wire sent and not yet acknowledged as `received` at most: a 1 Gbit/s path
/// with 130 ms RTT stays full. More only queues data in quinn's send buffer behind the
/// congestion window: before that window was bounded (`protocol::congestion`) it let BBR
/// overshoot a bottleneck's buffer (through the relay at 50 ms RTT and 50 MB/s, 64 MiB lost
/// 43% of the packets), and it hides from `auto` compression that the link is the bottleneck
/// (evidence: the window full). Counted in payload bytes, a compressed backlog kept only
/// half as much in flight on the link (an ext4 image drained at 1.22x the link at a 2.03
/// ratio); a 32 MiB payload window let a 48 MiB backlog through a 10 MB/s link fill quinn's
/// buffer before `auto` saw the link was the bottleneck. Wire bytes keep both right.
const WINDOW_BYTES: u64 = 16 << 20;
/// Payload bytes per batch at most.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_RECORDS: usize = 1024;
/// Nice value added to sender threads (the volume's applier thread uses 5).
const SENDER_NICE: i32 = 5;
/// How long a session that ended waits for its connection's close to reach the applier.
const CLOSE_WAIT: Duration = Duration::from_millis(250);
/// How often an applier that stays unreachable is logged again.
const UNANSWERED_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub(super) struct Sender {
    pub dir: VolumeDir,
    pub config: MirrorConfig,
    pub volume: Arc<Volume>,
    pub status: Arc<Mutex<MirrorStatus>>,
    /// This mirror's claim on the volume's journal: records after its `received` are kept.
    pub hold: Hold,
    pub stop: Arc<AtomicBool>,
    /// The mirror was removed from the running volume: leave at once, even mid-connect or
    /// mid-synchronisation, and save nothing more (its files are being deleted).
    pub removed: Arc<AtomicBool>,
    /// This process copied the chunks of the replica's current synchronisation. An
    /// inconsistent replica synchronised by an earlier process is synchronised again: its
    /// chunks may hold writes that process acknowledged but lost in a crash.
    pub synced_here: Arc<AtomicBool>,
    /// Bytes per second this mirror may send (0: unlimited), shared with `Senders::reload`.
    rate: Arc<AtomicU64>,
    /// Online verifies asked for, and the schedule.
    verify: Arc<Mutex<VerifyControl>>,
    /// The compression setting, shared with `Senders::reload`.
    compression: Arc<Mutex<Compression>>,
}

/// What the volume's side shares with a running sender to steer it.
pub(super) struct SenderControls {
    /// The volume is stopping.
    pub stop: Arc<AtomicBool>,
    /// The mirror was removed.
    pub removed: Arc<AtomicBool>,
    /// Bytes per second it may send (0: unlimited).
    pub rate: Arc<AtomicU64>,
    /// Online verifies asked for (`mirror verify`) and the schedule (`verify_every`).
    pub verify: Arc<Mutex<VerifyControl>>,
    /// The compression of record batches (`compression`).
    pub compression: Arc<Mutex<Compression>>,
}

impl Sender {
    pub fn new(dir: VolumeDir, config: MirrorConfig, volume: Arc<Volume>, status: Arc<Mutex<MirrorStatus>>, hold: Hold, controls: SenderControls) -> Sender {
        let SenderControls { stop, removed, rate, verify, compression } = controls;
        Sender { dir, config, volume, status, hold, stop, removed, synced_here: Arc::new(AtomicBool::new(false)), rate, verify, compression }
    }

    pub fn run(self) {
        // Replication is background work, like applying to the backing store: the threads
        // that acknowledge requests come first; the journal absorbs what a burst leaves
        // unsent.
        crate::priority::lower_current_thread(SENDER_NICE);
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(mirror = %self.config.name, %error, "cannot start sender runtime");
                return;
            }
        };
        let mut backoff = Duration::from_millis(200);
        // When an applier that does not answer was last logged; None once one answers.
        let mut unanswered_logged: Option<Instant> = None;
        let mut disconnected_since: Option<Instant> = None;
        let mut was_tracking = !matches!(self.hold.state(), HoldState::Streaming { .. });
        // The host's idle CPU between sessions: how much a backlog found at the next
        // connection may spend on compressing it (`BatchEncoder::starts_behind`).
        let mut away = IdleMeter::for_this_process();
        let _ = away.sample();
        while !self.leaving() {
            let tracking = !matches!(self.hold.state(), HoldState::Streaming { .. });
            if tracking && !was_tracking {
                let away = disconnected_since.map_or("connected".to_string(), |since| format!("disconnected for {:.0} s", since.elapsed().as_secs_f64()));
                tracing::warn!(mirror = %self.config.name, dirty_bytes = self.hold.dirty_bytes(), "mirror switched to tracking: the journal would have filled ({away}); its writes are kept in its dirty map");
            }
            was_tracking = tracking;
            let started = Instant::now();
            let idle_before = away.sample();
            let result = runtime.block_on(async {
                tokio::select! {
                    result = self.session(idle_before) => result,
                    // A volume that stops ends its sessions itself, cleanly (a resync in
                    // progress is abandoned to its dirty map, the applier told); a removed
                    // mirror leaves at once.
                    () = Sender::until(|| self.removed.load(Ordering::SeqCst)) => Ok(Ended::Stopped),
                }
            });
            if self.removed.load(Ordering::SeqCst) {
                return;
            }
            let _ = away.sample();
            let unanswered = matches!(result, Err(LinkError::Unanswered { .. }));
            // Another attempt at an applier that stayed away (the first of the run was logged).
            let unanswered_again = unanswered && unanswered_logged.is_some();
            if !unanswered {
                unanswered_logged = None;
            }
            disconnected_since = match &result {
                Err(_) => disconnected_since.or(Some(started)),
                Ok(_) => None,
            };
            {
                let mut status = lock(&self.status);
                // Persist the last checkpoints the applier acknowledged (saves are throttled
                // while streaming); an attempt that found nobody changed none.
                let saved = Checkpoints { received_lsn: status.received_lsn, applied_lsn: status.applied_lsn };
                if !unanswered_again {
                    if let Err(error) = checkpoints::save(&self.dir, &self.config.name, saved) {
                        tracing::warn!(mirror = %self.config.name, %error, "could not save mirror state");
                    }
                }
                let error = result.as_ref().err().map(|error| crate::describe(error));
                match error {
                    // `reconnects` counts failures, not each attempt at an applier that
                    // stays away (one every 5 s).
                    Some(error) if unanswered_again => status.still_disconnected(error),
                    error => status.disconnect(error),
                }
            }
            match result {
                // An applier that stays away: one line when it starts and one a minute, not
                // one per attempt.
                Err(error) if unanswered => {
                    if unanswered_logged.is_none_or(|at: Instant| at.elapsed() >= UNANSWERED_LOG_EVERY) {
                        tracing::warn!(mirror = %self.config.name, error = %crate::describe(&error), "mirror cannot reach its applier; trying again");
                        unanswered_logged = Some(Instant::now());
                    }
                    // The attempt itself waited: the next starts at once, so an applier that
                    // comes back is found within an attempt's length.
                    continue;
                }
                Err(error) => tracing::warn!(mirror = %self.config.name, error = %crate::describe(&error), "mirror disconnected; will retry"),
                Ok(Ended::Released) => {
                    // The journal let go of this mirror while it streamed: reconnect at once
                    // and resync from the dirty map.
                    tracing::warn!(mirror = %self.config.name, "the mirror fell out of the journal while connected; resyncing from its dirty map");
                    continue;
                }
                Ok(Ended::Repair) => {
                    // Not the journal letting go: no "switched to tracking" warning.
                    was_tracking = true;
                    tracing::info!(mirror = %self.config.name, "reconnecting to resync the regions the verify found different");
                    continue;
                }
                Ok(Ended::Stopped) => {}
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(200);
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.leaving() {
                std::thread::sleep(Duration::from_millis(20));
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn leaving(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.removed.load(Ordering::SeqCst)
    }

    /// Completes once `done` holds (looked at every 50 ms).
    async fn until(done: impl Fn() -> bool) {
        while !done() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What a verify needs of this sender.
    fn verify_peer(&self) -> VerifyPeer<'_> {
        VerifyPeer { name: &self.config.name, dir: &self.dir, hold: &self.hold, status: &self.status, volume: &self.volume, control: &self.verify }
    }

    /// What a resync needs of this sender.
    fn peer(&self) -> ResyncPeer<'_> {
        ResyncPeer { name: &self.config.name, hold: &self.hold, status: &self.status, volume: &self.volume }
    }

    /// One connection: handshake, a synchronisation or a resync if the replica needs one,
    /// then the journal streamed until the volume stops, the link fails or the journal lets
    /// go of the mirror.
    async fn session(&self, idle_before: Option<f64>) -> Result<Ended, LinkError> {
        let identity = tls::Identity::load(&self.dir.identity())?;
        let server_name = transport::sender_server_name(super::link::sender_id(self.volume.config(), &self.config.name));
        let (endpoint, connection) = connect(
            &identity,
            &self.config.address,
            &self.config.fingerprint,
            self.config.idle_timeout(),
            self.config.congestion.unwrap_or_default(),
            &server_name,
            super::link::HANDSHAKE_ATTEMPT,
        )
        .await?;
        let result = self.session_on(&connection, idle_before).await;
        // However it ended, the applier is told (it frees the replica for the next
        // connection at once, not after its idle timeout), and the close is given a moment
        // to go out: this runtime runs again only for the next session.
        let reason: &[u8] = match &result {
            Ok(Ended::Stopped) => b"volume stopping",
            Ok(Ended::Released) => b"the journal released the mirror: reconnecting to resync",
            Ok(Ended::Repair) => b"reconnecting to repair what a verify found",
            Err(_) => b"session failed",
        };
        connection.close(0u32.into(), reason);
        let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
        result
    }

    /// The session on an open connection. `idle_before`: the host's idle CPU since the
    /// previous session ended.
    async fn session_on(&self, connection: &quinn::Connection, idle_before: Option<f64>) -> Result<Ended, LinkError> {
        let (mut send, mut recv) = connection.open_bi().await?;
        let _link_stats = LinkStatsTask::start(connection, self.status.clone());
        // An applier busy ending a superseded session answers only after it has ended: a
        // volume that stops meanwhile does not wait for that.
        let mut welcome = tokio::select! {
            welcome = self.handshake(&mut send, &mut recv) => welcome?,
            () = Sender::until(|| self.leaving()) => return Ok(Ended::Stopped),
        };
        let journal = self.volume.journal();
        let mut limiter = RateLimiter::new(self.rate.clone());
        let journal_gap = welcome.received + 1 < journal.first_lsn();
        let tracking = !matches!(self.hold.state(), HoldState::Streaming { .. });
        let unfinished_elsewhere = !welcome.consistent && !welcome.needs_sync && !self.synced_here.load(Ordering::SeqCst);
        let mut resync_at = None;
        let mut failback = None;
        let received = if welcome.needs_sync || unfinished_elsewhere || (!welcome.consistent && (journal_gap || tracking)) {
            if journal_gap && !welcome.needs_sync {
                tracing::warn!(mirror = %self.config.name, received = welcome.received, first = journal.first_lsn(), "the journal no longer reaches back to the replica's checkpoint: synchronising");
            }
            self.synchronise(&mut send, &mut recv, welcome.applied, &mut limiter).await?
        } else if let Some(local_changes) = welcome.local_changes.take() {
            // A failback: the replica is a demoted volume. What it wrote after the branch and
            // what this volume wrote since are resynced (DRBD's bitmap merge): no full copy.
            let base = journal.synced_lsn();
            lock(&self.status).rebase(welcome.received, welcome.applied);
            failback = Some(local_changes);
            resync_at = Some((base, false));
            base
        } else if tracking || journal_gap {
            // A consistent replica the journal no longer reaches: resync it (staged: it
            // stays at its state until the resync commits), from the dirty map if there is
            // one, else comparing every region.
            let base = journal.synced_lsn();
            lock(&self.status).rebase(welcome.received, welcome.applied);
            resync_at = Some((base, !tracking));
            base
        } else {
            self.acknowledged(welcome.received, welcome.applied);
            welcome.received
        };
        let in_flight: Arc<Mutex<Flight>> = Arc::default();
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let reader = AckReader { dir: self.dir.clone(), name: self.config.name.clone(), status: self.status.clone(), hold: self.hold.clone() };
        let mut acks = AbortOnDrop(tokio::spawn(reader.run(recv, in_flight.clone(), events_tx)));
        let mut resync = match resync_at {
            Some((base, whole_device)) => Some(ResyncSource::start(&self.peer(), &mut send, base, whole_device, failback).await?),
            None => None,
        };
        let mut verify = None;
        let mut encoder = BatchEncoder::new(self.compression.clone(), &welcome.codecs);
        if journal.backlog_after(received).payload_bytes >= super::coalesce::AUTO_BACKLOG_BYTES {
            encoder.starts_behind(idle_before);
        }
        // Read at each connection, so `mirror set --coalesce` applies at the next one.
        let coalesce = super::config::load(&self.dir, &self.config.name).map_or(self.config.coalesce(), |config| config.coalesce());
        let mut result =
            self.stream(&mut send, (received, coalesce), &in_flight, &mut acks.0, (&mut limiter, &mut encoder), (&mut resync, &mut verify), events).await;
        // Once the journal lets go of the mirror it may recycle the segment the reader is in
        // before the loop sees the release: the read fails (e.g. "no valid record"), but what
        // happened is the release. (A resyncing hold keeps every record, so a read error then
        // is a real one.)
        let released_under_the_reader = match &result {
            Err(LinkError::Journal(error)) if resync.is_none() && matches!(self.hold.state(), HoldState::Tracking { .. }) => {
                tracing::debug!(mirror = %self.config.name, %error, "a journal read failed after the journal released the mirror");
                true
            }
            _ => false,
        };
        if released_under_the_reader {
            lock(&self.status).track();
            result = Ok(Ended::Released);
        }
        let why = match &result {
            Err(error) => format!("the connection to the applier ended: {}", crate::describe(error)),
            Ok(Ended::Stopped) => "the volume is stopping".to_string(),
            Ok(Ended::Released) => "the mirror fell out of the journal (it tracks now)".to_string(),
            Ok(Ended::Repair) => "the mirror reconnects to resync the regions a verify found different".to_string(),
        };
        verify_source::abandon(&self.verify_peer(), &mut verify, why);
        if resync.is_some() {
            // Not committed: the mirror tracks on with its dirty map (it still covers
            // everything the replica lacks).
            self.hold.abandon_resync();
        }
        result
    }

    /// Says who we are and reads the applier's checkpoints.
    async fn handshake(&self, send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) -> Result<Welcome, LinkError> {
        let journal = self.volume.journal();
        let hello = hello_of(&self.volume);
        write_control(send, &Control::Hello(hello)).await?;
        let welcome = match read_frame(recv).await? {
            Some(Frame::Control(Control::Welcome { received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn, local_changes, codecs })) => {
                let local_changes = match local_changes {
                    Some(bytes) => Some(
                        DirtyMap::decode(&bytes, std::path::Path::new("the applier's Welcome"), self.volume.config().size)
                            .map_err(|error| LinkError::Protocol(format!("the replica's map of local changes: {error}")))?,
                    ),
                    None => None,
                };
                Welcome { received: received_lsn, applied: applied_lsn, consistent, needs_sync, consistent_lsn, local_changes, codecs }
            }
            Some(Frame::Control(Control::Refused(refusal))) => return Err(super::generations::explain(&self.volume, &self.config.name, refusal)),
            other => return Err(LinkError::Protocol(format!("expected Welcome, got {other:?}"))),
        };
        if welcome.received > journal.written_lsn() {
            return Err(LinkError::Protocol(format!(
                "the replica has received LSN {} but this volume's journal ends at {}: the replica is ahead of the source (divergence)",
                welcome.received,
                journal.written_lsn()
            )));
        }
        tracing::info!(mirror = %self.config.name, received = welcome.received, applied = welcome.applied, consistent = welcome.consistent, needs_sync = welcome.needs_sync, "mirror connected");
        lock(&self.status).connect(welcome.consistent, welcome.consistent_lsn).map_err(|error| LinkError::Protocol(error.to_string()))?;
        Ok(welcome)
    }

    /// Streams durable journal records after `received` (and the steps of a resync, if one
    /// runs) until the volume stops, the journal releases the mirror's hold, or the link
    /// fails.
    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        send: &mut quinn::SendStream,
        (received, coalesce): (u64, Coalesce),
        in_flight: &Arc<Mutex<Flight>>,
        acks: &mut tokio::task::JoinHandle<Result<(), LinkError>>,
        (limiter, encoder): (&mut RateLimiter, &mut BatchEncoder),
        (resync, verify): (&mut Option<ResyncSource>, &mut Option<VerifySource>),
        mut events: tokio::sync::mpsc::UnboundedReceiver<ApplierEvent>,
    ) -> Result<Ended, LinkError> {
        let journal = self.volume.journal();
        let mut reader = Lookahead::new(JournalReader::new(journal.clone(), received + 1)?);
        // What the volume journals from now on is read from memory while this session keeps
        // up, not read back from the segment files.
        let following = journal.follow();
        let mut meter = (Instant::now(), lock(&self.status).applied_bytes);
        loop {
            // What this session has read is let go of (unless another mirror still needs it).
            following.passed(reader.next_lsn());
            if meter.0.elapsed() >= Duration::from_secs(1) {
                let mut status = lock(&self.status);
                status.throughput_bytes_per_second = (status.applied_bytes - meter.1) as f64 / meter.0.elapsed().as_secs_f64();
                meter = (Instant::now(), status.applied_bytes);
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(Ended::Stopped);
            }
            if acks.is_finished() {
                return match acks.await {
                    Ok(Err(error)) => Err(error),
                    _ => Err(LinkError::Protocol("the applier closed the stream".into())),
                };
            }
            while let Ok(event) = events.try_recv() {
                let event = match event {
                    ApplierEvent::Resync(event) => event,
                    ApplierEvent::Verified { at_lsn, differ, skipped } => {
                        verify_source::answer(&self.verify_peer(), verify, at_lsn, differ, skipped);
                        continue;
                    }
                };
                let Some(running) = resync.as_mut() else { continue };
                if let Some(lsn) = running.handle(&self.peer(), event)? {
                    *resync = None;
                    if let Some(gap) = self.hold.finish_resync() {
                        let gaps = checkpoints::add_gap(&self.dir, &self.config.name, gap);
                        lock(&self.status).resynced_lsn_ranges = gaps;
                    }
                    lock(&self.status).finish_resync().map_err(|error| LinkError::Protocol(error.to_string()))?;
                    tracing::info!(mirror = %self.config.name, lsn, "resync committed: the replica is consistent again; streaming from the journal");
                    verify_source::resync_committed(&self.verify_peer());
                }
            }
            if resync.is_none() && !matches!(self.hold.state(), HoldState::Streaming { .. }) {
                lock(&self.status).track();
                return Ok(Ended::Released);
            }
            // A verify runs only while no resync does (the replica's image is then staged).
            let verified = match resync {
                Some(_) => Default::default(),
                None => verify_source::step(&self.verify_peer(), verify, send, reader.next_lsn() - 1).await?,
            };
            if verified.repair {
                return Ok(Ended::Repair);
            }
            // Nothing after a verify batch's LSN goes before its hashes.
            let stop_at = verify.as_ref().and_then(VerifySource::stop_at).unwrap_or(u64::MAX);
            // Headers count too: a window of tiny records must stay bounded.
            let unacked = lock(in_flight).window_bytes() + resync.as_ref().map_or(0, ResyncSource::bytes_in_flight);
            // A backlog goes as coalesced ranges (never during a resync or a verify, whose
            // steps sit between records), each with room in the window.
            if resync.is_none()
                && verify.is_none()
                && reader.next_lsn() < journal.synced_lsn()
                && coalesce.wanted(journal.backlog_after(reader.next_lsn() - 1).payload_bytes)
            {
                if unacked + RANGE_DATA_BYTES > WINDOW_BYTES {
                    // Wait for room rather than send the backlog as batches, uncoalesced.
                    let waited = Instant::now();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    encoder.stalled(waited.elapsed());
                    continue;
                }
                if self.send_range(send, &mut reader, in_flight, (limiter, encoder)).await? {
                    continue;
                }
            }
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let batch_bytes = limiter.batch_limit(BATCH_BYTES);
            // Only records durable at the source: a replica must never get ahead of it.
            while unacked + (bytes as u64) < WINDOW_BYTES
                && bytes < batch_bytes
                && batch.len() < BATCH_RECORDS
                && reader.next_lsn() <= journal.synced_lsn().min(stop_at)
            {
                match reader.next_record()? {
                    Some(record) => {
                        bytes += record.payload.len();
                        batch.push(record);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                let position = reader.next_lsn() - 1;
                let stepped = match resync.as_mut() {
                    Some(running) => running.step(&self.peer(), send, position, limiter).await?,
                    None => false,
                };
                if !stepped && !verified.progress {
                    // Records ready but no room in the window: the link is the bottleneck.
                    let blocked = unacked >= WINDOW_BYTES && reader.next_lsn() <= journal.synced_lsn().min(stop_at);
                    let waited = Instant::now();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if blocked {
                        encoder.stalled(waited.elapsed());
                    }
                }
                continue;
            }
            let encoded = encoder.encode(&batch, limiter.limited()).await;
            // The limit is on bytes on the wire: compression lets more records through it.
            limiter.pace(encoded.wire_bytes).await;
            // The batch is journaled with one commit at the applier: one entry for it.
            let last_lsn = batch.last().map_or(0, |record| record.header.lsn);
            lock(in_flight).push(InFlight { lsn: last_lsn, payload: bytes as u64, wire: encoded.wire_bytes });
            let records = batch.len() as u64;
            let mut chunks = encoded.chunks;
            send.write_all_chunks(&mut chunks).await?;
            {
                let mut status = lock(&self.status);
                status.sent_bytes += encoded.wire_bytes;
                status.payload_bytes += bytes as u64;
                status.compressed_batches += encoded.level.is_some() as u64;
                status.compression_level = encoded.level;
                status.sent_records += records;
            }
            if let Some(running) = resync.as_mut() {
                running.step(&self.peer(), send, reader.next_lsn() - 1, limiter).await?;
            }
        }
    }

    /// Sends the durable records from the reader's position as one coalesced range, up to a
    /// marker or the range's caps. `false`: nothing sent (the next record is a marker).
    async fn send_range(
        &self,
        send: &mut quinn::SendStream,
        reader: &mut Lookahead,
        in_flight: &Arc<Mutex<Flight>>,
        (limiter, encoder): (&mut RateLimiter, &mut BatchEncoder),
    ) -> Result<bool, LinkError> {
        let synced = self.volume.journal().synced_lsn();
        let mut builder = RangeBuilder::default();
        while reader.next_lsn() <= synced {
            let Some(record) = reader.next_record()? else { break };
            if builder.offer(&record).is_err() {
                reader.put_back(record);
                break;
            }
        }
        let Some(range) = builder.finish() else { return Ok(false) };
        let encoded = encoder.encode_range(&range, limiter.limited()).await;
        limiter.pace(encoded.wire_bytes).await;
        let data = range.meta.data_len();
        lock(in_flight).push(InFlight { lsn: range.meta.last_lsn, payload: data, wire: encoded.wire_bytes });
        let mut chunks = encoded.chunks;
        send.write_all_chunks(&mut chunks).await?;
        let mut status = lock(&self.status);
        status.sent_bytes += encoded.wire_bytes;
        status.payload_bytes += data;
        status.sent_records += range.records;
        status.compressed_batches += encoded.level.is_some() as u64;
        status.compression_level = encoded.level;
        status.coalesced_ranges += 1;
        status.coalesced_records += range.records;
        status.coalesced_skipped_bytes += range.source_bytes - data;
        Ok(true)
    }

    /// Sets checkpoints outright (a synchronisation re-bases them; `acknowledged` only moves
    /// them forward) and the journal hold with them.
    pub(super) fn set_checkpoints(&self, received: u64, applied: u64) {
        lock(&self.status).rebase(received, applied);
        // The synchronisation resends the whole device: it takes the hold even if the
        // mirror was tracking (its dirty map is no longer needed).
        self.hold.restart_at(received);
    }

    /// Records the applier's checkpoints and moves the journal hold to `received`.
    pub(super) fn acknowledged(&self, received: u64, applied: u64) {
        super::flight::acknowledge(&self.status, &self.hold, received, applied);
    }
}

/// How a session ended without an error.
pub(super) enum Ended {
    /// The volume is stopping.
    Stopped,
    /// The journal released the mirror's hold: reconnect and resync.
    Released,
    /// A verify found regions to repair: reconnect and resync them.
    Repair,
}

/// What the applier's Welcome said.
struct Welcome {
    received: u64,
    applied: u64,
    consistent: bool,
    needs_sync: bool,
    consistent_lsn: Option<u64>,
    /// A demoted volume's replica: regions it may hold that this volume's history lacks.
    local_changes: Option<DirtyMap>,
    /// The codecs the applier decodes.
    codecs: Vec<String>,
}
