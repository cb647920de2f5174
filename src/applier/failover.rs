//! The applier's side of failover: `replica promote` through a running applier (the
//! `replica-promote` control request) or on its directory when none runs, and what a source
//! refused because its replica was promoted is told about the promoted volume.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::replica::{PromoteOptions, Promoted, Replica};
use super::{Applier, ApplierError};
use crate::layout::{ApplierDir, DirLock, LockError, VolumeDir};
use crate::lock;
use crate::mirror::MirrorConfig;
use std::sync::Arc;

use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::wire::{Control, Frame, Hello, Refusal, SYNC_CHUNK};

/// The `replica-promote` request (JSON after the verb).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub volume: String,
    /// The replica's source, when sources share the volume name (its id or a prefix of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub to: std::path::PathBuf,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Promote even while the source is connected (it is disconnected, and refused after).
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub journal_size: Option<u64>,
}

impl PromoteRequest {
    fn options(&self) -> PromoteOptions {
        PromoteOptions { to: self.to.clone(), snapshot: self.snapshot.clone(), journal_size: self.journal_size }
    }
}

impl Applier {
    /// `replica-promote JSON`: answers the [`Promoted`] or `{"error"}`.
    pub fn replica_request(&self, request: &str) -> Option<serde_json::Value> {
        let body = request.strip_prefix("replica-promote ")?;
        let result = serde_json::from_str::<PromoteRequest>(body)
            .map_err(|error| ApplierError::Invalid(format!("bad promote request: {error}")))
            .and_then(|request| self.promote(&request));
        Some(match result {
            Ok(promoted) => serde_json::to_value(promoted).unwrap_or_default(),
            Err(error) => serde_json::json!({ "error": format!("{error}") }),
        })
    }

    fn promote(&self, request: &PromoteRequest) -> Result<Promoted, ApplierError> {
        let (key, replica) = self.existing_replica(&request.volume, request.source.as_deref())?;
        if let Some(peer) = self.connected_source(&key) {
            if !request.force {
                return Err(ApplierError::Invalid(format!(
                    "the source of {} is connected (from {peer}) and may still be writing: stop it first, or give --force to promote anyway (it is disconnected and refused from then on)",
                    request.volume
                )));
            }
            tracing::warn!(replica = %key, %peer, "promoting while the source is connected (--force)");
        }
        // Under the replica's lock: a batch being applied finishes first, the next one is refused.
        let promoted = lock(&replica).promote(&request.options())?;
        Ok(promoted)
    }

    /// A refusal because the replica was promoted, with how far the promoted volume has
    /// written since (from its running server, or its files).
    pub(super) fn with_promoted_position(&self, refusal: Refusal) -> Refusal {
        match refusal {
            Refusal::Promoted(mut promoted) => {
                (promoted.last_lsn, promoted.written_bytes) = volume_position(Path::new(&promoted.to)).unwrap_or((promoted.branch_lsn, None));
                Refusal::Promoted(promoted)
            }
            other => other,
        }
    }
}

/// A source's `Switchover` (see `mirror::switchover`).
pub(super) struct SwitchoverAsk {
    pub hello: crate::protocol::wire::Hello,
    /// The certificate fingerprint the source presented.
    pub source: String,
    pub to: String,
    pub mirror: String,
    pub applier_address: String,
    pub applier_fingerprint: String,
}

impl Applier {
    /// A planned swap: the replica, which must have everything the source has, is promoted
    /// at that LSN; the new volume gets a mirror back to the source's own applier. Answers
    /// `SwitchedOver`, or a refusal (nothing changed).
    pub(super) fn switchover(&self, ask: &SwitchoverAsk) -> Result<Control, Refusal> {
        let name = ask.hello.volume_name.clone();
        let other = |message: String| Refusal::Other(message);
        let back = MirrorConfig {
            name: ask.mirror.clone(),
            address: ask.applier_address.clone(),
            fingerprint: ask.applier_fingerprint.clone(),
            max_rate: None,
            idle_timeout: None,
            congestion: None,
            verify_every: None,
            compression: None,
            coalesce: None,
        };
        back.validate().map_err(|e| other(format!("the mirror back to the source: {e}")))?;
        let (_, replica) = self.replica_for(&ask.hello, &ask.source, false).map_err(|e| other(e.to_string()))?;
        let mut replica = lock(&replica);
        replica.check_hello(&ask.hello)?;
        let applied = replica.apply().map_err(|e| other(e.to_string()))?;
        if applied != ask.hello.last_lsn {
            return Err(other(format!("the replica of {name} holds LSN {applied}, the source is at {}: it must have everything first", ask.hello.last_lsn)));
        }
        // By default a demoted volume's replica goes back into the volume it was; any other
        // into the applier's `volumes/NAME`.
        let to = match (ask.to.is_empty(), &replica.state().demoted_from) {
            (false, _) => std::path::PathBuf::from(&ask.to),
            (true, Some(from)) if crate::volume::Demoted::load(&VolumeDir::new(from)).ok().flatten().is_some() => from.clone(),
            (true, _) => self.applier_dir().root().join("volumes").join(&name),
        };
        let promoted = replica.promote(&PromoteOptions { to: to.clone(), snapshot: None, journal_size: None }).map_err(|e| other(e.to_string()))?;
        let vdir = VolumeDir::new(&promoted.dir);
        if crate::failpoint::hit("switchover-before-answer") {
            std::process::abort();
        }
        if let Err(error) = crate::mirror::add(&vdir, &back) {
            tracing::error!(%error, "the promoted volume has no mirror back to the old source: add it by hand");
        }
        let state = crate::volume::VolumeState::load(&vdir).map_err(|e| other(e.to_string()))?;
        let history = crate::generation::History::load_or_first(&vdir.generations(), state.generation).map_err(|e| other(e.to_string()))?;
        tracing::info!(volume = %name, to = %promoted.dir.display(), lsn = promoted.branch_lsn, "switched over: the replica is the new primary");
        Ok(Control::SwitchedOver {
            to: promoted.dir.display().to_string(),
            generation: *promoted.generation.as_bytes(),
            branch_lsn: promoted.branch_lsn,
            fingerprint: promoted.fingerprint,
            history: crate::protocol::wire::wire_history(&history),
        })
    }
}

impl Applier {
    /// The applier half of `volume restore`: the replica's image, chunk by chunk where the
    /// volume's new backing store differs. The replica must be consistent, follow the
    /// volume's generation and not be promoted; everything received is applied first.
    pub(super) async fn restore(
        self: Arc<Self>,
        hello: &Hello,
        source: &str,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), ApplierError> {
        let prepared = {
            let applier = self.clone();
            let hello = hello.clone();
            let source = source.to_string();
            tokio::task::spawn_blocking(move || -> Result<(Arc<std::sync::Mutex<Replica>>, u64), Refusal> {
                let (_, replica) = applier.replica_for(&hello, &source, false).map_err(|e| Refusal::Other(e.to_string()))?;
                let lsn = {
                    let mut r = lock(&replica);
                    r.check_hello(&hello)?;
                    if !r.state().is_consistent() {
                        return Err(Refusal::Other(format!("the replica of {} is not consistent: it cannot restore the volume", hello.volume_name)));
                    }
                    r.apply().map_err(|e| Refusal::Other(e.to_string()))?
                };
                Ok((replica, lsn))
            })
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?
        };
        let (replica, lsn) = match prepared {
            Ok(prepared) => prepared,
            Err(refusal) => {
                tracing::warn!(volume = %hello.volume_name, reason = %refusal, "refused a restore");
                write_control(send, &Control::Refused(refusal.clone())).await?;
                return Err(LinkError::Refused(refusal).into());
            }
        };
        tracing::info!(volume = %hello.volume_name, lsn, "restoring the volume from its replica");
        write_control(send, &Control::RestoreReady { lsn }).await?;
        let image = lock(&replica).image();
        let size = image.size();
        let mut sent = 0u64;
        while let Some(frame) = read_frame(recv).await? {
            let Frame::Control(Control::SyncHashes { first_chunk, hashes }) = frame else {
                return Err(LinkError::Protocol("expected SyncHashes during a restore".into()).into());
            };
            let differ = lock(&replica).differing_chunks(first_chunk, &hashes)?;
            write_control(send, &Control::SyncDiffer { first_chunk, differ: differ.clone() }).await?;
            for chunk in differ {
                let offset = chunk * SYNC_CHUNK;
                let mut data = vec![0u8; (size - offset).min(SYNC_CHUNK) as usize];
                let hole =
                    image.read_for_scan(&mut data, offset, true).map_err(|source| ApplierError::Io { context: format!("read chunk {chunk}"), source })?;
                let zero = hole || data.iter().all(|&b| b == 0);
                sent += if zero { 0 } else { data.len() as u64 };
                write_control(send, &Control::SyncChunk { chunk, zero, data: if zero { Vec::new() } else { data } }).await?;
            }
        }
        tracing::info!(volume = %hello.volume_name, lsn, bytes = sent, "restore sent");
        Ok(())
    }
}

/// The last LSN the volume in `dir` has journaled and the bytes it wrote since its branch
/// (`None` if it cannot be read).
fn volume_position(dir: &Path) -> Option<(u64, Option<u64>)> {
    let layout = VolumeDir::new(dir);
    let status = crate::control::request(&layout.control_socket(), "status")
        .ok()
        .and_then(|reply| serde_json::from_value::<crate::status::Status>(reply).ok())
        .or_else(|| crate::status::offline(&layout, |_, _| Vec::new()).ok())?;
    Some((status.volume.numbers.last_lsn, status.volume.written_since_branch_bytes))
}

/// `replica promote` on an applier directory no applier serves (its lock is taken meanwhile).
pub fn promote_offline(dir: &Path, request: &PromoteRequest) -> Result<Promoted, ApplierError> {
    let layout = ApplierDir::new(dir);
    let _lock = DirLock::acquire(&layout.lock()).map_err(|error| match error {
        LockError::Held { holder } => ApplierError::Invalid(format!("applier {} is in use by another process ({holder}) that does not answer", dir.display())),
        LockError::Io { path, source } => ApplierError::Io { context: format!("lock {}", path.display()), source },
    })?;
    let found = super::replicas::resolve(&layout, &request.volume, request.source.as_deref())?;
    let mut replica = Replica::open(found.dir.root())?;
    Ok(replica.promote(&request.options())?)
}
