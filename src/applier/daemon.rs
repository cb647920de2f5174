//! The applier daemon: accepts mutually authenticated QUIC connections from volumes, keeps one
//! [`Replica`] per source and volume under `ADIR/replicas/SOURCE/NAME` (the source being the
//! certificate it presents; `registry.rs` finds and opens them), and answers each batch with
//! checkpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::admin::allowed;
use super::registry::Slot;
use super::replica::{Replica, ReplicaError};
use super::ApplierError;
use crate::layout::{ApplierDir, ReplicaKey};
use crate::lock;
use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::wire::{Control, Frame, Refusal};
use crate::protocol::{tls, transport};

/// The image is made durable (and `applied` acknowledged) after this many applied records
/// or bytes...
const CHECKPOINT_RECORDS: u64 = 16384;
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// ...or this long after the first record applied since the last checkpoint...
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1000);
/// ...or once no batch has arrived for this long: a source that stopped writing (a drained
/// backlog, the end of a burst) sees its replica applied at once, not up to a second later.
/// Longer than the gap between batches of a stream that keeps a WAN link busy (4 MiB at
/// 50 MB/s: 84 ms), so a steady stream still syncs its image once a second.
const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a refused connection, or one whose session ended, is kept open for the source to
/// read the last frames.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Shared state of a running applier.
pub struct Applier {
    pub(super) dir: ApplierDir,
    extra_allowed: Vec<String>,
    idle_timeout: std::time::Duration,
    /// The replicas opened so far (`registry.rs`).
    pub(super) replicas: Mutex<HashMap<ReplicaKey, Slot>>,
    listen: Mutex<Option<SocketAddr>>,
    /// The last disk error of each replica that hit one, by replica (`registry.rs`).
    pub(super) disk_failures: Mutex<HashMap<String, String>>,
}

impl Applier {
    pub fn new(dir: &Path, extra_allowed: Vec<String>, idle_timeout: std::time::Duration) -> Arc<Applier> {
        Arc::new(Applier {
            dir: ApplierDir::new(dir),
            extra_allowed,
            idle_timeout,
            replicas: Mutex::new(HashMap::new()),
            listen: Mutex::new(None),
            disk_failures: Mutex::new(HashMap::new()),
        })
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
        let endpoint =
            transport::applier_endpoint(listen, server, &identity).map_err(|source| ApplierError::Io { context: format!("listen on {listen}"), source })?;
        let bound = endpoint.local_addr().map_err(|source| ApplierError::Io { context: "local address".into(), source })?;
        *lock(&self.listen) = Some(bound);
        tracing::info!(listen = %bound, fingerprint = %identity.fingerprint, "applier listening");
        super::replicas::log_unbound(&self.dir);
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
                            tracing::warn!(%peer, error = %crate::describe(&error), "replication connection ended");
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
        // The source is the certificate it presented: its replicas are kept under its id.
        let Some(source) = transport::peer_fingerprint(&connection) else {
            return Err(LinkError::Protocol("the source presented no certificate".into()).into());
        };
        let hello = match read_frame(&mut recv).await? {
            Some(Frame::Control(Control::Hello(hello))) => hello,
            Some(Frame::Control(Control::Switchover { hello, to, mirror, applier_address, applier_fingerprint })) => {
                let applier = self.clone();
                let request = super::failover::SwitchoverAsk { hello, source, to, mirror, applier_address, applier_fingerprint };
                let reply = tokio::task::spawn_blocking(move || applier.switchover(&request)).await.map_err(|e| LinkError::Protocol(e.to_string()))?;
                let reply = match reply {
                    Ok(switched) => switched,
                    Err(refusal) => {
                        tracing::warn!(reason = %refusal, "refused a switchover");
                        Control::Refused(refusal)
                    }
                };
                write_control(&mut send, &reply).await?;
                end_connection(&connection, &mut send, b"switchover answered").await;
                return Ok(());
            }
            Some(Frame::Control(Control::RestoreStart { hello })) => {
                let result = self.clone().restore(&hello, &source, &mut send, &mut recv).await;
                let _ = send.finish();
                return result;
            }
            other => return Err(LinkError::Protocol(format!("expected Hello, got {other:?}")).into()),
        };
        // Before any replica is opened or made: a sender of another version changes nothing.
        if let Err(refusal) = crate::protocol::wire::check_protocol(&hello) {
            tracing::warn!(volume = %hello.volume_name, reason = %refusal, "refused a source");
            return Err(refuse(&connection, &mut send, refusal).await);
        }
        let name = hello.volume_name.clone();
        if crate::name::validate(&name).is_err() {
            let refusal = Refusal::Other(format!("invalid volume name {name:?}"));
            return Err(refuse(&connection, &mut send, refusal).await);
        }
        // One replica per source and volume name; opened on first use, created on the first
        // connection.
        let (key, replica) = {
            let applier = self.clone();
            let hello = hello.clone();
            match tokio::task::spawn_blocking(move || applier.replica_for(&hello, &source, true)).await.map_err(|e| LinkError::Protocol(e.to_string()))? {
                Ok(found) => found,
                Err(error) => {
                    // Tell the source why (e.g. an attached image of the wrong size).
                    let refusal = Refusal::Other(format!("cannot open the replica of {name}: {}", crate::describe(&error)));
                    return Err(refuse(&connection, &mut send, refusal).await);
                }
            }
        };
        let refusal = lock(&replica).check_hello(&hello).err().map(|refusal| self.with_promoted_position(refusal));
        if let Some(refusal) = refusal {
            tracing::warn!(replica = %key, source_last_lsn = hello.last_lsn, reason = %refusal, "refused a source");
            return Err(refuse(&connection, &mut send, refusal).await);
        }
        let session = match self.claim(&key, &replica, &connection).await {
            Ok(session) => session,
            Err(reason) => {
                let refusal = Refusal::Other(reason);
                tracing::warn!(replica = %key, reason = %refusal, "refused a source");
                return Err(refuse(&connection, &mut send, refusal).await);
            }
        };
        // The replica may have changed while an old session ended (a forced promote).
        let refusal = lock(&replica).check_hello(&hello).err().map(|refusal| self.with_promoted_position(refusal));
        let result = match refusal {
            Some(refusal) => {
                tracing::warn!(replica = %key, reason = %refusal, "refused a source");
                let _ = write_control(&mut send, &Control::Refused(refusal.clone())).await;
                Err(LinkError::Refused(refusal).into())
            }
            None => self.stream(&key.to_string(), &replica, &mut send, recv).await,
        };
        let mut failed = None;
        if let Some(slot) = Applier::release(&mut lock(&self.replicas), &key, session) {
            if let Some(error) = disk_error(&result) {
                // What the replica holds in memory may not be what its disk holds after a
                // failed write or sync: the next connection opens it again from its files
                // (journal recovery, redo from `applied`), and fails again while the disk does.
                tracing::error!(replica = %key, error = %error, "replica disk error: it is reopened at the next connection");
                slot.reopen = true;
                failed = Some(error.to_string());
            }
        }
        if let Some(error) = failed {
            self.set_disk_failure(&key, error);
        }
        // The connection ends with its session (else its frame reader could keep it open while
        // nothing reads it).
        end_connection(&connection, &mut send, b"session ended").await;
        result
    }

    async fn stream(&self, name: &str, replica: &Arc<Mutex<Replica>>, send: &mut quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), ApplierError> {
        let (received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn, local_changes) = {
            let r = lock(replica);
            (r.received_lsn(), r.applied_lsn(), r.state().is_consistent(), r.state().needs_sync(), r.state().consistent_lsn(), r.local_changes()?)
        };
        let codecs = crate::protocol::compression::CODECS.iter().map(|c| c.to_string()).collect();
        write_control(send, &Control::Welcome { received_lsn, applied_lsn, consistent, needs_sync, consistent_lsn, local_changes, codecs }).await?;
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
        let mut syncing = None;
        let result = self.process(name, replica, send, &mut frames, &mut syncing).await;
        if let Some(leftover) = syncing {
            // A session that failed mid-checkpoint: the image sync finishes before anything
            // else touches the replica (the final checkpoint below, a superseding session).
            let _ = leftover.await;
        }
        drop(frames);
        // The reader's verdict counts too: a frame that failed to decode (garbage, a bomb)
        // ends the session as an error, and nothing is acknowledged after it.
        let result = match result {
            Ok(()) => reader.await.map_err(|e| LinkError::Protocol(e.to_string())).and_then(|read| read).map_err(ApplierError::from),
            Err(error) => {
                reader.abort();
                Err(error)
            }
        };
        if let Some(error) = disk_error(&result) {
            // Nothing of the failed batch was acknowledged; tell the source why it stops
            // being acknowledged (its mirror status shows it), then reconnect later.
            let refusal = Refusal::Other(format!("the applier's disk failed, nothing more is acknowledged until it is fixed: {error}"));
            let _ = write_control(send, &Control::Refused(refusal)).await;
        }
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
        Ok(())
    }

    /// Handles frames until the reader stops. Records become durable in the replica's journal
    /// and are acknowledged as `received` batch by batch; they are applied to the image at once
    /// (from memory) but made durable there (an image sync, `applied` acknowledged) only every
    /// [`CHECKPOINT_RECORDS`] records, [`CHECKPOINT_BYTES`], [`CHECKPOINT_INTERVAL`] or
    /// [`CHECKPOINT_IDLE`] without a batch. The image
    /// sync runs beside the batches that keep arriving (one at a time), so the journal and the
    /// image are written to concurrently rather than in turns.
    async fn process(
        &self,
        name: &str,
        replica: &Arc<Mutex<Replica>>,
        send: &mut quinn::SendStream,
        frames: &mut tokio::sync::mpsc::Receiver<Frame>,
        syncing: &mut Option<Checkpointing>,
    ) -> Result<(), ApplierError> {
        let mut checkpoint_due: Option<tokio::time::Instant> = None;
        let mut last_batch = tokio::time::Instant::now();
        // A control frame read while gathering record batches, handled next.
        let mut held: Option<Frame> = None;
        loop {
            let frame = if let Some(frame) = held.take() {
                Some(frame)
            } else {
                tokio::select! {
                    frame = frames.recv() => frame,
                    finished = async { syncing.as_mut().expect("enabled only while syncing").await }, if syncing.is_some() => {
                        *syncing = None;
                        let applied = finished.map_err(|e| LinkError::Protocol(e.to_string()))??;
                        acknowledge(replica, send, applied).await?;
                        continue;
                    }
                    _ = tokio::time::sleep_until(checkpoint_due.map_or_else(tokio::time::Instant::now, |due| due.min(last_batch + CHECKPOINT_IDLE))), if checkpoint_due.is_some() && syncing.is_none() => {
                        checkpoint_due = None;
                        *syncing = Some(start_checkpoint(replica));
                        continue;
                    }
                }
            };
            let Some(frame) = frame else {
                finish_checkpoint(replica, send, syncing).await?;
                return Ok(());
            };
            let work = match frame {
                Frame::Range(range) => Received::Range(Box::new(range)),
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
                    Received::Records(records)
                }
                Frame::Control(Control::VerifyHashes { at_lsn, chunk_bytes, chunks, hashes }) => {
                    // Every record before it is applied: the image is the source's at `at_lsn`.
                    let outcome = blocking(replica, move |r| r.verify_chunks(at_lsn, chunk_bytes, &chunks, &hashes)).await?;
                    let (differ, skipped) = outcome.map_or_else(|reason| (Vec::new(), Some(reason)), |differ| (differ, None));
                    write_control(send, &Control::VerifyResult { at_lsn, differ, skipped }).await?;
                    continue;
                }
                Frame::Control(control) if is_resync_step(&control) => {
                    // Resync steps go to the stage; the image is not written until the commit.
                    self.resync_step(name, replica, send, control, syncing).await?;
                    continue;
                }
                Frame::Control(control) => {
                    // Synchronisation steps start from a durable image.
                    finish_checkpoint(replica, send, syncing).await?;
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
                finish_checkpoint(replica, send, syncing).await?;
                self.checkpoint(replica, send).await?;
                checkpoint_due = None;
            }
            // Durable in our journal first (the source may trim up to it), then applied.
            let (received, applied, unsynced, taken) = blocking(replica, move |r| {
                let received = match &work {
                    Received::Records(records) => {
                        let received = r.receive(records)?;
                        r.apply_received(records)?;
                        received
                    }
                    // A coalesced range: durable whole, then applied whole.
                    Received::Range(range) => {
                        let received = r.receive_range(range)?;
                        r.apply_received_range(range)?;
                        received
                    }
                };
                Ok((received, r.applied_lsn(), r.unsynced(), r.take_new_snapshots()))
            })
            .await?;
            if !taken.is_empty() {
                self.record_groups(&taken);
            }
            self.clear_disk_failure(name);
            write_control(send, &Control::Ack { received_lsn: received, applied_lsn: applied }).await?;
            last_batch = tokio::time::Instant::now();
            let (unsynced_records, unsynced_bytes) = unsynced;
            if unsynced_records >= CHECKPOINT_RECORDS || unsynced_bytes >= CHECKPOINT_BYTES {
                // Now, or as soon as the checkpoint in progress is done.
                checkpoint_due = Some(tokio::time::Instant::now());
                if syncing.is_none() {
                    checkpoint_due = None;
                    *syncing = Some(start_checkpoint(replica));
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
}

/// What a step of the stream brought: record batches (those that queued up, together) or
/// one coalesced range.
enum Received {
    Records(Vec<crate::protocol::wire::ReceivedRecord>),
    Range(Box<crate::protocol::wire::ReceivedRange>),
}

/// Tells the source why it is refused and ends the connection (`end_connection`); the error
/// `handle` returns for it.
async fn refuse(connection: &quinn::Connection, send: &mut quinn::SendStream, refusal: Refusal) -> ApplierError {
    let _ = write_control(send, &Control::Refused(refusal.clone())).await;
    end_connection(connection, send, b"refused").await;
    LinkError::Refused(refusal).into()
}

/// Ends a connection after its last answer: the stream is finished so what was written goes
/// out first, the source (which closes once it has read it) is given [`REFUSAL_WAIT`], and
/// then the connection is closed whatever the source does: a source that keeps it open with
/// keep-alives holds no task here.
async fn end_connection(connection: &quinn::Connection, send: &mut quinn::SendStream, reason: &'static [u8]) {
    let _ = send.finish();
    let _ = tokio::time::timeout(REFUSAL_WAIT, connection.closed()).await;
    connection.close(0u32.into(), reason);
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
/// The replica's disk error that ended a session, if that is what ended it.
fn disk_error<T>(result: &Result<T, ApplierError>) -> Option<&ReplicaError> {
    match result {
        Err(ApplierError::Replica(error)) if error.is_disk_error() => Some(error),
        _ => None,
    }
}

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
