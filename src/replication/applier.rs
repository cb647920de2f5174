//! The applier daemon: accepts mutually authenticated QUIC connections from volumes, keeps one
//! [`Replica`] per volume under `ADIR/replicas/NAME`, and answers each batch with checkpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::framing::{read_frame, write_control, LinkError};
use super::replica::Replica;
use super::tls;
use super::wire::{Control, Frame, Refusal};
use crate::lock;

pub const IDENTITY_DIR: &str = "identity";
pub const ALLOWED_FILE: &str = "allowed";
pub const REPLICAS_DIR: &str = "replicas";
pub const CONTROL_SOCKET: &str = "control.sock";
/// The image is made durable (and `applied` acknowledged) after this many applied records
/// or bytes...
const CHECKPOINT_RECORDS: u64 = 16384;
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// ...or this long after the first record applied since the last checkpoint.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1000);

/// Creates an applier directory with its identity; returns the certificate fingerprint.
pub fn init(dir: &Path) -> Result<String, LinkError> {
    if dir.join(IDENTITY_DIR).exists() {
        return Err(LinkError::Protocol(format!("{} already holds an applier; refusing to overwrite its identity", dir.display())));
    }
    std::fs::create_dir_all(dir.join(REPLICAS_DIR))?;
    crate::fsutil::write_atomic(&dir.join(ALLOWED_FILE), b"")?;
    super::applier_config::ApplierConfig::write_template(dir).map_err(|e| LinkError::Protocol(e.to_string()))?;
    crate::identity::create(&dir.join(IDENTITY_DIR), "applier").map_err(|e| LinkError::Protocol(e.to_string()))
}

/// Fingerprints of sources the applier accepts (one per line in `ADIR/allowed`).
pub fn allowed(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(ALLOWED_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Adds a fingerprint to `ADIR/allowed` (idempotent).
pub fn allow(dir: &Path, fingerprint: &str) -> Result<bool, LinkError> {
    let fingerprint = crate::identity::parse_fingerprint(fingerprint).map_err(|e| LinkError::Protocol(e.to_string()))?;
    if !dir.join(IDENTITY_DIR).exists() {
        return Err(LinkError::Protocol(format!("{} holds no applier; run `ublk-mirror applier init` first", dir.display())));
    }
    let mut list = allowed(dir);
    if list.contains(&fingerprint) {
        return Ok(false);
    }
    list.push(fingerprint);
    crate::fsutil::write_atomic(&dir.join(ALLOWED_FILE), format!("{}\n", list.join("\n")).as_bytes())?;
    Ok(true)
}

/// Names an existing image for the replica of `volume`, used when that volume first connects.
pub const ATTACH_FILE: &str = "attach.json";

/// `applier replica add`: records `image` as the replica of `volume`. Refuses an applier
/// that already holds that replica, a bad name, and a missing or unusable image.
pub fn attach_image(dir: &Path, volume: &str, image: &Path) -> Result<PathBuf, LinkError> {
    if !dir.join(IDENTITY_DIR).exists() {
        return Err(LinkError::Protocol(format!("{} holds no applier; run `ublk-mirror applier init` first", dir.display())));
    }
    crate::volume::config::validate_name(volume).map_err(|e| LinkError::Protocol(format!("--volume: {e}")))?;
    let replica_dir = dir.join(REPLICAS_DIR).join(volume);
    if replica_dir.join(super::replica::STATE_FILE).exists() {
        return Err(LinkError::Protocol(format!("{} already holds the replica of {volume}; it cannot be replaced while it exists", replica_dir.display())));
    }
    let image = std::path::absolute(image)?;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&image).map_err(|e| LinkError::Protocol(format!("image {}: {e}", image.display())))?;
    let size = crate::fsutil::storage_size(&file)?;
    if size == 0 {
        return Err(LinkError::Protocol(format!("image {} is empty; it must be exactly the volume's size", image.display())));
    }
    std::fs::create_dir_all(&replica_dir)?;
    let record = serde_json::json!({ "image": image, "size": size });
    crate::fsutil::write_atomic(&replica_dir.join(ATTACH_FILE), record.to_string().as_bytes())?;
    Ok(image)
}

/// One replica as `applier status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub volume: String,
    pub image: String,
    pub received_lsn: u64,
    pub applied_lsn: u64,
    pub consistent: bool,
    pub connected: bool,
    pub records_received: u64,
    pub records_duplicated: u64,
    /// Payload bytes received (records and synchronisation chunks) since the applier started.
    #[serde(default)]
    pub bytes_received: u64,
    /// Connections accepted from the source since the applier started.
    #[serde(default)]
    pub connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplierStatus {
    pub running: bool,
    pub fingerprint: String,
    pub listen: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
}

struct Slot {
    replica: Arc<Mutex<Replica>>,
    connected: bool,
    connections: u64,
}

/// Shared state of a running applier.
pub struct Applier {
    dir: PathBuf,
    extra_allowed: Vec<String>,
    idle_timeout: std::time::Duration,
    replicas: Mutex<HashMap<String, Slot>>,
    listen: Mutex<Option<SocketAddr>>,
}

impl Applier {
    pub fn new(dir: &Path, extra_allowed: Vec<String>, idle_timeout: std::time::Duration) -> Arc<Applier> {
        Arc::new(Applier { dir: dir.to_path_buf(), extra_allowed, idle_timeout, replicas: Mutex::new(HashMap::new()), listen: Mutex::new(None) })
    }

    /// Binds `listen`, calls `ready` with the bound address, and serves until `stop` resolves.
    pub async fn serve(self: Arc<Self>, listen: SocketAddr, ready: impl FnOnce(SocketAddr), stop: impl std::future::Future<Output = ()>) -> Result<(), LinkError> {
        let identity = tls::Identity::load(&self.dir.join(IDENTITY_DIR))?;
        let dir = self.dir.clone();
        let extra = self.extra_allowed.clone();
        let allow: tls::AllowList = Arc::new(move |fingerprint: &str| extra.iter().any(|f| f == fingerprint) || allowed(&dir).iter().any(|f| f == fingerprint));
        let endpoint = tls::endpoint(listen, Some(tls::server_config(&identity, allow, self.idle_timeout)?))?;
        *lock(&self.listen) = endpoint.local_addr().ok();
        tracing::info!(listen = %endpoint.local_addr()?, fingerprint = %identity.fingerprint, "applier listening");
        ready(endpoint.local_addr()?);
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

    async fn handle(self: Arc<Self>, incoming: quinn::Incoming) -> Result<(), LinkError> {
        let connection = incoming.await?;
        let (mut send, mut recv) = connection.accept_bi().await?;
        let hello = match read_frame(&mut recv).await? {
            Some(Frame::Control(Control::Hello(hello))) => hello,
            other => return Err(LinkError::Protocol(format!("expected Hello, got {other:?}"))),
        };
        let name = hello.volume_name.clone();
        if crate::volume::config::validate_name(&name).is_err() {
            let refusal = Refusal::Other(format!("invalid volume name {name:?}"));
            write_control(&mut send, &Control::Refused(refusal.clone())).await?;
            return Err(LinkError::Refused(refusal));
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
                    return Err(LinkError::Refused(refusal));
                }
            }
        };
        let refusal = lock(&replica).check_hello(&hello).err();
        if let Some(refusal) = refusal {
            tracing::warn!(volume = %name, reason = %refusal, "refused a source");
            write_control(&mut send, &Control::Refused(refusal.clone())).await?;
            let _ = send.finish();
            connection.closed().await;
            return Err(LinkError::Refused(refusal));
        }
        let already_connected = {
            let mut replicas = lock(&self.replicas);
            let slot = replicas.get_mut(&name).expect("registered by replica_for");
            let already = std::mem::replace(&mut slot.connected, true);
            slot.connections += !already as u64;
            already
        };
        if already_connected {
            let refusal = Refusal::Other(format!("volume {name} is already connected"));
            write_control(&mut send, &Control::Refused(refusal.clone())).await?;
            return Err(LinkError::Refused(refusal));
        }
        let result = self.stream(&name, &replica, &mut send, recv).await;
        if let Some(slot) = lock(&self.replicas).get_mut(&name) {
            slot.connected = false;
        }
        result
    }

    fn replica_for(&self, hello: &super::wire::Hello) -> Result<Arc<Mutex<Replica>>, LinkError> {
        let mut replicas = lock(&self.replicas);
        if let Some(slot) = replicas.get(&hello.volume_name) {
            return Ok(slot.replica.clone());
        }
        let dir = self.dir.join(REPLICAS_DIR).join(&hello.volume_name);
        let replica = if dir.join(super::replica::STATE_FILE).exists() {
            Replica::open(&dir)?
        } else if let Ok(text) = std::fs::read(dir.join(ATTACH_FILE)) {
            let record: serde_json::Value = serde_json::from_slice(&text).map_err(|e| LinkError::Protocol(format!("{}: {e}", dir.join(ATTACH_FILE).display())))?;
            let image = PathBuf::from(record["image"].as_str().unwrap_or_default());
            tracing::info!(volume = %hello.volume_name, image = %image.display(), "creating replica on the attached image");
            Replica::create(&dir, hello, Some(&image))?
        } else {
            tracing::info!(volume = %hello.volume_name, size = hello.size, "creating replica for a new source");
            Replica::create(&dir, hello, None)?
        };
        let replica = Arc::new(Mutex::new(replica));
        replicas.insert(hello.volume_name.clone(), Slot { replica: replica.clone(), connected: false, connections: 0 });
        Ok(replica)
    }

    async fn stream(&self, name: &str, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), LinkError> {
        let (received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn) = {
            let r = lock(replica);
            (r.received_lsn(), r.applied_lsn(), r.state().consistent, r.state().needs_sync(), r.state().consistent_lsn)
        };
        write_control(send, &Control::Welcome { received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn }).await?;
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
        // Whatever was applied is made durable (and acknowledged, if the source still listens).
        let applied = blocking(replica, |r| r.checkpoint()).await;
        if let (Ok(()), Ok(applied)) = (&result, &applied) {
            let _ = acknowledge(replica, send, *applied).await;
        }
        result?;
        applied?;
        reader.await.map_err(|e| LinkError::Protocol(e.to_string()))?
    }

    /// Handles frames until the reader stops. Records become durable in the replica's journal
    /// and are acknowledged as `received` batch by batch; they are applied to the image at once
    /// (from memory) but made durable there (an image sync, `applied` acknowledged) only every
    /// [`CHECKPOINT_RECORDS`] records, [`CHECKPOINT_BYTES`] or [`CHECKPOINT_INTERVAL`]. The image
    /// sync runs beside the batches that keep arriving (one at a time), so the journal and the
    /// image are written to concurrently rather than in turns.
    async fn process(&self, name: &str, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, frames: &mut tokio::sync::mpsc::Receiver<Frame>) -> Result<(), LinkError> {
        let mut checkpoint_due: Option<tokio::time::Instant> = None;
        let mut syncing: Option<tokio::task::JoinHandle<Result<u64, LinkError>>> = None;
        // A control frame read while gathering record batches, handled next.
        let mut held: Option<Frame> = None;
        loop {
            let frame = if let Some(frame) = held.take() { Some(frame) } else { tokio::select! {
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
            }};
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
            let (received, applied, unsynced) = blocking(replica, move |r| {
                let received = r.receive(&records)?;
                r.apply_received(&records)?;
                Ok((received, r.applied_lsn(), r.unsynced()))
            })
            .await?;
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

    async fn checkpoint(&self, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream) -> Result<(), LinkError> {
        let applied = blocking(replica, |r| r.checkpoint()).await?;
        acknowledge(replica, send, applied).await
    }

    async fn control(&self, name: &str, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, control: Control) -> Result<(), LinkError> {
        match control {
            Control::SyncStart { base_lsn } => {
                tracing::info!(volume = %name, base_lsn, "initial synchronisation started");
                blocking(replica, |r| r.sync_start()).await
            }
            Control::SyncHashes { first_chunk, hashes } => {
                let differ = blocking(replica, move |r| r.differing_chunks(first_chunk, &hashes)).await?;
                write_control(send, &Control::SyncDiffer { first_chunk, differ }).await
            }
            Control::SyncChunk { chunk, zero, data } => blocking(replica, move |r| r.write_chunk(chunk, zero, &data)).await,
            Control::SyncDone { base_lsn, consistent_lsn } => {
                blocking(replica, move |r| r.sync_done(base_lsn, consistent_lsn)).await?;
                tracing::info!(volume = %name, base_lsn, consistent_lsn, "initial synchronisation copied; replaying the journal");
                write_control(send, &Control::Ack { received_lsn: base_lsn, applied_lsn: base_lsn }).await
            }
            other => Err(LinkError::Protocol(format!("unexpected {other:?} during streaming"))),
        }
    }

    pub fn status(&self) -> ApplierStatus {
        let fingerprint = crate::identity::fingerprint(&self.dir.join(IDENTITY_DIR)).unwrap_or_default();
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
                    consistent: r.state().consistent,
                    connected: slot.connected,
                    records_received: counters.records_received,
                    records_duplicated: counters.records_duplicated,
                    bytes_received: counters.bytes_received,
                    connections: slot.connections,
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
fn start_checkpoint(replica: &Arc<Mutex<Replica>>) -> tokio::task::JoinHandle<Result<u64, LinkError>> {
    let replica = replica.clone();
    tokio::task::spawn_blocking(move || {
        let begun = lock(&replica).begin_checkpoint();
        let Some(pending) = begun else { return Ok(lock(&replica).applied_lsn()) };
        pending.sync_image()?;
        Ok(lock(&replica).finish_checkpoint(pending)?)
    })
}

/// Waits for the checkpoint in progress, if any, and acknowledges what it made durable.
async fn finish_checkpoint(replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, syncing: &mut Option<tokio::task::JoinHandle<Result<u64, LinkError>>>) -> Result<(), LinkError> {
    let Some(task) = syncing.take() else { return Ok(()) };
    let applied = task.await.map_err(|e| LinkError::Protocol(e.to_string()))??;
    acknowledge(replica, send, applied).await
}

/// Tells the source the replica's checkpoints after a checkpoint made `applied` durable.
async fn acknowledge(replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, applied: u64) -> Result<(), LinkError> {
    let received = lock(replica).received_lsn();
    write_control(send, &Control::Ack { received_lsn: received, applied_lsn: applied }).await
}

/// One line for systemd's STATUS=: each replica's LSNs and state.
pub fn one_line(status: &ApplierStatus) -> String {
    if status.replicas.is_empty() {
        return "no replicas yet".into();
    }
    let parts: Vec<String> = status
        .replicas
        .iter()
        .map(|r| {
            format!(
                "{} applied {} {} {}",
                r.volume,
                r.applied_lsn,
                if r.consistent { "consistent" } else { "INCONSISTENT" },
                if r.connected { "connected" } else { "disconnected" }
            )
        })
        .collect();
    parts.join("; ")
}

/// Runs one replica operation off the async runtime (they do file I/O and fsync).
async fn blocking<T: Send + 'static>(
    replica: &Arc<Mutex<Replica>>,
    operation: impl FnOnce(&mut Replica) -> Result<T, super::replica::ReplicaError> + Send + 'static,
) -> Result<T, LinkError> {
    let worker = replica.clone();
    Ok(tokio::task::spawn_blocking(move || operation(&mut lock(&worker))).await.map_err(|e| LinkError::Protocol(e.to_string()))??)
}

fn replicas_on_disk(dir: &Path) -> Vec<(String, super::replica::ReplicaState)> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join(REPLICAS_DIR)) {
        for entry in entries.flatten() {
            let path = entry.path().join(super::replica::STATE_FILE);
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(state) = serde_json::from_str(&text) {
                    found.push((entry.file_name().to_string_lossy().into_owned(), state));
                }
            }
        }
    }
    found
}

fn offline_replica(dir: &Path, name: String, state: super::replica::ReplicaState) -> ReplicaStatus {
    let received = crate::journal::Journal::inspect(&dir.join(REPLICAS_DIR).join(&name).join(super::replica::JOURNAL_DIR)).map(|r| r.last_lsn).unwrap_or(state.applied_lsn);
    ReplicaStatus {
        volume: name,
        image: state.image.display().to_string(),
        received_lsn: received,
        applied_lsn: state.applied_lsn,
        consistent: state.consistent,
        connected: false,
        records_received: 0,
        records_duplicated: 0,
        bytes_received: 0,
        connections: 0,
    }
}

/// Status from the files of an applier that is not running.
pub fn offline_status(dir: &Path) -> Result<ApplierStatus, LinkError> {
    let fingerprint = crate::identity::fingerprint(&dir.join(IDENTITY_DIR)).map_err(|e| LinkError::Protocol(e.to_string()))?;
    let mut replicas: Vec<ReplicaStatus> = replicas_on_disk(dir).into_iter().map(|(name, state)| offline_replica(dir, name, state)).collect();
    replicas.sort_by(|a, b| a.volume.cmp(&b.volume));
    Ok(ApplierStatus { running: false, fingerprint, listen: None, replicas })
}
