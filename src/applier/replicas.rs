//! The replicas of an applier directory, kept by source: `ADIR/replicas/SOURCE/NAME/`, where
//! SOURCE is the source's id (the first 16 hex digits of the certificate fingerprint it
//! presents on the QUIC connection) and `replicas/SOURCE/.fingerprint` its whole fingerprint.
//! Two sources' volumes of one name are two replicas.
//!
//! A replica directly under `replicas/NAME/` is not bound to a source yet: one made before
//! replicas were kept by source, one `applier replica add` attached without `--source`, or
//! one `volume demote` made. Its source's first connection binds it (the fingerprint proves
//! the source; the volume name and, once the replica has a state, the volume UUID must
//! match): the directory is renamed into `replicas/SOURCE/NAME` (one rename on the same
//! filesystem, both parents synced, logged), nothing copied, nothing overwritten. A replica
//! that was promoted stays where it is (its image may be a volume's backing store now).
//! Listing and commands see both layouts, so an unbound replica stays usable meanwhile.
//! A fingerprint whose id an other one already has is refused, by `applier allow` and at
//! the connection (the `.fingerprint` file tells).

use std::path::Path;

use super::replica::ReplicaState;
use super::ApplierError;
use crate::layout::{is_source_id, source_id, ApplierDir, ReplicaDir, ReplicaKey, UNBOUND};

fn io(context: String) -> impl FnOnce(std::io::Error) -> ApplierError {
    move |source| ApplierError::Io { context, source }
}

/// A replica found in an applier directory.
#[derive(Debug, Clone)]
pub struct Found {
    pub key: ReplicaKey,
    pub dir: ReplicaDir,
    pub state: ReplicaState,
}

/// Every replica of the directory (both layouts), ordered by volume name, then source.
pub fn list(dir: &ApplierDir) -> Vec<Found> {
    let mut found = Vec::new();
    for name in entries(&dir.replicas()) {
        let flat = ReplicaKey::unbound(&name);
        if let Ok(state) = ReplicaState::load(&dir.replica(&flat)) {
            found.push(Found { dir: dir.replica(&flat), key: flat, state });
        } else if is_source_id(&name) {
            for volume in entries(&dir.source_dir(&name)).into_iter().filter(|v| crate::name::validate(v).is_ok()) {
                let key = ReplicaKey::new(&name, &volume);
                if let Ok(state) = ReplicaState::load(&dir.replica(&key)) {
                    found.push(Found { dir: dir.replica(&key), key, state });
                }
            }
        }
    }
    found.sort_by(|a, b| (&a.key.volume, &a.key.source).cmp(&(&b.key.volume, &b.key.source)));
    found
}

fn entries(dir: &Path) -> Vec<String> {
    let Ok(listing) = std::fs::read_dir(dir) else { return Vec::new() };
    listing.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// The directories of every replica of `volume` (for group snapshots, whose members are
/// volume names).
pub fn named(dir: &ApplierDir, volume: &str) -> Vec<ReplicaDir> {
    list(dir).into_iter().filter(|f| f.key.volume == volume).map(|f| f.dir).collect()
}

/// The whole fingerprint of a source, as its directory records it.
pub fn source_fingerprint(dir: &ApplierDir, source: &str) -> Option<String> {
    std::fs::read_to_string(dir.source_fingerprint(source)).ok().map(|text| text.trim().to_string()).filter(|f| !f.is_empty())
}

/// True if `given` (a source id, a prefix of one, a whole fingerprint with or without
/// `sha256:`, or `unbound`) names the source of `key`.
fn source_matches(dir: &ApplierDir, key: &ReplicaKey, given: &str) -> bool {
    let Some(id) = &key.source else { return given == UNBOUND };
    let hex = given.strip_prefix("sha256:").unwrap_or(given).to_ascii_lowercase();
    if hex.len() <= id.len() {
        return id.starts_with(&hex);
    }
    source_fingerprint(dir, id).is_some_and(|f| f.strip_prefix("sha256:").unwrap_or(&f).starts_with(&hex))
}

/// The replica a command names: `volume`, and `source` when sources share the name. A name
/// that several replicas have, without a source that picks one, is refused with the
/// candidates listed.
pub fn resolve(dir: &ApplierDir, volume: &str, source: Option<&str>) -> Result<Found, ApplierError> {
    crate::name::validate(volume).map_err(|e| ApplierError::Invalid(format!("volume name {e}")))?;
    let mut candidates: Vec<Found> = list(dir).into_iter().filter(|f| f.key.volume == volume).collect();
    if let Some(given) = source {
        candidates.retain(|f| source_matches(dir, &f.key, given));
    }
    match candidates.len() {
        1 => Ok(candidates.remove(0)),
        0 => Err(ApplierError::Invalid(match source {
            Some(given) => format!("applier {} holds no replica of {volume} from source {given}", dir.root().display()),
            None => format!("applier {} holds no replica of {volume}", dir.root().display()),
        })),
        _ => {
            let sources: Vec<&str> = candidates.iter().map(|f| f.key.source_text()).collect();
            Err(ApplierError::Invalid(format!(
                "applier {} holds {} replicas of {volume}, from sources {}: name one with --source SOURCE",
                dir.root().display(),
                candidates.len(),
                sources.join(", ")
            )))
        }
    }
}

/// A key for a command's `--volume` and `--source`: `NAME` or `SOURCE/NAME` (the control
/// requests' form).
pub fn reference(volume: &str, source: Option<&str>) -> String {
    match source {
        Some(source) => format!("{source}/{volume}"),
        None => volume.to_string(),
    }
}

/// Splits a reference made by [`reference`].
pub fn parse_reference(text: &str) -> (&str, Option<&str>) {
    match text.split_once('/') {
        Some((source, volume)) => (volume, Some(source)),
        None => (text, None),
    }
}

/// Makes `replicas/SOURCE/` for `fingerprint` (with its `.fingerprint`) if it is not there;
/// refuses a directory that belongs to another fingerprint with the same id.
pub fn ensure_source(dir: &ApplierDir, fingerprint: &str) -> Result<String, ApplierError> {
    let id = source_id(fingerprint);
    let folder = dir.source_dir(&id);
    if dir.replica(&ReplicaKey::unbound(&id)).holds_replica() {
        return Err(ApplierError::Invalid(format!(
            "{} is the replica of a volume named {id}, not a source's directory: it must be moved away before source {fingerprint} can connect",
            folder.display()
        )));
    }
    match source_fingerprint(dir, &id) {
        Some(known) if known == fingerprint => return Ok(id),
        Some(known) => {
            return Err(ApplierError::Invalid(format!(
                "sources {known} and {fingerprint} share the id {id} ({} hex digits): the second is refused",
                crate::layout::SOURCE_ID_DIGITS
            )))
        }
        None => {}
    }
    crate::permissions::create_dir_all(&folder).map_err(io(format!("create {}", folder.display())))?;
    let path = dir.source_fingerprint(&id);
    crate::fsutil::write_atomic(&path, format!("{fingerprint}\n").as_bytes()).map_err(io(format!("write {}", path.display())))?;
    crate::fsutil::sync_dir(&dir.replicas()).map_err(io(format!("sync {}", dir.replicas().display())))?;
    Ok(id)
}

/// Where the replica of `volume` fed by `fingerprint` is, binding an unbound one first (see
/// the module's text). `volume_uuid` is the connecting volume's. Returns the replica's key;
/// its directory may not exist yet (a new source).
pub fn for_source(dir: &ApplierDir, fingerprint: &str, volume: &str, volume_uuid: uuid::Uuid) -> Result<ReplicaKey, ApplierError> {
    // The name comes from the network: it becomes a path only once it is a valid name.
    crate::name::validate(volume).map_err(|e| ApplierError::Invalid(format!("volume name {e}")))?;
    crate::identity::parse_fingerprint(fingerprint)?;
    let id = ensure_source(dir, fingerprint)?;
    let key = ReplicaKey::new(&id, volume);
    let keyed = dir.replica(&key);
    if keyed.root().exists() {
        return Ok(key);
    }
    let flat = ReplicaKey::unbound(volume);
    let old = dir.replica(&flat);
    let state = ReplicaState::load(&old).ok();
    let attached_only = state.is_none() && old.attach().exists();
    match state {
        Some(state) if state.volume_uuid == volume_uuid && state.promotion.is_some() => {
            // Its image may be a volume's backing store now: used where it is (the source
            // is told it was promoted).
            Ok(flat)
        }
        Some(state) if state.volume_uuid == volume_uuid => {
            bind(dir, &old, &keyed)?;
            Ok(key)
        }
        None if attached_only => {
            bind(dir, &old, &keyed)?;
            Ok(key)
        }
        _ => Ok(key),
    }
}

/// Moves the unbound replica in `old` to `new` (in its source's directory): one rename, then
/// the default image's path in its state follows (a crash between the two is mended by
/// [`ReplicaState::follow_move`] when the replica is opened).
fn bind(dir: &ApplierDir, old: &ReplicaDir, new: &ReplicaDir) -> Result<(), ApplierError> {
    let parent = new.root().parent().unwrap_or(new.root());
    if new.root().exists() {
        return Err(ApplierError::Invalid(format!("{} exists: the replica in {} is not moved over it", new.root().display(), old.root().display())));
    }
    std::fs::rename(old.root(), new.root()).map_err(io(format!("move {} to {}", old.root().display(), new.root().display())))?;
    for folder in [dir.replicas().as_path(), parent] {
        crate::fsutil::sync_dir(folder).map_err(io(format!("sync {}", folder.display())))?;
    }
    // A journal on another filesystem (`journal_dir`) stays where it is (its link moved
    // with the directory); its owner file names the new directory.
    if let Err(error) = crate::journal::placement::follow_move(&new.journal(), new.root()) {
        tracing::warn!(replica = %new.root().display(), %error, "the placed journal's owner file still names the old directory (accepted: that directory is gone)");
    }
    if let Ok(mut state) = ReplicaState::load(new) {
        if state.follow_move(new) {
            state.save(new)?;
        }
    }
    tracing::info!(from = %old.root().display(), to = %new.root().display(), "replica bound to its source (moved into the source's directory)");
    Ok(())
}

/// Tells what the directory holds that is not bound to a source yet (logged when an applier
/// starts: each moves at its source's first connection).
pub fn log_unbound(dir: &ApplierDir) {
    for found in list(dir).into_iter().filter(|f| f.key.source.is_none()) {
        let promoted = found.state.promotion.is_some();
        tracing::info!(
            volume = %found.key.volume,
            dir = %found.dir.root().display(),
            promoted,
            "replica not bound to a source yet: it moves to replicas/SOURCE/NAME when a source presenting its volume name and UUID connects"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(uuid: u128) -> ReplicaState {
        ReplicaState {
            format_version: 1,
            volume_uuid: uuid::Uuid::from_u128(uuid),
            volume_name: "vol0".into(),
            size: 4096,
            generation: uuid::Uuid::from_u128(7),
            image: std::path::PathBuf::from("/nowhere/replicas/vol0/data.img"),
            applied_lsn: 3,
            consistency: super::super::replica::Consistency::Consistent,
            resync: None,
            promotion: None,
            demoted_from: None,
        }
    }

    const A: &str = "sha256:aaaaaaaaaaaaaaaa0000000000000000000000000000000000000000000000aa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbb0000000000000000000000000000000000000000000000bb";

    #[test]
    fn an_unbound_replica_moves_to_the_source_that_proves_it_and_names_resolve() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ApplierDir::new(tmp.path());
        let old = dir.replica(&ReplicaKey::unbound("vol0"));
        std::fs::create_dir_all(old.root()).unwrap();
        let mut s = state(1);
        s.image = old.default_image();
        s.save(&old).unwrap();
        std::fs::write(old.default_image(), b"image").unwrap();
        // Another volume of the same name does not take it.
        let other = for_source(&dir, B, "vol0", uuid::Uuid::from_u128(2)).unwrap();
        assert_eq!(other, ReplicaKey::new("bbbbbbbbbbbbbbbb", "vol0"));
        assert!(old.holds_replica(), "left where it is");
        let key = for_source(&dir, A, "vol0", uuid::Uuid::from_u128(1)).unwrap();
        assert_eq!(key, ReplicaKey::new("aaaaaaaaaaaaaaaa", "vol0"));
        let moved = dir.replica(&key);
        assert!(!old.root().exists() && moved.holds_replica());
        assert_eq!(ReplicaState::load(&moved).unwrap().image, moved.default_image(), "the image path follows");
        assert_eq!(source_fingerprint(&dir, "aaaaaaaaaaaaaaaa").as_deref(), Some(A));
        // B's replica of vol0 exists once made; then the name alone is ambiguous.
        let b = dir.replica(&other);
        std::fs::create_dir_all(b.root()).unwrap();
        state(2).save(&b).unwrap();
        let error = resolve(&dir, "vol0", None).unwrap_err().to_string();
        assert!(error.contains("aaaaaaaaaaaaaaaa") && error.contains("bbbbbbbbbbbbbbbb") && error.contains("--source"), "{error}");
        assert_eq!(resolve(&dir, "vol0", Some("aaaa")).unwrap().key, key);
        assert_eq!(resolve(&dir, "vol0", Some(B)).unwrap().key, other);
        assert!(resolve(&dir, "vol0", Some("cc")).is_err());
        assert!(for_source(&dir, A, "../vol0", uuid::Uuid::from_u128(1)).is_err(), "a name from the network is checked");
        assert_eq!(list(&dir).len(), 2);
        // A second fingerprint with A's id is refused.
        let twin = A.replace("00aa", "00ab");
        assert!(ensure_source(&dir, &twin).unwrap_err().to_string().contains("share the id"));
    }

    #[test]
    fn references_round_trip() {
        assert_eq!(parse_reference(&reference("vol0", Some("ab12"))), ("vol0", Some("ab12")));
        assert_eq!(parse_reference(&reference("vol0", None)), ("vol0", None));
    }
}
