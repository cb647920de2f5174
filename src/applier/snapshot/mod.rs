//! Snapshots of a replica: when the applier applies a marker record it keeps the replica
//! image exactly as it is at that LSN, readable (`applier snapshot export`) while applying
//! goes on. See docs/markers.md.
//!
//! Two kinds, chosen at creation:
//! - `reflink`: the image file cloned (FICLONE) into the snapshot's directory where the
//!   filesystem shares extents (XFS with reflink, btrfs): no copy, and the filesystem keeps
//!   the old blocks as the image changes.
//! - `cow`: everywhere else (ext4, block-device images): chunks are preserved by
//!   copy-on-write into the snapshot's store before the image first changes them (`cow.rs`).
//!
//! Every path that writes the image (records, a resync's commit, a synchronisation's chunks)
//! first calls [`Snapshots::preserve`]. A snapshot's LSN decides what it needs: only writes
//! after it (a redo after a crash replays earlier records too, which the snapshot already
//! holds). The image is made durable before a snapshot is recorded, so the chunks it reads from
//! the image are the marker's state even after a crash. A snapshot that cannot be kept (its
//! store cannot grow) is invalidated with the reason; the image is written anyway: the replica
//! is never held back or harmed for a snapshot.
//!
//! Files: `RDIR/snapshots/NAME/` with `snapshot.json` (written last: its presence makes the
//! snapshot), `chunks.map` + `chunks.data` or `image`, and `export.lock` (held shared by
//! readers; deleting needs it exclusively).

pub(crate) mod cow;
pub mod group;
mod reader;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use reader::SnapshotReader;

use crate::extent::Extent;
use crate::layout::ReplicaDir;
use crate::marker::Marker;
use crate::store::Store;
use cow::CowStore;

/// Copy-on-write granularity of new snapshots.
pub const CHUNK_BYTES: u64 = 64 << 10;
/// Snapshots kept per volume when applier.toml does not say.
pub const DEFAULT_KEEP: usize = 16;
pub(crate) const META_FILE: &str = "snapshot.json";
pub(crate) const IMAGE_FILE: &str = "image";
const EXPORT_LOCK: &str = "export.lock";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("no snapshot {name:?} of volume {volume}")]
    Unknown { volume: String, name: String },
    #[error("snapshot {name} is invalid: {reason}")]
    Invalid { name: String, reason: String },
    #[error("snapshot {name} is being exported (by {holder}); stop the export first")]
    Exported { name: String, holder: String },
    #[error("{0}")]
    Other(String),
}

impl SnapshotError {
    fn io(context: impl Into<String>, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io { context: context.into(), source }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    Cow,
    Reflink,
}

/// How long a temporary snapshot may wait for its export to lock it.
const TEMPORARY_GRACE_US: u64 = 60_000_000;

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format_version: u32,
    pub name: String,
    pub volume: String,
    /// The image equals the source at this LSN.
    pub lsn: u64,
    pub size: u64,
    pub kind: SnapshotKind,
    pub chunk_bytes: u64,
    /// The marker's id (shared by a group's members) and its group.
    pub marker_id: uuid::Uuid,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
    /// When the marker was taken at the source and when the applier took the snapshot
    /// (microseconds since the Unix epoch).
    pub marker_created_us: u64,
    pub taken_us: u64,
    /// Why the snapshot cannot be read (absent: it is valid).
    #[serde(default)]
    pub invalid_reason: Option<String>,
    /// Made for one export (`export --latest`) and deleted after it.
    #[serde(default)]
    pub temporary: bool,
}

impl SnapshotMeta {
    pub fn load(dir: &ReplicaDir, name: &str) -> Result<SnapshotMeta, SnapshotError> {
        let path = dir.snapshot(name).join(META_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let volume = dir.root().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                return Err(SnapshotError::Unknown { volume, name: name.to_string() });
            }
            Err(source) => return Err(SnapshotError::io(format!("read {}", path.display()), source)),
        };
        serde_json::from_slice(&text).map_err(|e| SnapshotError::Other(format!("{}: damaged: {e}", path.display())))
    }

    fn save(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(META_FILE);
        crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(self).expect("meta serialises"))
            .map_err(|source| SnapshotError::io(format!("write {}", path.display()), source))
    }

    pub fn is_valid(&self) -> bool {
        self.invalid_reason.is_none()
    }
}

/// A snapshot as `applier snapshot list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    /// The replica's source (`applier status`'s `source`; absent: not bound to one yet).
    #[serde(default)]
    pub source: Option<String>,
    pub name: String,
    pub lsn: u64,
    pub group: Option<String>,
    /// RFC 3339 time of the marker at the source.
    pub created: String,
    /// Space the snapshot holds of its own.
    pub size_bytes: u64,
    pub valid: bool,
    #[serde(default)]
    pub invalid_reason: Option<String>,
    pub kind: SnapshotKind,
    #[serde(default)]
    pub temporary: bool,
    /// A reader holds it (an export runs).
    #[serde(default)]
    pub exported: bool,
}

/// Takes the shared lock a reader holds on a snapshot.
fn lock_for_export(snapshot_dir: &Path) -> Result<File, SnapshotError> {
    let path = snapshot_dir.join(EXPORT_LOCK);
    let file = crate::permissions::private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| SnapshotError::io(format!("open {}", path.display()), source))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared)
        .map_err(|e| SnapshotError::io(format!("lock {}", path.display()), std::io::Error::from(e)))?;
    Ok(file)
}

/// The export lock taken exclusively (`None`: a reader holds it).
fn exclusive_lock(snapshot_dir: &Path) -> Option<File> {
    let path = snapshot_dir.join(EXPORT_LOCK);
    let file = crate::permissions::private_options().read(true).write(true).create(true).truncate(false).open(path).ok()?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(file)
}

/// True if a reader holds the snapshot.
fn is_exported(snapshot_dir: &Path) -> bool {
    crate::layout::DirLock::is_held_exclusively(&snapshot_dir.join(EXPORT_LOCK))
}

fn info_of(meta: &SnapshotMeta, dir: &Path, size_bytes: u64) -> SnapshotInfo {
    SnapshotInfo {
        volume: meta.volume.clone(),
        source: None,
        name: meta.name.clone(),
        lsn: meta.lsn,
        group: meta.group.clone(),
        created: humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_micros(meta.marker_created_us)).to_string(),
        size_bytes,
        valid: meta.is_valid(),
        invalid_reason: meta.invalid_reason.clone(),
        kind: meta.kind,
        temporary: meta.temporary,
        exported: is_exported(dir),
    }
}

/// Space a snapshot directory's files hold (a clone: only its unshared extents).
fn size_on_disk(dir: &Path, kind: SnapshotKind) -> u64 {
    match kind {
        SnapshotKind::Reflink => File::open(dir.join(IMAGE_FILE)).ok().and_then(|f| crate::reflink::exclusive_bytes(&f).ok()).unwrap_or(0),
        SnapshotKind::Cow => [cow::MAP_FILE, cow::DATA_FILE].iter().filter_map(|f| std::fs::metadata(dir.join(f)).ok()).map(|m| m.len()).sum(),
    }
}

struct Live {
    meta: SnapshotMeta,
    /// The store of a valid copy-on-write snapshot.
    store: Option<CowStore>,
}

/// The snapshots of one replica, as the applier keeps them.
pub struct Snapshots {
    dir: ReplicaDir,
    volume: String,
    size: u64,
    /// Oldest first.
    live: Vec<Live>,
}

impl Snapshots {
    /// Loads the replica's snapshots: the half-made ones a crash left (no `snapshot.json`)
    /// and temporary ones nobody exports are removed.
    pub fn open(dir: &ReplicaDir, volume: &str, size: u64) -> Result<Snapshots, SnapshotError> {
        let mut live = Vec::new();
        let root = dir.snapshots();
        let listing = match std::fs::read_dir(&root) {
            Ok(listing) => listing,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshots { dir: dir.clone(), volume: volume.into(), size, live }),
            Err(source) => return Err(SnapshotError::io(format!("list {}", root.display()), source)),
        };
        for entry in listing.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !path.join(META_FILE).exists() {
                tracing::info!(snapshot = %name, "removing a snapshot whose creation did not complete");
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let mut meta = SnapshotMeta::load(dir, &name)?;
            if meta.temporary && !is_exported(&path) {
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let store = match (meta.kind, &meta.invalid_reason) {
                (SnapshotKind::Cow, None) => match CowStore::open(&path) {
                    Ok(store) => Some(store),
                    Err(reason) => {
                        tracing::warn!(snapshot = %name, %reason, "snapshot invalid");
                        meta.invalid_reason = Some(reason);
                        let _ = meta.save(&path);
                        None
                    }
                },
                _ => None,
            };
            live.push(Live { meta, store });
        }
        live.sort_by_key(|l| (l.meta.lsn, l.meta.taken_us));
        Ok(Snapshots { dir: dir.clone(), volume: volume.into(), size, live })
    }

    /// True if some snapshot needs chunks preserved before the image changes.
    pub fn preserving(&self) -> bool {
        self.live.iter().any(|l| l.store.is_some())
    }

    /// Preserves, for every copy-on-write snapshot, the chunks that `writes` (the LSN of
    /// each write and the bytes it changes) will change and that it does not hold yet; only
    /// writes after a snapshot's LSN concern it. A snapshot whose store fails is invalidated.
    /// Returns once the image may be written.
    pub fn preserve(&mut self, image: &Store, writes: &[(u64, Extent)]) {
        for live in &mut self.live {
            let Some(store) = live.store.as_mut() else { continue };
            let chunk_bytes = store.header().chunk_bytes;
            let mut chunks: Vec<u64> = Vec::new();
            for (lsn, extent) in writes {
                if *lsn <= live.meta.lsn || extent.is_empty() {
                    continue;
                }
                let end = extent.end().unwrap_or(u64::MAX).min(self.size);
                chunks.extend((extent.offset / chunk_bytes..end.div_ceil(chunk_bytes)).filter(|c| !store.is_preserved(*c)));
            }
            chunks.sort_unstable();
            chunks.dedup();
            if let Err(error) = store.preserve(image, &chunks) {
                let reason = format!("preserving {} chunks failed: {error}", chunks.len());
                invalidate(&self.dir, live, reason);
            }
        }
    }

    /// Takes a snapshot of `image` as it is now, which is the source at `lsn` (the caller
    /// applied everything through it): synced, then cloned or given an empty store, then
    /// recorded. `unusable` records an invalid snapshot instead (the replica did not hold
    /// that instant). Returns the snapshot's name (a name in use gets `.LSN` appended).
    pub fn create(&mut self, image: &Store, marker: &Marker, lsn: u64, unusable: Option<String>, temporary: bool) -> Result<String, SnapshotError> {
        let mut name = marker.name.clone();
        if self.live.iter().any(|l| l.meta.name == name) {
            if self.live.iter().any(|l| l.meta.name == name && l.meta.marker_id == marker.id && !marker.id.is_nil()) {
                // The same marker applied again (a redo after a crash): it is there already.
                return Ok(name);
            }
            name = format!("{}.{lsn}", marker.name);
            tracing::warn!(marker = %marker.name, snapshot = %name, "a snapshot of that name exists: this one is named after its LSN too");
        }
        let path = self.dir.snapshot(&name);
        let _ = std::fs::remove_dir_all(&path);
        crate::permissions::create_dir_all(&path).map_err(|source| SnapshotError::io(format!("create {}", path.display()), source))?;
        let mut meta = SnapshotMeta {
            format_version: 1,
            name: name.clone(),
            volume: self.volume.clone(),
            lsn,
            size: self.size,
            kind: SnapshotKind::Cow,
            chunk_bytes: CHUNK_BYTES,
            marker_id: marker.id,
            group: marker.group.clone(),
            members: marker.members.clone(),
            marker_created_us: marker.created_us,
            taken_us: crate::clock::now_micros(),
            invalid_reason: unusable,
            temporary,
        };
        let mut store = None;
        if meta.invalid_reason.is_none() {
            // What the snapshot reads from the image must be the marker's state after a crash.
            image.sync_data().map_err(|source| SnapshotError::io(format!("sync {}", image.path().display()), source))?;
            match take(image, &path) {
                Ok(Taken::Reflink) => meta.kind = SnapshotKind::Reflink,
                Ok(Taken::Cow(cow)) => store = Some(*cow),
                Err(error) => meta.invalid_reason = Some(format!("it could not be set up: {error}")),
            }
        }
        if let Err(error) = meta
            .save(&path)
            .and_then(|_| crate::fsutil::sync_dir(&self.dir.snapshots()).map_err(|source| SnapshotError::io("sync the snapshots directory", source)))
        {
            let _ = std::fs::remove_dir_all(&path);
            return Err(error);
        }
        match &meta.invalid_reason {
            None => tracing::info!(volume = %self.volume, snapshot = %name, lsn, kind = ?meta.kind, "snapshot taken"),
            Some(reason) => tracing::warn!(volume = %self.volume, snapshot = %name, lsn, %reason, "snapshot recorded as invalid"),
        }
        self.live.push(Live { meta, store });
        Ok(name)
    }

    /// Deletes a snapshot (refused while it is exported).
    pub fn delete(&mut self, name: &str) -> Result<(), SnapshotError> {
        let Some(index) = self.live.iter().position(|l| l.meta.name == name) else {
            return Err(SnapshotError::Unknown { volume: self.volume.clone(), name: name.to_string() });
        };
        let path = self.dir.snapshot(name);
        let _held = exclusive_lock(&path).ok_or_else(|| SnapshotError::Exported { name: name.to_string(), holder: "an `applier snapshot export`".into() })?;
        self.live.remove(index);
        // The metadata first: a reader that locks after this finds no snapshot.
        let _ = std::fs::remove_file(path.join(META_FILE));
        std::fs::remove_dir_all(&path).map_err(|source| SnapshotError::io(format!("remove {}", path.display()), source))?;
        tracing::info!(volume = %self.volume, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Deletes the oldest snapshots beyond `keep` (temporary ones do not count and exported
    /// ones are skipped), and temporary ones no export holds any more.
    pub fn retain(&mut self, keep: usize) {
        // A temporary snapshot just made for `export --latest` is not yet locked by its
        // export: give the exporter a grace period before calling it abandoned.
        let now_us = crate::clock::now_micros();
        let stale: Vec<String> = self
            .live
            .iter()
            .filter(|l| l.meta.temporary && now_us.saturating_sub(l.meta.taken_us) > TEMPORARY_GRACE_US && !is_exported(&self.dir.snapshot(&l.meta.name)))
            .map(|l| l.meta.name.clone())
            .collect();
        let kept: Vec<String> = self.live.iter().filter(|l| !l.meta.temporary).map(|l| l.meta.name.clone()).collect();
        let excess = kept.len().saturating_sub(keep);
        for name in stale.into_iter().chain(kept.into_iter().take(excess)) {
            if let Err(error) = self.delete(&name) {
                tracing::info!(snapshot = %name, %error, "snapshot kept past its retention");
            }
        }
    }

    /// Makes `image` the state of snapshot `name` (promote from a snapshot): a reflink
    /// snapshot is a whole file and needs nothing (its path is returned, to be used as it is);
    /// a copy-on-write one writes its preserved chunks back over the image (no copy of the
    /// rest). Returns the file that holds the snapshot's state and the bytes written.
    pub fn materialise(&self, name: &str, image: &Store) -> Result<(PathBuf, u64), SnapshotError> {
        let live = self.live.iter().find(|l| l.meta.name == name).ok_or_else(|| SnapshotError::Other(format!("no snapshot {name}")))?;
        if let Some(reason) = &live.meta.invalid_reason {
            return Err(SnapshotError::Invalid { name: name.to_string(), reason: reason.clone() });
        }
        match (live.meta.kind, &live.store) {
            (SnapshotKind::Reflink, _) => Ok((self.dir.snapshot(name).join(IMAGE_FILE), 0)),
            (SnapshotKind::Cow, Some(store)) => {
                let written = store.restore(image).map_err(|source| SnapshotError::io(format!("restore snapshot {name} onto the image"), source))?;
                Ok((image.path().to_path_buf(), written))
            }
            (SnapshotKind::Cow, None) => Err(SnapshotError::Invalid { name: name.to_string(), reason: "its chunk store is not open".into() }),
        }
    }

    /// Invalidates every copy-on-write snapshot (their base image is no longer the replica's:
    /// it was promoted to a volume).
    pub fn invalidate_cow(&mut self, reason: &str) {
        for live in self.live.iter_mut().filter(|l| l.meta.kind == SnapshotKind::Cow && l.meta.invalid_reason.is_none()) {
            invalidate(&self.dir, live, reason.to_string());
        }
    }

    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.live
            .iter()
            .map(|l| {
                let size = l.store.as_ref().map(|s| s.bytes()).unwrap_or_else(|| size_on_disk(&self.dir.snapshot(&l.meta.name), l.meta.kind));
                info_of(&l.meta, &self.dir.snapshot(&l.meta.name), size)
            })
            .collect()
    }

    pub fn metas(&self) -> impl Iterator<Item = &SnapshotMeta> {
        self.live.iter().map(|l| &l.meta)
    }
}

fn invalidate(dir: &ReplicaDir, live: &mut Live, reason: String) {
    tracing::error!(volume = %live.meta.volume, snapshot = %live.meta.name, %reason, "snapshot invalidated; replication goes on");
    let path = dir.snapshot(&live.meta.name);
    if let Some(mut store) = live.store.take() {
        store.tombstone();
    }
    // Removing the store frees its space and tells a reader (which checks the map's links)
    // even when nothing more can be written.
    let _ = std::fs::remove_file(path.join(cow::MAP_FILE));
    let _ = std::fs::remove_file(path.join(cow::DATA_FILE));
    live.meta.invalid_reason = Some(reason);
    let _ = live.meta.save(&path);
}

enum Taken {
    Reflink,
    Cow(Box<CowStore>),
}

/// The fast path where the image is a file on a filesystem that clones; else a store.
fn take(image: &Store, dir: &Path) -> std::io::Result<Taken> {
    if !image.is_device() {
        let clone_path = dir.join(IMAGE_FILE);
        let clone = crate::permissions::private_options().write(true).create_new(true).open(&clone_path)?;
        let source = File::open(image.path())?;
        match crate::reflink::clone_file(&clone, &source) {
            Ok(()) => {
                clone.sync_all()?;
                return Ok(Taken::Reflink);
            }
            Err(error) if error.kind() == std::io::ErrorKind::Unsupported => {
                drop(clone);
                std::fs::remove_file(&clone_path)?;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(Taken::Cow(Box::new(CowStore::create(dir, CHUNK_BYTES, image.size())?)))
}

/// The snapshots of a replica from its files (no applier needed).
pub fn list_on_disk(dir: &ReplicaDir) -> Vec<SnapshotInfo> {
    let Ok(listing) = std::fs::read_dir(dir.snapshots()) else { return Vec::new() };
    let mut list: Vec<SnapshotInfo> = listing
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = SnapshotMeta::load(dir, &name).ok()?;
            Some(info_of(&meta, &entry.path(), size_on_disk(&entry.path(), meta.kind)))
        })
        .collect();
    list.sort_by_key(|s| s.lsn);
    list
}

/// Where a snapshot directory is (for tests and tools).
pub fn snapshot_path(dir: &ReplicaDir, name: &str) -> PathBuf {
    dir.snapshot(name)
}

/// The metadata of a replica's snapshots from its files.
pub fn metas_on_disk(dir: &ReplicaDir) -> Vec<SnapshotMeta> {
    let Ok(listing) = std::fs::read_dir(dir.snapshots()) else { return Vec::new() };
    listing.flatten().filter_map(|entry| SnapshotMeta::load(dir, &entry.file_name().to_string_lossy()).ok()).collect()
}
