//! Administering an applier directory: `applier init` (identity, documented config,
//! `allowed`), `applier allow`, `applier replica add` (an existing image for a replica made
//! on the first connection), and status from the files when no applier runs.

use std::path::{Path, PathBuf};

use super::replica::ReplicaState;
use super::ApplierError;
use crate::layout::{ApplierDir, ReplicaDir};
use crate::status::{ApplierStatus, ReplicaStatus};

fn io(context: String) -> impl FnOnce(std::io::Error) -> ApplierError {
    move |source| ApplierError::Io { context, source }
}

fn require_applier(dir: &ApplierDir) -> Result<(), ApplierError> {
    if dir.holds_applier() {
        Ok(())
    } else {
        Err(ApplierError::Invalid(format!("{} holds no applier; run `ublk-mirror applier init` first", dir.root().display())))
    }
}

/// Creates an applier directory with its identity; returns the certificate fingerprint.
pub fn init(dir: &Path) -> Result<String, ApplierError> {
    let dir = ApplierDir::new(dir);
    if dir.holds_applier() {
        return Err(ApplierError::Invalid(format!("{} already holds an applier; refusing to overwrite its identity", dir.root().display())));
    }
    std::fs::create_dir_all(dir.replicas()).map_err(io(format!("create {}", dir.replicas().display())))?;
    crate::fsutil::write_atomic(&dir.allowed(), b"").map_err(io(format!("write {}", dir.allowed().display())))?;
    super::config::ApplierConfig::write_template(&dir)?;
    Ok(crate::identity::create(&dir.identity(), "applier")?)
}

/// Fingerprints of sources the applier accepts (one per line in `ADIR/allowed`).
pub fn allowed(dir: &ApplierDir) -> Vec<String> {
    std::fs::read_to_string(dir.allowed())
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Adds a fingerprint to `ADIR/allowed` (idempotent); false if it was there already.
pub fn allow(dir: &Path, fingerprint: &str) -> Result<bool, ApplierError> {
    let dir = ApplierDir::new(dir);
    let fingerprint = crate::identity::parse_fingerprint(fingerprint)?;
    require_applier(&dir)?;
    let mut list = allowed(&dir);
    if list.contains(&fingerprint) {
        return Ok(false);
    }
    list.push(fingerprint);
    crate::fsutil::write_atomic(&dir.allowed(), format!("{}\n", list.join("\n")).as_bytes()).map_err(io(format!("write {}", dir.allowed().display())))?;
    Ok(true)
}

/// `applier replica add`: records `image` as the replica of `volume`. Refuses an applier
/// that already holds that replica, a bad name, and a missing or unusable image.
pub fn attach_image(dir: &Path, volume: &str, image: &Path) -> Result<PathBuf, ApplierError> {
    let dir = ApplierDir::new(dir);
    require_applier(&dir)?;
    crate::name::validate(volume).map_err(|e| ApplierError::Invalid(format!("--volume: {e}")))?;
    let replica = dir.replica(volume);
    if replica.holds_replica() {
        return Err(ApplierError::Invalid(format!(
            "{} already holds the replica of {volume}; it cannot be replaced while it exists",
            replica.root().display()
        )));
    }
    let image = std::path::absolute(image).map_err(io(format!("resolve {}", image.display())))?;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&image).map_err(|e| ApplierError::Invalid(format!("image {}: {e}", image.display())))?;
    let size = crate::fsutil::storage_size(&file).map_err(io(format!("size of {}", image.display())))?;
    if size == 0 {
        return Err(ApplierError::Invalid(format!("image {} is empty; it must be exactly the volume's size", image.display())));
    }
    std::fs::create_dir_all(replica.root()).map_err(io(format!("create {}", replica.root().display())))?;
    let record = serde_json::json!({ "image": image, "size": size });
    crate::fsutil::write_atomic(&replica.attach(), record.to_string().as_bytes()).map_err(io(format!("write {}", replica.attach().display())))?;
    Ok(image)
}

/// The image `applier replica add` attached for a replica not yet created, if any.
pub(super) fn attached_image(replica: &ReplicaDir) -> Result<Option<PathBuf>, ApplierError> {
    let Ok(text) = std::fs::read(replica.attach()) else { return Ok(None) };
    let record: serde_json::Value = serde_json::from_slice(&text).map_err(|e| ApplierError::Invalid(format!("{}: {e}", replica.attach().display())))?;
    match record["image"].as_str() {
        Some(image) => Ok(Some(PathBuf::from(image))),
        None => Err(ApplierError::Invalid(format!("{}: no \"image\" path", replica.attach().display()))),
    }
}

/// The replicas an applier directory holds, by volume name.
pub(super) fn replicas_on_disk(dir: &ApplierDir) -> Vec<(String, ReplicaState)> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.replicas()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(state) = ReplicaState::load(&dir.replica(&name)) {
                found.push((name, state));
            }
        }
    }
    found
}

/// A replica no source is connected to, as its files show it.
pub(super) fn offline_replica(dir: &ApplierDir, name: String, state: ReplicaState) -> ReplicaStatus {
    let received = crate::journal::Journal::inspect(&dir.replica(&name).journal()).map(|r| r.last_lsn).unwrap_or(state.applied_lsn);
    let snapshots = super::snapshot::list_on_disk(&dir.replica(&name));
    ReplicaStatus {
        snapshots: snapshots.len() as u64,
        snapshot_bytes: snapshots.iter().map(|s| s.size_bytes).sum(),
        snapshots_invalid: snapshots.iter().filter(|s| !s.valid).count() as u64,
        volume: name,
        image: state.image.display().to_string(),
        received_lsn: received,
        applied_lsn: state.applied_lsn,
        consistent: state.is_consistent(),
        consistent_lsn: state.is_consistent().then_some(state.applied_lsn),
        generation: Some(state.generation),
        promoted_to: state.promotion.as_ref().filter(|p| p.done).map(|p| p.to.display().to_string()),
        ..ReplicaStatus::default()
    }
}

/// Status from the files of an applier that is not running.
pub fn offline_status(dir: &Path) -> Result<ApplierStatus, ApplierError> {
    let dir = ApplierDir::new(dir);
    let fingerprint = crate::identity::fingerprint(&dir.identity())?;
    let mut replicas: Vec<ReplicaStatus> = replicas_on_disk(&dir).into_iter().map(|(name, state)| offline_replica(&dir, name, state)).collect();
    replicas.sort_by(|a, b| a.volume.cmp(&b.volume));
    Ok(ApplierStatus { running: false, fingerprint, listen: None, replicas })
}
