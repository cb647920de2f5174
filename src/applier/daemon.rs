//! The applier daemon: accepts mutually authenticated QUIC connections from volumes, keeps one
//! [`Replica`] per volume under `ADIR/replicas/NAME`, and answers each batch with checkpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::admin::{allowed, attached_image, offline_replica, replicas_on_disk};
use super::replica::{Replica, ReplicaError, ReplicaState};
use super::ApplierError;
use crate::layout::ApplierDir;
use crate::lock;
use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::wire::{Control, Frame, Hello, Refusal};
use crate::protocol::{tls, transport};
use crate::status::{ApplierStatus, ReplicaStatus, ResyncProgress};

/// The image is made durable (and `applied` acknowledged) after this many applied records
/// or bytes...
const CHECKPOINT_RECORDS: u64 = 16384;
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// ...or this long after the first record applied since the last checkpoint.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1000);

struct Slot {
    replica: Arc<Mutex<Replica>>,
    connected: bool,
    /// The connected source's address.
    peer: Option<SocketAddr>,
    connections: u64,
}

/// Shared state of a running applier.
pub struct Applier {
    dir: ApplierDir,
    extra_allowed: Vec<String>,
    idle_timeout: std::time::Duration,
    replicas: Mutex<HashMap<String, Slot>>,
    listen: Mutex<Option<SocketAddr>>,
}

impl Applier {
    pub fn new(dir: &Path, extra_allowed: Vec<String>, idle_timeout: std::time::Duration) -> Arc<Applier> {
        Arc::new(Applier { dir: ApplierDir::new(dir), extra_allowed, idle_timeout, replicas: Mutex::new(HashMap::new()), listen: Mutex::new(None) })
    }

    /// Binds `listen`, calls `ready` with the bound address, and serves until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listen: SocketAddr,
        ready: impl FnOnce(SocketAddr),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ApplierError> {
        let identity = tls::Identity::load(&self.dir.identity()).map_err(LinkError::from)?;
        let dir = self.dir.clone();
        let extra = self.extra_allowed.clone();
        let allow: tls::AllowList = Arc::new(move |fingerprint: &str| extra.iter().any(|f| f == fingerprint) || allowed(&dir).iter().any(|f| f == fingerprint));
        let server = transport::server_config(&identity, allow, self.idle_timeout).map_err(LinkError::from)?;
        let endpoint = transport::endpoint(listen, Some(server)).map_err(|source| ApplierError::Io { context: format!("listen on {listen}"), source })?;
        let bound = endpoint.local_addr().map_err(|source| ApplierError::Io { context: "local address".into(), source })?;
        *lock(&self.listen) = Some(bound);
        tracing::info!(listen = %bound, fingerprint = %identity.fingerprint, "applier listening");
        ready(bound);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let applier = self.clone();
                    tokio::spawn(async move {
                        let peer = incoming.remote_address();
                        if let Err(error) = applier.handle(incoming).await {
                            tracing::warn!(%peer, error = %format!("{error:#}"), "replication connection ended");
                        }
                    });
                }
            }
        }
        endpoint.close(0u32.into(), b"applier stopping");
        endpoint.wait_idle().await;
        Ok(())
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        *lock(&self.listen)
    }

    async fn handle(self: Arc<Self>, incoming: quinn::Incoming) -> Result<(), ApplierError> {
        let connection = incoming.await.map_err(LinkError::from)?;
        let (mut send, mut recv) = connection.accept_bi().await.map_err(LinkError::from)?;
        let hello = match read_frame(&mut recv).await? {
            Some(Frame::Control(Control::Hello(hello))) => hello,
            Some(Frame::Control(Control::Switchover { hello, to, mirror, applier_address, applier_fingerprint })) => {
                let applier = self.clone();
                let request = super::failover::SwitchoverAsk { hello, to, mirror, applier_address, applier_fingerprint };
                let reply = tokio::task::spawn_blocking(move || applier.switchover(&request)).await.map_err(|e| LinkError::Protocol(e.to_string()))?;
                let reply = match reply {
                    Ok(switched) => switched,
                    Err(refusal) => {
                        tracing::warn!(reason = %refusal, "refused a switchover");
                        Control::Refused(refusal)
                    }
                };
                write_control(&mut send, &reply).await?;
                let _ = send.finish();
                connection.closed().await;
                return Ok(());
            }
            Some(Frame::Control(Control::RestoreStart { hello })) => {
                let result = self.clone().restore(&hello, &mut send, &mut recv).await;
                let _ = send.finish();
                return result;
            }
            other => return Err(LinkError::Protocol(format!("expected Hello, got {other:?}")).into()),
        };
        let name = hello.volume_name.clone();
        if crate::name::validate(&name).is_err() {
            let refusal = Refusal::Other(format!("invalid volume name {name:?}"));
            write_control(&mut send, &Control::Refused(refusal.clone())).await?;
            return Err(LinkError::Refused(refusal).into());
        }
        // One replica per volume name; opened on first use, created on the first connection.
        let replica = {
            let applier = self.clone();
            let hello = hello.clone();
            match tokio::task::spawn_blocking(move || applier.replica_for(&hello)).await.map_err(|e| LinkError::Protocol(e.to_string()))? {
                Ok(replica) => replica,
                Err(error) => {
                    // Tell the source why (e.g. an attached image of the wrong size).
                    let refusal = Refusal::Other(format!("cannot open the replica of {name}: {error:#}"));
                    write_control(&mut send, &Control::Refused(refusal.clone())).await?;
                    let _ = send.finish();
                    connection.closed().await;
                    return Err(LinkError::Refused(refusal).into());
                }
            }
        };
        let refusal = lock(&replica).check_hello(&hello).err().map(|refusal| self.with_promoted_position(refusal));
        if let Some(refusal) = refusal {
            tracing::warn!(volume = %name, source_last_lsn = hello.last_lsn, reason = %refusal, "refused a source");
            write_control(&mut send, &Control::Refused(refusal.clone())).await?;
            let _ = send.finish();
            connection.closed().await;
            return Err(LinkError::Refused(refusal).into());
        }
        let already_connected = {
            let mut replicas = lock(&self.replicas);
            let slot = replicas.get_mut(&name).expect("registered by replica_for");
            let already = std::mem::replace(&mut slot.connected, true);
            slot.connections += !already as u64;
            if !already {
                slot.peer = Some(connection.remote_address());
            }
            already
        };
        if already_connected {
            let refusal = Refusal::Other(format!("volume {name} is already connected"));
            write_control(&mut send, &Control::Refused(refusal.clone())).await?;
            return Err(LinkError::Refused(refusal).into());
        }
        let result = self.stream(&name, &replica, &mut send, recv).await;
        if let Some(slot) = lock(&self.replicas).get_mut(&name) {
            slot.connected = false;
        }
        result
    }

    fn replica_for(&self, hello: &Hello) -> Result<Arc<Mutex<Replica>>, ApplierError> {
        let mut replicas = lock(&self.replicas);
        let dir = self.dir.replica(&hello.volume_name);
        if let Some(slot) = replicas.get(&hello.volume_name) {
            // A promoted replica that `volume demote` made a replica again (a switchover
            // back) is opened anew from its files.
            let remade = lock(&slot.replica).state().promotion.is_some() && ReplicaState::load(&dir).is_ok_and(|state| state.promotion.is_none());
            if !remade {
                return Ok(slot.replica.clone());
            }
            tracing::info!(volume = %hello.volume_name, "the promoted replica was made a replica again: reopening it");
        }
        let journal = || super::ApplierConfig::load(&self.dir).map(|config| config.replica_journal(&self.dir, &dir));
        let replica = if dir.holds_replica() {
            Replica::open(dir.root())?
        } else if let Some(image) = attached_image(&dir)? {
            tracing::info!(volume = %hello.volume_name, image = %image.display(), "creating replica on the attached image");
            Replica::create(dir.root(), hello, Some(&image), journal()?.as_ref())?
        } else {
            tracing::info!(volume = %hello.volume_name, size = hello.size, "creating replica for a new source");
            Replica::create(dir.root(), hello, None, journal()?.as_ref())?
        };
        Ok(self.register(&mut replicas, &hello.volume_name, replica))
    }

    /// Keeps an opened replica (with its snapshot retention from applier.toml).
    fn register(&self, replicas: &mut HashMap<String, Slot>, name: &str, mut replica: Replica) -> Arc<Mutex<Replica>> {
        match super::ApplierConfig::load(&self.dir) {
            Ok(config) => replica.set_keep_snapshots(config.keep_snapshots(name)),
            Err(error) => tracing::warn!(%error, "applier.toml unreadable: the default snapshot retention applies"),
        }
        let replica = Arc::new(Mutex::new(replica));
        replicas.insert(name.to_string(), Slot { replica: replica.clone(), connected: false, peer: None, connections: 0 });
        replica
    }

    /// The replica of `volume` that exists on disk, opened if no source has connected yet.
    pub fn existing_replica(&self, volume: &str) -> Result<Arc<Mutex<Replica>>, ApplierError> {
        crate::name::validate(volume).map_err(ApplierError::Invalid)?;
        let mut replicas = lock(&self.replicas);
        if let Some(slot) = replicas.get(volume) {
            return Ok(slot.replica.clone());
        }
        let dir = self.dir.replica(volume);
        if !dir.holds_replica() {
            return Err(ApplierError::Invalid(format!("applier {} holds no replica of {volume}", self.dir.root().display())));
        }
        let replica = Replica::open(dir.root())?;
        Ok(self.register(&mut replicas, volume, replica))
    }

    pub(super) fn applier_dir(&self) -> &ApplierDir {
        &self.dir
    }

    /// The address of the source connected to `volume`'s replica, if one is.
    pub(super) fn connected_source(&self, volume: &str) -> Option<SocketAddr> {
        lock(&self.replicas).get(volume).filter(|slot| slot.connected).and_then(|slot| slot.peer)
    }

    /// A temporary snapshot of a replica's latest consistent state (`export --latest`).
    pub fn snapshot_latest(&self, volume: &str) -> Result<(String, u64), ApplierError> {
        let replica = self.existing_replica(volume)?;
        let result = lock(&replica).snapshot_latest();
        Ok(result?)
    }

    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), ApplierError> {
        let replica = self.existing_replica(volume)?;
        let result = lock(&replica).delete_snapshot(name);
        Ok(result?)
    }

    /// The control requests about snapshots: `snapshot-latest VOLUME` answers `{"name",
    /// "lsn"}`, `snapshot-delete VOLUME NAME` answers `{"deleted": NAME}`.
    pub fn snapshot_request(&self, request: &str) -> Option<serde_json::Value> {
        let words: Vec<&str> = request.split_whitespace().collect();
        let result = match words.as_slice() {
            ["snapshot-latest", volume] => self.snapshot_latest(volume).map(|(name, lsn)| serde_json::json!({ "name": name, "lsn": lsn })),
            ["snapshot-delete", volume, name] => self.delete_snapshot(volume, name).map(|()| serde_json::json!({ "deleted": name })),
            [verb, ..] if verb.starts_with("snapshot-") => Err(ApplierError::Invalid(format!("bad request {request:?}"))),
            _ => return None,
        };
        Some(result.unwrap_or_else(|error| serde_json::json!({ "error": format!("{error}") })))
    }

    /// Records the group snapshots that the snapshots just taken complete.
    fn record_groups(&self, taken: &[super::snapshot::SnapshotMeta]) {
        for meta in taken.iter().filter(|m| m.group.is_some() && m.is_valid()) {
            super::snapshot::group::record_if_complete(&self.dir, meta, |member| super::snapshot::metas_on_disk(&self.dir.replica(member)));
        }
    }

    async fn stream(&self, name: &str, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), ApplierError> {
        let (received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn, local_changes) = {
            let r = lock(replica);
            (r.received_lsn(), r.applied_lsn(), r.state().is_consistent(), r.state().needs_sync(), r.state().consistent_lsn(), r.local_changes()?)
        };
        write_control(send, &Control::Welcome { received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn, local_changes }).await?;
        tracing::info!(volume = %name, received_lsn, applied_lsn, consistent, needs_sync, "source connected");
        // Frames are read by their own task, so the next batch crosses the network while this
        // one is made durable and applied. A frame that fails to decode ends the reader, and
        // with it this loop, before anything of it reaches the replica.
        let (frames_in, mut frames) = tokio::sync::mpsc::channel::<Frame>(2);
        let reader = tokio::spawn(async move {
            while let Some(frame) = read_frame(&mut recv).await? {
                if frames_in.send(frame).await.is_err() {
                    break;
                }
            }
            Ok::<(), LinkError>(())
        });
        let result = self.process(name, replica, send, &mut frames).await;
        drop(frames);
        // A resync that did not commit is discarded whole: the replica stays at its state.
        let abandoned = blocking(replica, |r| r.abandon_resync()).await;
        // Whatever was applied is made durable (and acknowledged, if the source still listens).
        let applied = blocking(replica, |r| r.checkpoint()).await;
        if let (Ok(()), Ok(applied)) = (&result, &applied) {
            let _ = acknowledge(replica, send, *applied).await;
        }
        result?;
        abandoned?;
        applied?;
        Ok(reader.await.map_err(|e| LinkError::Protocol(e.to_string()))??)
    }

    /// Handles frames until the reader stops. Records become durable in the replica's journal
    /// and are acknowledged as `received` batch by batch; they are applied to the image at once
    /// (from memory) but made durable there (an image sync, `applied` acknowledged) only every
    /// [`CHECKPOINT_RECORDS`] records, [`CHECKPOINT_BYTES`] or [`CHECKPOINT_INTERVAL`]. The image
    /// sync runs beside the batches that keep arriving (one at a time), so the journal and the
    /// image are written to concurrently rather than in turns.
    async fn process(
        &self,
        name: &str,
        replica: &Arc<Mutex<Replica>>,
        send: &mut quinn::SendStream,
        frames: &mut tokio::sync::mpsc::Receiver<Frame>,
    ) -> Result<(), ApplierError> {
        let mut checkpoint_due: Option<tokio::time::Instant> = None;
        let mut syncing: Option<Checkpointing> = None;
        // A control frame read while gathering record batches, handled next.
        let mut held: Option<Frame> = None;
        loop {
            let frame = if let Some(frame) = held.take() {
                Some(frame)
            } else {
                tokio::select! {
                    frame = frames.recv() => frame,
                    finished = async { syncing.as_mut().expect("enabled only while syncing").await }, if syncing.is_some() => {
                        syncing = None;
                        let applied = finished.map_err(|e| LinkError::Protocol(e.to_string()))??;
                        acknowledge(replica, send, applied).await?;
                        continue;
                    }
                    _ = tokio::time::sleep_until(checkpoint_due.unwrap_or_else(tokio::time::Instant::now)), if checkpoint_due.is_some() && syncing.is_none() => {
                        checkpoint_due = None;
                        syncing = Some(start_checkpoint(replica));
                        continue;
                    }
                }
            };
            let Some(frame) = frame else {
                finish_checkpoint(replica, send, &mut syncing).await?;
                return Ok(());
            };
            let records = match frame {
                Frame::Records(mut records) => {
                    // Batches that queued up meanwhile become durable together: one journal
                    // sync (and one acknowledgement) for all of them.
                    loop {
                        match frames.try_recv() {
                            Ok(Frame::Records(more)) => records.extend(more),
                            Ok(control) => {
                                held = Some(control);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    records
                }
                Frame::Control(control) if is_resync_step(&control) => {
                    // Resync steps go to the stage; the image is not written until the commit.
                    self.resync_step(name, replica, send, control, &mut syncing).await?;
                    continue;
                }
                Frame::Control(control) => {
                    // Synchronisation steps start from a durable image.
                    finish_checkpoint(replica, send, &mut syncing).await?;
                    if checkpoint_due.take().is_some() {
                        self.checkpoint(replica, send).await?;
                    }
                    self.control(name, replica, send, control).await?;
                    continue;
                }
            };
            // The journal is trimmed only by checkpoints: past half full, let them catch up
            // before taking more (a full journal would end the connection).
            if lock(replica).journal_fill() > 0.5 {
                finish_checkpoint(replica, send, &mut syncing).await?;
                self.checkpoint(replica, send).await?;
                checkpoint_due = None;
            }
            // Durable in our journal first (the source may trim up to it), then applied.
            let (received, applied, unsynced, taken) = blocking(replica, move |r| {
                let received = r.receive(&records)?;
                r.apply_received(&records)?;
                Ok((received, r.applied_lsn(), r.unsynced(), r.take_new_snapshots()))
            })
            .await?;
            if !taken.is_empty() {
                self.record_groups(&taken);
            }
            write_control(send, &Control::Ack { received_lsn: received, applied_lsn: applied }).await?;
            let (unsynced_records, unsynced_bytes) = unsynced;
            if unsynced_records >= CHECKPOINT_RECORDS || unsynced_bytes >= CHECKPOINT_BYTES {
                // Now, or as soon as the checkpoint in progress is done.
                checkpoint_due = Some(tokio::time::Instant::now());
                if syncing.is_none() {
                    checkpoint_due = None;
                    syncing = Some(start_checkpoint(replica));
                }
            } else if unsynced_records > 0 && checkpoint_due.is_none() {
                checkpoint_due = Some(tokio::time::Instant::now() + CHECKPOINT_INTERVAL);
            }
        }
    }

    async fn checkpoint(&self, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream) -> Result<(), ApplierError> {
        let applied = blocking(replica, |r| r.checkpoint()).await?;
        acknowledge(replica, send, applied).await
    }

    async fn control(&self, name: &str, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, control: Control) -> Result<(), ApplierError> {
        match control {
            Control::SyncStart { base_lsn } => {
                tracing::info!(volume = %name, base_lsn, "initial synchronisation started");
                blocking(replica, |r| r.sync_start()).await
            }
            Control::SyncHashes { first_chunk, hashes } => {
                let differ = blocking(replica, move |r| r.differing_chunks(first_chunk, &hashes)).await?;
                Ok(write_control(send, &Control::SyncDiffer { first_chunk, differ }).await?)
            }
            Control::SyncChunk { chunk, zero, data } => blocking(replica, move |r| r.write_chunk(chunk, zero, &data)).await,
            Control::SyncDone { base_lsn, consistent_lsn } => {
                blocking(replica, move |r| r.sync_done(base_lsn, consistent_lsn)).await?;
                tracing::info!(volume = %name, base_lsn, consistent_lsn, "initial synchronisation copied; replaying the journal");
                Ok(write_control(send, &Control::Ack { received_lsn: base_lsn, applied_lsn: base_lsn }).await?)
            }
            Control::ResyncStart { base_lsn, region_bytes, regions, bytes } => {
                tracing::info!(volume = %name, base_lsn, regions, bytes, "resync started: the replica stays at its consistent state until it commits");
                match blocking(replica, move |r| r.resync_start(base_lsn, region_bytes, bytes)).await {
                    Ok(()) => {
                        let applied = lock(replica).applied_lsn();
                        Ok(write_control(send, &Control::Ack { received_lsn: base_lsn, applied_lsn: applied }).await?)
                    }
                    Err(ApplierError::Replica(ReplicaError::Stage(reason))) => {
                        tracing::warn!(volume = %name, %reason, "resync refused");
                        Ok(write_control(send, &Control::ResyncRefused { reason }).await?)
                    }
                    Err(error) => Err(error),
                }
            }
            other => Err(LinkError::Protocol(format!("unexpected {other:?} during streaming")).into()),
        }
    }

    /// The steps of a running resync: hashes of the replica's view, region contents into
    /// the stage, the commit.
    async fn resync_step(
        &self,
        name: &str,
        replica: &Arc<Mutex<Replica>>,
        send: &mut quinn::SendStream,
        control: Control,
        syncing: &mut Option<Checkpointing>,
    ) -> Result<(), ApplierError> {
        match control {
            Control::ResyncHashes { at_lsn, regions, hashes } => {
                let differ = blocking(replica, move |r| r.resync_hashes(at_lsn, &regions, &hashes)).await?;
                Ok(write_control(send, &Control::ResyncDiffer { regions: differ }).await?)
            }
            Control::ResyncChunk { at_lsn, region, zero, data } => {
                let chunks = blocking(replica, move |r| r.resync_chunk(at_lsn, region, zero, &data)).await?;
                Ok(write_control(send, &Control::ResyncStored { chunks }).await?)
            }
            Control::ResyncDone { at_lsn } => {
                finish_checkpoint(replica, send, syncing).await?;
                let lsn = blocking(replica, move |r| r.resync_done(at_lsn)).await?;
                tracing::info!(volume = %name, lsn, "resync committed: the replica is consistent at the new LSN");
                write_control(send, &Control::ResyncCommitted { at_lsn: lsn }).await?;
                acknowledge(replica, send, lsn).await
            }
            other => Err(LinkError::Protocol(format!("unexpected {other:?} in a resync")).into()),
        }
    }

    pub fn status(&self) -> ApplierStatus {
        let fingerprint = crate::identity::fingerprint(&self.dir.identity()).unwrap_or_default();
        let mut replicas: Vec<ReplicaStatus> = lock(&self.replicas)
            .iter()
            .map(|(name, slot)| {
                let r = lock(&slot.replica);
                let counters = r.counters();
                ReplicaStatus {
                    volume: name.clone(),
                    image: r.state().image.display().to_string(),
                    received_lsn: r.received_lsn(),
                    applied_lsn: r.applied_lsn(),
                    consistent: r.state().is_consistent(),
                    consistent_lsn: r.state().is_consistent().then(|| r.applied_lsn()),
                    resync: r.resync_progress().map(|(base_lsn, staged_bytes)| ResyncProgress { base_lsn, staged_bytes }),
                    connected: slot.connected,
                    records_received: counters.records_received,
                    records_duplicated: counters.records_duplicated,
                    bytes_received: counters.bytes_received,
                    connections: slot.connections,
                    snapshots: r.snapshot_count(),
                    snapshot_bytes: r.snapshot_bytes(),
                    generation: Some(r.state().generation),
                    promoted_to: r.promoted_to().map(|p| p.display().to_string()),
                }
            })
            .collect();
        // Replicas on disk that no source has connected to since start.
        for (name, state) in replicas_on_disk(&self.dir) {
            if !replicas.iter().any(|r| r.volume == name) {
                replicas.push(offline_replica(&self.dir, name, state));
            }
        }
        replicas.sort_by(|a, b| a.volume.cmp(&b.volume));
        ApplierStatus { running: true, fingerprint, listen: self.local_addr().map(|a| a.to_string()), replicas }
    }
}

/// Starts a checkpoint whose image sync runs off the runtime without holding the replica:
/// batches go on being received and applied meanwhile. Resolves to the applied LSN.
fn start_checkpoint(replica: &Arc<Mutex<Replica>>) -> Checkpointing {
    let replica = replica.clone();
    tokio::task::spawn_blocking(move || {
        let begun = lock(&replica).begin_checkpoint();
        let Some(pending) = begun else { return Ok(lock(&replica).applied_lsn()) };
        pending.sync_image()?;
        Ok(lock(&replica).finish_checkpoint(pending)?)
    })
}

/// Waits for the checkpoint in progress, if any, and acknowledges what it made durable.
async fn finish_checkpoint(replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, syncing: &mut Option<Checkpointing>) -> Result<(), ApplierError> {
    let Some(task) = syncing.take() else { return Ok(()) };
    let applied = task.await.map_err(|e| LinkError::Protocol(e.to_string()))??;
    acknowledge(replica, send, applied).await
}

/// Tells the source the replica's checkpoints after a checkpoint made `applied` durable.
async fn acknowledge(replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, applied: u64) -> Result<(), ApplierError> {
    let received = lock(replica).received_lsn();
    Ok(write_control(send, &Control::Ack { received_lsn: received, applied_lsn: applied }).await?)
}

/// Runs one replica operation off the async runtime (they do file I/O and fsync).
async fn blocking<T: Send + 'static>(
    replica: &Arc<Mutex<Replica>>,
    operation: impl FnOnce(&mut Replica) -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, ApplierError> {
    let worker = replica.clone();
    Ok(tokio::task::spawn_blocking(move || operation(&mut lock(&worker))).await.map_err(|e| LinkError::Protocol(e.to_string()))??)
}

/// An image sync running off the runtime; resolves to the applied LSN it made durable.
type Checkpointing = tokio::task::JoinHandle<Result<u64, ApplierError>>;

/// Resync steps after its start: they go to the stage, not through an image checkpoint.
fn is_resync_step(control: &Control) -> bool {
    matches!(control, Control::ResyncHashes { .. } | Control::ResyncChunk { .. } | Control::ResyncDone { .. })
}
