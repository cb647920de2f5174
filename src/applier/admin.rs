//! Administering an applier directory: `applier init` (identity, documented config,
//! `allowed`), `applier allow`, `applier replica add` (an existing image for a replica made
//! on the first connection), and status from the files when no applier runs.

use std::path::{Path, PathBuf};

use super::replicas::{self, Found};
use super::ApplierError;
use crate::layout::{source_id, ApplierDir, ReplicaDir, ReplicaKey};
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
    crate::permissions::create_dir_all(dir.replicas()).map_err(io(format!("create {}", dir.replicas().display())))?;
    // A directory that existed already (mkdir's 0755) becomes private too.
    crate::permissions::tighten_tree(dir.root())?;
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
    // Replicas are kept by the fingerprint's first digits: two sources must differ there.
    if let Some(twin) = list.iter().find(|known| source_id(known) == source_id(&fingerprint)) {
        return Err(ApplierError::Invalid(format!(
            "{fingerprint} shares its first {} hex digits with the allowed {twin}: replicas are kept by them (ADIR/replicas/SOURCE/), so it is refused",
            crate::layout::SOURCE_ID_DIGITS
        )));
    }
    list.push(fingerprint);
    crate::fsutil::write_atomic(&dir.allowed(), format!("{}\n", list.join("\n")).as_bytes()).map_err(io(format!("write {}", dir.allowed().display())))?;
    Ok(true)
}

/// `applier replica add`: records `image` as the replica of `volume` from `source` (an
/// allowed fingerprint or a unique prefix of one; absent: the first source presenting that
/// volume name gets it). Refuses an applier that already holds that replica, a bad name, and
/// a missing or unusable image.
pub fn attach_image(dir: &Path, volume: &str, source: Option<&str>, image: &Path) -> Result<PathBuf, ApplierError> {
    let dir = ApplierDir::new(dir);
    require_applier(&dir)?;
    crate::name::validate(volume).map_err(|e| ApplierError::Invalid(format!("--volume: {e}")))?;
    let key = match source {
        Some(given) => {
            let hex = given.strip_prefix("sha256:").unwrap_or(given).to_ascii_lowercase();
            let matching: Vec<String> = allowed(&dir).into_iter().filter(|f| f.strip_prefix("sha256:").unwrap_or(f).starts_with(&hex)).collect();
            match matching.as_slice() {
                [fingerprint] => ReplicaKey::new(&replicas::ensure_source(&dir, fingerprint)?, volume),
                [] => return Err(ApplierError::Invalid(format!("--source {given}: no allowed fingerprint (`applier allow`) starts so"))),
                _ => return Err(ApplierError::Invalid(format!("--source {given}: several allowed fingerprints start so: {}", matching.join(", ")))),
            }
        }
        None => ReplicaKey::unbound(volume),
    };
    let replica = dir.replica(&key);
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
    crate::permissions::create_dir_all(replica.root()).map_err(io(format!("create {}", replica.root().display())))?;
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

/// A replica no source is connected to, as its files show it.
pub(super) fn offline_replica(dir: &ApplierDir, found: Found) -> ReplicaStatus {
    let Found { key, dir: replica, state } = found;
    let received = crate::journal::Journal::inspect(&replica.journal()).map(|r| r.last_lsn).unwrap_or(state.applied_lsn);
    let snapshots = super::snapshot::list_on_disk(&replica);
    ReplicaStatus {
        snapshots: snapshots.len() as u64,
        snapshot_bytes: snapshots.iter().map(|s| s.size_bytes).sum(),
        snapshots_invalid: snapshots.iter().filter(|s| !s.valid).count() as u64,
        source_fingerprint: key.source.as_deref().and_then(|id| replicas::source_fingerprint(dir, id)),
        source: key.source,
        volume: key.volume,
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
    let replicas: Vec<ReplicaStatus> = replicas::list(&dir).into_iter().map(|found| offline_replica(&dir, found)).collect();
    Ok(ApplierStatus { running: false, fingerprint, listen: None, replicas })
}
