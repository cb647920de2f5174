//! The directory layouts: which file of a volume directory (`VDIR`), an applier directory
//! (`ADIR`) and a replica directory (`ADIR/replicas/SOURCE/NAME`, see [`ReplicaKey`]) holds what, and the lock that one
//! serving process holds on a directory. Every file name of those directories is defined here
//! and nowhere else, so moving a directory from one role to another (a replica promoted to a
//! volume) is one named step. See "Files" in docs/architecture.md.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Suffixes of the directories a journal replacement makes beside the journal's directory
/// (`journal.new`, `journal.resetting`; beside the link's target when the journal is placed
/// on another filesystem).
pub const JOURNAL_NEW_SUFFIX: &str = "new";
pub const JOURNAL_RESETTING_SUFFIX: &str = "resetting";

/// A volume's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDir {
    root: PathBuf,
}

impl VolumeDir {
    pub fn new(root: impl Into<PathBuf>) -> VolumeDir {
        VolumeDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `volume.toml`: the configuration; written last by `volume create`, so its presence
    /// marks a complete volume.
    pub fn config(&self) -> PathBuf {
        self.root.join("volume.toml")
    }

    /// `state.json`: applied LSN, generation, clean-shutdown flag (replaced atomically).
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// `journal/`: the segment files, or a symlink to the directory holding them on another
    /// filesystem (`volume create --journal-dir`; see `journal::placement`).
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal")
    }

    /// `identity/`: key and certificate for mutual TLS.
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// `data.img`: the backing store unless `volume create --backing` named another.
    pub fn default_backing(&self) -> PathBuf {
        self.root.join("data.img")
    }

    /// `lock`: held (flock) by the process serving the volume; holds its pid.
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// `control.sock`: the running server's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// `ublk-device.json`: the ublk device serving the volume (kept after a crash until
    /// `run --recover`).
    pub fn ublk_device(&self) -> PathBuf {
        self.root.join("ublk-device.json")
    }

    /// `generations.json`: the volume's generation history (absent: one generation, the
    /// state's).
    pub fn generations(&self) -> PathBuf {
        self.root.join("generations.json")
    }

    /// `branch.dirty`: a promoted volume's map of the regions written since its branch.
    pub fn branch_map(&self) -> PathBuf {
        self.root.join("branch.dirty")
    }

    /// `demoted.json`: the volume was demoted to a replica (`volume demote`); `run` refuses it.
    pub fn demoted(&self) -> PathBuf {
        self.root.join("demoted.json")
    }

    /// `restore.json`: a `volume restore` in progress; `run` refuses the directory meanwhile.
    pub fn restoring(&self) -> PathBuf {
        self.root.join("restore.json")
    }

    /// `demote.dirty`: the regions a demoted volume wrote that its new primary may lack.
    pub fn demote_map(&self) -> PathBuf {
        self.root.join("demote.dirty")
    }

    /// `markers.json`: the markers the volume appended (names, LSNs, groups).
    pub fn markers(&self) -> PathBuf {
        self.root.join("markers.json")
    }

    /// `mirrors/`: one `NAME.toml`, `NAME.state.json` (and `NAME.dirty`) per mirror.
    pub fn mirrors(&self) -> PathBuf {
        self.root.join("mirrors")
    }

    pub fn mirror_config(&self, name: &str) -> PathBuf {
        self.mirrors().join(format!("{name}.toml"))
    }

    pub fn mirror_state(&self, name: &str) -> PathBuf {
        self.mirrors().join(format!("{name}.state.json"))
    }

    /// `mirrors/NAME.dirty`: the mirror's dirty map while it tracks or resyncs.
    /// `mirrors/NAME.gaps.json`: LSN ranges the mirror's replica got by resyncs (as regions,
    /// not records), so markers inside them have no snapshot there.
    pub fn mirror_gaps(&self, name: &str) -> PathBuf {
        self.mirrors().join(format!("{name}.gaps.json"))
    }

    /// `mirrors/NAME.promoted.json`: what the mirror's applier said when it refused it
    /// because its replica was promoted (the promoted history, when), for `volume demote`.
    pub fn mirror_promoted(&self, name: &str) -> PathBuf {
        self.mirrors().join(format!("{name}.promoted.json"))
    }

    /// `mirrors/NAME.verify.json`: the mirror's last online verify (`mirror verify`).
    pub fn mirror_verify(&self, name: &str) -> PathBuf {
        self.mirrors().join(format!("{name}.verify.json"))
    }

    pub fn mirror_dirty_map(&self, name: &str) -> PathBuf {
        self.mirrors().join(format!("{name}.dirty"))
    }

    /// True when the directory holds a complete volume.
    pub fn holds_volume(&self) -> bool {
        self.config().exists()
    }

    /// What `volume create` makes in a directory, for undoing a failed create.
    pub fn created_entries(&self) -> [PathBuf; 6] {
        [self.config(), self.state(), self.journal(), self.identity(), self.default_backing(), self.generations()]
    }
}

/// An applier's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplierDir {
    root: PathBuf,
}

impl ApplierDir {
    pub fn new(root: impl Into<PathBuf>) -> ApplierDir {
        ApplierDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `applier.toml`: listen address, metrics, idle timeout.
    pub fn config(&self) -> PathBuf {
        self.root.join("applier.toml")
    }

    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// `allowed`: fingerprints of accepted sources, one per line.
    pub fn allowed(&self) -> PathBuf {
        self.root.join("allowed")
    }

    /// `replicas/`: one directory per source (`replicas/SOURCE/`), one per replica in it.
    pub fn replicas(&self) -> PathBuf {
        self.root.join("replicas")
    }

    /// The directory of the replica `key`: `replicas/SOURCE/NAME`, or `replicas/NAME` for one
    /// not bound to a source yet. Every replica path is made here.
    pub fn replica(&self, key: &ReplicaKey) -> ReplicaDir {
        match &key.source {
            Some(source) => ReplicaDir::new(self.source_dir(source).join(&key.volume)),
            None => ReplicaDir::new(self.replicas().join(&key.volume)),
        }
    }

    /// `replicas/SOURCE/`: the replicas fed by one source.
    pub fn source_dir(&self, source: &str) -> PathBuf {
        self.replicas().join(source)
    }

    /// `replicas/SOURCE/.fingerprint`: the source's whole certificate fingerprint (a volume
    /// name cannot start with '.', so it never clashes with a replica).
    pub fn source_fingerprint(&self, source: &str) -> PathBuf {
        self.source_dir(source).join(".fingerprint")
    }

    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// `groups/GROUP/NAME.json`: group snapshots complete on every member this applier holds.
    pub fn groups(&self) -> PathBuf {
        self.root.join("groups")
    }

    /// True once `applier init` made the directory.
    pub fn holds_applier(&self) -> bool {
        self.identity().exists()
    }
}

/// Which replica of an applier: the source that feeds it and the volume's name. Two sources'
/// volumes of one name are two replicas (`replicas/SOURCE/NAME`, docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaKey {
    /// The source's id ([`source_id`]); `None`: a replica not bound to a source yet
    /// (`replicas/NAME`: made before replicas were kept by source, by `applier replica add`
    /// without `--source`, or by `volume demote`), bound at its source's first connection.
    pub source: Option<String>,
    pub volume: String,
}

impl ReplicaKey {
    pub fn new(source: &str, volume: &str) -> ReplicaKey {
        ReplicaKey { source: Some(source.to_string()), volume: volume.to_string() }
    }

    pub fn unbound(volume: &str) -> ReplicaKey {
        ReplicaKey { source: None, volume: volume.to_string() }
    }

    /// The source's id, or `unbound`.
    pub fn source_text(&self) -> &str {
        self.source.as_deref().unwrap_or(UNBOUND)
    }
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.source_text(), self.volume)
    }
}

/// How status and `--source` name the source of a replica not bound to one yet.
pub const UNBOUND: &str = "unbound";

/// Hex digits of a source's fingerprint that name its directory.
pub const SOURCE_ID_DIGITS: usize = 16;

/// A source's id: the first [`SOURCE_ID_DIGITS`] hex digits of its certificate's SHA-256
/// fingerprint (`sha256:0123456789abcdef...` is `0123456789abcdef`).
pub fn source_id(fingerprint: &str) -> String {
    fingerprint.strip_prefix("sha256:").unwrap_or(fingerprint).chars().take(SOURCE_ID_DIGITS).collect()
}

/// True for a directory name that [`source_id`] makes.
pub fn is_source_id(name: &str) -> bool {
    name.len() == SOURCE_ID_DIGITS && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One replica's directory inside an applier directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDir {
    root: PathBuf,
}

impl ReplicaDir {
    pub fn new(root: impl Into<PathBuf>) -> ReplicaDir {
        ReplicaDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `replica.json`: what the applier knows of the replica (replaced atomically).
    pub fn state(&self) -> PathBuf {
        self.root.join("replica.json")
    }

    /// `journal/`: the applier's journal of received records (a symlink to it when
    /// `applier.toml` places replicas' journals elsewhere).
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal")
    }

    /// `generations.json`: the history of the volume as this replica follows it.
    pub fn generations(&self) -> PathBuf {
        self.root.join("generations.json")
    }

    /// `local-changes.dirty`: a demoted volume's replica: the regions its image may hold
    /// that the new primary lacks (sent to it in the Welcome; removed once resynced).
    pub fn local_changes(&self) -> PathBuf {
        self.root.join("local-changes.dirty")
    }

    /// `journal.new`: a new, empty journal being made before it replaces the old one (beside
    /// the link's target instead when the journal is placed elsewhere: `Located::beside`).
    pub fn journal_new(&self) -> PathBuf {
        self.root.join("journal.new")
    }

    /// `journal.resetting`: the old journal while a new one replaces it.
    pub fn journal_resetting(&self) -> PathBuf {
        self.root.join("journal.resetting")
    }

    /// `data.img`: the image unless `applier replica add` attached another.
    pub fn default_image(&self) -> PathBuf {
        self.root.join("data.img")
    }

    /// `resync/`: a resync's stage while one runs (`stage.img`, and `stage.map` once it is
    /// being committed).
    pub fn resync(&self) -> PathBuf {
        self.root.join("resync")
    }

    pub fn stage_image(&self) -> PathBuf {
        self.resync().join("stage.img")
    }

    pub fn stage_map(&self) -> PathBuf {
        self.resync().join("stage.map")
    }

    /// `snapshots/`: one directory per snapshot (`snapshots/NAME/`).
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.snapshots().join(name)
    }

    /// `attach.json`: the image `applier replica add` named, used on the first connection.
    pub fn attach(&self) -> PathBuf {
        self.root.join("attach.json")
    }

    pub fn holds_replica(&self) -> bool {
        self.state().exists()
    }

    /// The applier directory holding this replica (`ADIR` of `ADIR/replicas/[SOURCE/]NAME`).
    pub fn applier_root(&self) -> Option<&Path> {
        self.root.ancestors().find(|dir| dir.parent().is_some_and(|p| p.file_name() == Some("replicas".as_ref()))).and_then(Path::parent).and_then(Path::parent)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `holder` says who ("pid N" when it wrote its pid).
    #[error("held by {holder}")]
    Held { holder: String },
    #[error("open {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// An exclusive lock on a directory's lock file (flock), held while the value lives. The
/// holder's pid is written into the file so a second process can say who has it.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(path: &Path) -> Result<DirLock, LockError> {
        use std::io::{Read, Seek, Write};
        let mut file = crate::permissions::private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| LockError::Io { path: path.to_path_buf(), source })?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::Held { holder: if holder.is_empty() { "unknown process".into() } else { format!("pid {holder}") } });
        }
        let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| writeln!(file, "{}", std::process::id()));
        Ok(DirLock { _file: file })
    }

    /// True if any open file description holds a lock (shared or exclusive) at `path`.
    pub fn is_held_exclusively(path: &Path) -> bool {
        let Ok(file) = File::open(path) else { return false };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
    }

    /// True if another process holds the lock at `path`.
    pub fn is_held(path: &Path) -> bool {
        let Ok(file) = File::open(path) else { return false };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_kept_by_source_and_find_their_applier() {
        let adir = ApplierDir::new("/srv/a");
        let fingerprint = format!("sha256:0123456789abcdef{}", "f".repeat(48));
        let id = source_id(&fingerprint);
        assert!(is_source_id(&id) && !is_source_id("vol0"));
        let keyed = adir.replica(&ReplicaKey::new(&id, "vol0"));
        assert_eq!(keyed.root(), Path::new("/srv/a/replicas/0123456789abcdef/vol0"));
        let flat = adir.replica(&ReplicaKey::unbound("replicas"));
        assert_eq!(flat.root(), Path::new("/srv/a/replicas/replicas"));
        for dir in [&keyed, &flat] {
            assert_eq!(dir.applier_root(), Some(Path::new("/srv/a")), "{dir:?}");
        }
        assert_eq!(ReplicaKey::unbound("vol0").to_string(), "unbound/vol0");
    }

    #[test]
    fn a_lock_is_exclusive_and_names_its_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("lock");
        assert!(!DirLock::is_held(&path));
        let held = DirLock::acquire(&path).unwrap();
        // flock locks belong to the open file description: a second open conflicts even in
        // this process.
        match DirLock::acquire(&path) {
            Err(LockError::Held { holder }) => assert_eq!(holder, format!("pid {}", std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        assert!(DirLock::is_held(&path));
        drop(held);
        assert!(!DirLock::is_held(&path));
    }
}
