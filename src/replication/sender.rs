//! The sender: one per mirror, inside `run`. Streams the volume's journal to the applier from
//! its `received` checkpoint, only records already durable at the source (so a replica never
//! holds a write the source could lose), with a bounded window of unacknowledged bytes, and
//! reconnects with backoff after any failure.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::framing::{read_frame, write_control, LinkError};
use super::mirror::{self, MirrorConfig, MirrorState};
use super::rate::RateLimiter;
use super::tls;
use super::wire::{self, Control, Frame, Hello};
use crate::journal::JournalReader;
use crate::volume::Volume;
use crate::lock;

/// Bytes sent and not yet acknowledged as `received` at most: a 1 Gbit/s path with 130 ms
/// RTT stays full. More only queues data in QUIC, which lets quinn's BBR overshoot a
/// bottleneck's buffer (measured through the relay at 50 ms RTT and 50 MB/s: a 64 MiB window
/// lost 43% of the packets to the bottleneck queue and drained at 7 MB/s, 16 MiB at 40 MB/s).
const WINDOW_BYTES: u64 = 16 << 20;
/// Payload bytes per batch at most.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_RECORDS: usize = 1024;
/// Nice value added to sender threads (the volume's applier thread uses 5).
const SENDER_NICE: i32 = 5;
/// Checkpoints are persisted at most this often, off the sending thread. The saved state only
/// has to be no newer than the applier's: it is the trim floor when the volume starts, and
/// the applier sends its own checkpoints on every connect. (Every 500 ms on the sending
/// thread, the file's two fsyncs forced ext4 journal commits that stalled the volume's own
/// journal syncs under load and held up sending.)
const PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// One mirror as `status` reports it (`mirrors[]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub name: String,
    pub address: String,
    pub connected: bool,
    /// `syncing` (initial synchronisation, until the replica is consistent), `replicating`,
    /// `disconnected`.
    pub state: String,
    /// The replica is a consistent past state of this volume (false during initial sync and
    /// the journal replay that completes it).
    pub consistent: bool,
    pub received_lsn: u64,
    pub applied_lsn: u64,
    /// Payload bytes of the records the replica has not applied (sent or not).
    pub lag_bytes: u64,
    /// Records not yet applied on the replica.
    pub lag_records: u64,
    /// Age of the oldest record not yet applied (0 when caught up).
    pub lag_seconds: f64,
    pub sent_bytes: u64,
    pub sent_records: u64,
    /// Payload bytes the replica acknowledged as applied since `run` started.
    #[serde(default)]
    pub applied_bytes: u64,
    /// Payload bytes applied on the replica per second, over about the last second: what
    /// the link really carries (0 while disconnected).
    pub throughput_bytes_per_second: f64,
    /// The bandwidth limit in bytes per second (`max_rate`; absent: none).
    pub max_rate: Option<u64>,
    /// Connections lost or refused since `run` started (each followed by a retry).
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Initial synchronisation: chunks of `sync_chunk_bytes` compared so far, of all, and how
    /// many were sent (as data, or as zeros).
    pub sync_chunk_bytes: u64,
    pub sync_chunks_total: u64,
    pub sync_chunks_compared: u64,
    pub sync_chunks_sent: u64,
    pub sync_chunks_zeroed: u64,
    /// Applied LSN at which the replica becomes consistent after a sync.
    pub consistent_lsn: Option<u64>,
}

/// The senders of a volume; computes the journal trim floor from all of them.
pub struct Senders {
    dir: PathBuf,
    volume: Arc<Volume>,
    statuses: Vec<Arc<Mutex<MirrorStatus>>>,
    /// Each mirror's rate limit, by name, shared with its sender.
    rates: Vec<(String, Arc<AtomicU64>)>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Senders {
    /// Starts one sender thread per configured mirror of the volume in `dir`.
    pub fn start(dir: &Path, volume: Arc<Volume>) -> Result<Senders, mirror::MirrorError> {
        let configs = mirror::list(dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let statuses: Vec<Arc<Mutex<MirrorStatus>>> = configs
            .iter()
            .map(|c| {
                let state = mirror::load_state(dir, &c.name);
                Arc::new(Mutex::new(MirrorStatus {
                    name: c.name.clone(),
                    address: c.address.clone(),
                    max_rate: c.max_rate,
                    state: "disconnected".into(),
                    received_lsn: state.received_lsn,
                    applied_lsn: state.applied_lsn,
                    ..MirrorStatus::default()
                }))
            })
            .collect();
        let mut threads = Vec::new();
        let mut rates = Vec::new();
        for (config, status) in configs.into_iter().zip(&statuses) {
            let rate = Arc::new(AtomicU64::new(config.max_rate.unwrap_or(0)));
            rates.push((config.name.clone(), rate.clone()));
            let sender = Sender {
                dir: dir.to_path_buf(),
                config,
                volume: volume.clone(),
                status: status.clone(),
                all: statuses.clone(),
                stop: stop.clone(),
                synced_here: Arc::new(AtomicBool::new(false)),
                rate,
            };
            let name = format!("sender-{}", sender.config.name);
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || sender.run())
                    .map_err(|source| mirror::MirrorError::Io { context: "start sender thread".into(), source })?,
            );
        }
        Ok(Senders { dir: dir.to_path_buf(), volume, statuses, rates, stop, threads })
    }

    /// Every mirror's status, its lag measured now against the journal: what the replica
    /// lacks is every record after its `applied` checkpoint, sent or not.
    pub fn statuses(&self) -> Vec<MirrorStatus> {
        let journal = self.volume.journal();
        self.statuses
            .iter()
            .map(|s| {
                let mut status = lock(s).clone();
                let backlog = journal.backlog_after(status.applied_lsn);
                status.lag_bytes = backlog.payload_bytes;
                status.lag_records = backlog.records;
                status.lag_seconds = backlog.oldest_timestamp_us.map_or(0.0, |oldest| crate::fsutil::now_micros().saturating_sub(oldest) as f64 / 1e6);
                status
            })
            .collect()
    }

    /// Re-reads the mirrors' files and applies their rate limits to the running senders
    /// (after `mirror set`). Mirrors added or removed take effect at the next `run`.
    pub fn reload(&self) -> Result<(), mirror::MirrorError> {
        for config in mirror::list(&self.dir)? {
            if let Some((_, rate)) = self.rates.iter().find(|(name, _)| *name == config.name) {
                rate.store(config.max_rate.unwrap_or(0), Ordering::Relaxed);
                if let Some(status) = self.statuses.iter().find(|s| lock(s).name == config.name) {
                    lock(status).max_rate = config.max_rate;
                }
            }
        }
        Ok(())
    }

    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
struct Sender {
    dir: PathBuf,
    config: MirrorConfig,
    volume: Arc<Volume>,
    status: Arc<Mutex<MirrorStatus>>,
    all: Vec<Arc<Mutex<MirrorStatus>>>,
    stop: Arc<AtomicBool>,
    /// This process copied the chunks of the replica's current synchronisation. An
    /// inconsistent replica synchronised by an earlier process is synchronised again: its
    /// chunks may hold writes that process acknowledged but lost in a crash.
    synced_here: Arc<AtomicBool>,
    /// Bytes per second this mirror may send (0: unlimited), shared with [`Senders::reload`].
    rate: Arc<AtomicU64>,
}

/// A record sent on this connection.
struct InFlight {
    lsn: u64,
    bytes: u64,
}

/// Records sent on this connection and not yet applied, oldest first. Those after
/// `received_lsn` are the window (not yet durable at the applier).
#[derive(Default)]
struct Flight {
    records: VecDeque<InFlight>,
    received_lsn: u64,
}

impl Flight {
    /// Bytes sent and not yet received, record headers included.
    fn window_bytes(&self) -> u64 {
        // Records are in LSN order: sum only those after `received`, not every unapplied one
        // (the applier checkpoints once a second, so tens of thousands may wait for `applied`).
        let first_unreceived = self.records.partition_point(|r| r.lsn <= self.received_lsn);
        self.records.range(first_unreceived..).map(|r| r.bytes + wire::RECORD_HEADER_BYTES).sum()
    }

    /// Records the checkpoints; returns the payload bytes newly applied.
    fn acknowledge(&mut self, received_lsn: u64, applied_lsn: u64) -> u64 {
        self.received_lsn = self.received_lsn.max(received_lsn);
        let mut applied = 0;
        while self.records.front().is_some_and(|r| r.lsn <= applied_lsn) {
            applied += self.records.pop_front().map_or(0, |r| r.bytes);
        }
        applied
    }
}

impl Sender {
    fn run(self) {
        // Replication is background work, like applying to the backing store: the threads
        // that acknowledge requests come first; the journal absorbs what a burst leaves
        // unsent.
        crate::volume::lower_thread_priority(SENDER_NICE);
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(mirror = %self.config.name, %error, "cannot start sender runtime");
                return;
            }
        };
        let mut backoff = Duration::from_millis(200);
        while !self.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let result = runtime.block_on(self.session());
            {
                let mut status = lock(&self.status);
                // Persist the last checkpoints the applier acknowledged (saves are throttled
                // while streaming).
                let state = MirrorState { received_lsn: status.received_lsn, applied_lsn: status.applied_lsn };
                if let Err(error) = mirror::save_state(&self.dir, &self.config.name, state) {
                    tracing::warn!(mirror = %self.config.name, %error, "could not save mirror state");
                }
                status.connected = false;
                status.state = "disconnected".into();
                status.throughput_bytes_per_second = 0.0;
                if let Err(error) = &result {
                    status.last_error = Some(format!("{error:#}"));
                    status.reconnects += 1;
                }
            }
            if let Err(error) = result {
                tracing::warn!(mirror = %self.config.name, error = %format!("{error:#}"), "mirror disconnected; will retry");
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(200);
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self) -> Result<(), LinkError> {
        let identity = tls::Identity::load(&self.dir.join(crate::volume::config::IDENTITY_DIR))?;
        let address: SocketAddr = tokio::net::lookup_host(&self.config.address)
            .await?
            .next()
            .ok_or_else(|| LinkError::Protocol(format!("cannot resolve {}", self.config.address)))?;
        let local: SocketAddr = if address.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
        let mut endpoint = tls::endpoint(local, None)?;
        endpoint.set_default_client_config(tls::client_config(&identity, &self.config.fingerprint, self.config.idle_timeout(), self.config.congestion.unwrap_or_default())?);
        let connection = endpoint.connect(address, "applier")?.await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        let journal = self.volume.journal().clone();
        let config = self.volume.config();
        let hello = Hello {
            protocol: wire::PROTOCOL_VERSION,
            volume_uuid: *config.uuid.as_bytes(),
            volume_name: config.name.clone(),
            size: config.size,
            generation: *self.volume.generation().as_bytes(),
            first_lsn: journal.first_lsn(),
            last_lsn: journal.written_lsn(),
        };
        write_control(&mut send, &Control::Hello(hello)).await?;
        let (mut received, applied, consistent, needs_sync, consistent_lsn) = match read_frame(&mut recv).await? {
            Some(Frame::Control(Control::Welcome { received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn })) => {
                (received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn)
            }
            Some(Frame::Control(Control::Refused(refusal))) => return Err(LinkError::Refused(refusal)),
            other => return Err(LinkError::Protocol(format!("expected Welcome, got {other:?}"))),
        };
        if received > journal.written_lsn() {
            return Err(LinkError::Protocol(format!(
                "the replica has received LSN {received} but this volume's journal ends at {}: the replica is ahead of the source (divergence)",
                journal.written_lsn()
            )));
        }
        tracing::info!(mirror = %self.config.name, received, applied, consistent, needs_sync, "mirror connected");
        {
            let mut status = lock(&self.status);
            status.connected = true;
            status.consistent = consistent;
            status.consistent_lsn = consistent_lsn;
            status.state = if consistent { "replicating" } else { "syncing" }.into();
        }
        let mut limiter = RateLimiter::new(self.rate.clone());
        let journal_gap = received + 1 < journal.first_lsn();
        let unfinished_elsewhere = !consistent && !needs_sync && !self.synced_here.load(Ordering::SeqCst);
        if needs_sync || journal_gap || unfinished_elsewhere {
            if journal_gap && !needs_sync {
                tracing::warn!(mirror = %self.config.name, received, first = journal.first_lsn(), "the journal no longer reaches back to the replica's checkpoint: synchronising");
            }
            received = self.synchronise(&mut send, &mut recv, applied, &mut limiter).await?;
        } else {
            self.acknowledged(received, applied);
        }
        let in_flight: Arc<Mutex<Flight>> = Arc::default();
        let acks = {
            let sender = self.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let mut last_persist = Instant::now() - PERSIST_INTERVAL;
                let mut persisting: Option<tokio::task::JoinHandle<()>> = None;
                loop {
                    match read_frame(&mut recv).await? {
                        Some(Frame::Control(Control::Ack { received_lsn, applied_lsn })) => {
                            // The window closes on `received` (durable at the applier); applied
                            // bytes are counted for the throughput.
                            let done = lock(&in_flight).acknowledge(received_lsn, applied_lsn);
                            lock(&sender.status).applied_bytes += done;
                            sender.acknowledged(received_lsn, applied_lsn);
                            if last_persist.elapsed() >= PERSIST_INTERVAL && persisting.as_ref().is_none_or(|save| save.is_finished()) {
                                let (dir, name) = (sender.dir.clone(), sender.config.name.clone());
                                persisting = Some(tokio::task::spawn_blocking(move || {
                                    let _ = mirror::save_state(&dir, &name, MirrorState { received_lsn, applied_lsn });
                                }));
                                last_persist = Instant::now();
                            }
                        }
                        None => return Ok::<(), LinkError>(()),
                        other => return Err(LinkError::Protocol(format!("unexpected frame from the applier: {other:?}"))),
                    }
                }
            })
        };
        let mut reader = JournalReader::new(journal.clone(), received + 1)?;
        let mut meter = (Instant::now(), lock(&self.status).applied_bytes);
        loop {
            if meter.0.elapsed() >= Duration::from_secs(1) {
                let mut status = lock(&self.status);
                status.throughput_bytes_per_second = (status.applied_bytes - meter.1) as f64 / meter.0.elapsed().as_secs_f64();
                meter = (Instant::now(), status.applied_bytes);
            }
            if self.stop.load(Ordering::SeqCst) {
                connection.close(0u32.into(), b"volume stopping");
                break;
            }
            if acks.is_finished() {
                return match acks.await {
                    Ok(Err(error)) => Err(error),
                    _ => Err(LinkError::Protocol("the applier closed the stream".into())),
                };
            }
            // Headers count too: a window of tiny records must stay bounded.
            let unacked = lock(&in_flight).window_bytes();
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let batch_bytes = limiter.batch_limit(BATCH_BYTES);
            // Only records durable at the source: a replica must never get ahead of it.
            while unacked + (bytes as u64) < WINDOW_BYTES && bytes < batch_bytes && batch.len() < BATCH_RECORDS && reader.next_lsn() <= journal.synced_lsn() {
                match reader.next_record()? {
                    Some(record) => {
                        bytes += record.payload.len();
                        batch.push(record);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let pairs: Vec<_> = batch.iter().map(|r| (r.header, &r.payload[..])).collect();
            let header = wire::encode_batch_header(&pairs);
            limiter.pace((header.len() + bytes) as u64).await;
            {
                let mut flight = lock(&in_flight);
                for record in &batch {
                    flight.records.push_back(InFlight { lsn: record.header.lsn, bytes: record.payload.len() as u64 });
                }
            }
            let records = batch.len() as u64;
            send.write_all_chunks(&mut frame_chunks(header, &batch)).await?;
            let mut status = lock(&self.status);
            status.sent_bytes += bytes as u64;
            status.sent_records += records;
        }
        Ok(())
    }

    /// Initial synchronisation: compares BLAKE3 hashes of every chunk with the replica's and
    /// sends the chunks that differ (zeros as a flag, not data). Writes go on meanwhile; the
    /// journal from the returned base LSN is kept and streamed afterwards, which completes
    /// chunks read while they changed.
    async fn synchronise(&self, send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, replica_applied: u64, limiter: &mut RateLimiter) -> Result<u64, LinkError> {
        let journal = self.volume.journal().clone();
        // Hold the whole retained journal while choosing the base, then everything after it.
        // (`received` of a syncing mirror is the sync's base: what the journal must keep.
        // `applied` stays what the replica had until the copy is done.)
        self.set_checkpoints(journal.first_lsn().saturating_sub(1), replica_applied.min(journal.first_lsn().saturating_sub(1)));
        let base = journal.synced_lsn().max(journal.first_lsn().saturating_sub(1));
        self.set_checkpoints(base, replica_applied.min(base));
        let size = self.volume.size();
        let total = size.div_ceil(wire::SYNC_CHUNK);
        {
            let mut status = lock(&self.status);
            status.state = "syncing".into();
            status.consistent = false;
            status.consistent_lsn = None;
            status.sync_chunk_bytes = wire::SYNC_CHUNK;
            status.sync_chunks_total = total;
            status.sync_chunks_compared = 0;
            status.sync_chunks_sent = 0;
            status.sync_chunks_zeroed = 0;
        }
        tracing::info!(mirror = %self.config.name, base, chunks = total, "initial synchronisation");
        write_control(send, &Control::SyncStart { base_lsn: base }).await?;
        let mut first = 0u64;
        while first < total {
            if self.stop.load(Ordering::SeqCst) {
                return Err(LinkError::Protocol("volume stopping during synchronisation".into()));
            }
            let count = (total - first).min(wire::SYNC_HASH_BATCH as u64);
            let mut chunks = Vec::with_capacity(count as usize);
            let mut hashes = Vec::with_capacity(count as usize);
            for chunk in first..first + count {
                let offset = chunk * wire::SYNC_CHUNK;
                let mut data = vec![0u8; (size - offset).min(wire::SYNC_CHUNK) as usize];
                let hole = self.volume.read_for_scan(offset, &mut data).map_err(|e| LinkError::Protocol(format!("read chunk {chunk} of the volume: {e}")))?;
                hashes.push(if hole { wire::zero_chunk_hash(data.len()) } else { *blake3::hash(&data).as_bytes() });
                chunks.push(data);
            }
            write_control(send, &Control::SyncHashes { first_chunk: first, hashes }).await?;
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
        lock(&self.status).consistent_lsn = Some(consistent_lsn);
        tracing::info!(mirror = %self.config.name, base, consistent_lsn, sent = lock(&self.status).sync_chunks_sent, "synchronisation copied; replaying the journal");
        Ok(base)
    }

    /// Sets checkpoints outright (a sync restarts them; `acknowledged` only moves them
    /// forward) and moves the trim floor.
    fn set_checkpoints(&self, received: u64, applied: u64) {
        {
            let mut status = lock(&self.status);
            status.received_lsn = received;
            status.applied_lsn = applied;
        }
        self.publish_trim_floor();
    }

    /// Records the applier's checkpoints and moves the volume's trim floor.
    fn acknowledged(&self, received: u64, applied: u64) {
        {
            let mut status = lock(&self.status);
            status.received_lsn = status.received_lsn.max(received);
            status.applied_lsn = status.applied_lsn.max(applied);
            if status.consistent_lsn.is_some_and(|target| status.applied_lsn >= target) {
                status.consistent = true;
                status.consistent_lsn = None;
                status.state = "replicating".into();
            }
        }
        self.publish_trim_floor();
    }

    /// The volume may trim its journal only through what every mirror has received.
    fn publish_trim_floor(&self) {
        let floor = self.all.iter().map(|s| lock(s).received_lsn).min().unwrap_or(u64::MAX);
        self.volume.set_trim_floor(floor);
    }
}

/// A batch frame as chunks for QUIC, all handed over in one call: large payloads move in as
/// they are (no copy), runs of small ones are gathered into one chunk. (quinn finds the bytes
/// of each packet by walking its unacknowledged chunks from the oldest, so a 16 MiB window in
/// 4 KiB chunks would cost a walk of thousands per packet: more than the copy.)
fn frame_chunks(header: Vec<u8>, batch: &[crate::journal::Record]) -> Vec<bytes::Bytes> {
    const OWN_CHUNK: usize = 64 << 10;
    let mut chunks = vec![bytes::Bytes::from(header)];
    let mut rest = batch;
    while let Some(first) = rest.first() {
        if first.payload.len() >= OWN_CHUNK {
            chunks.push(first.payload.clone());
            rest = &rest[1..];
            continue;
        }
        let run = rest.iter().position(|r| r.payload.len() >= OWN_CHUNK).unwrap_or(rest.len());
        let mut gathered = Vec::with_capacity(rest[..run].iter().map(|r| r.payload.len()).sum());
        for record in &rest[..run] {
            gathered.extend_from_slice(&record.payload);
        }
        if !gathered.is_empty() {
            chunks.push(bytes::Bytes::from(gathered));
        }
        rest = &rest[run..];
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Record, RecordHeader, RecordKind};

    fn record(lsn: u64, len: usize) -> Record {
        let payload: Vec<u8> = (0..len).map(|i| (lsn as usize * 31 + i) as u8).collect();
        let kind = if len == 0 { RecordKind::WriteZeroes } else { RecordKind::Write };
        let header = RecordHeader { kind, flags: 0, lsn, offset: 0, length: len.max(4096) as u64, payload_len: len as u32, synced_lsn: 0, timestamp_us: 0 };
        Record { header, payload: bytes::Bytes::from(payload) }
    }

    /// The chunks carry the header, then every payload in LSN order; large payloads travel as
    /// the very buffers they were read into, runs of small ones as one gathered chunk each.
    #[test]
    fn frame_chunks_keep_payload_order_and_gather_only_small_runs() {
        let sizes = [4096, 0, 512, 65536, 4096, 4096, 1 << 20, 0, 100];
        let batch: Vec<Record> = sizes.iter().enumerate().map(|(i, &len)| record(i as u64 + 1, len)).collect();
        let chunks = frame_chunks(vec![7, 7, 7], &batch);
        let mut expected = vec![7u8, 7, 7];
        for record in &batch {
            expected.extend_from_slice(&record.payload);
        }
        assert_eq!(chunks.concat(), expected);
        // header | 4096+0+512 | 65536 | 4096+4096 | 1 MiB | 0+100
        let lengths: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(lengths, vec![3, 4608, 65536, 8192, 1 << 20, 100]);
        assert_eq!(chunks[2].as_ptr(), batch[3].payload.as_ptr(), "a large payload is not copied");
        assert_eq!(chunks[4].as_ptr(), batch[6].payload.as_ptr(), "a large payload is not copied");
    }
}
