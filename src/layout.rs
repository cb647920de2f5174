//! The directory layouts: which file of a volume directory (`VDIR`), an applier directory
//! (`ADIR`) and a replica directory (`ADIR/replicas/NAME`) holds what, and the lock that one
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

    pub fn replicas(&self) -> PathBuf {
        self.root.join("replicas")
    }

    pub fn replica(&self, volume: &str) -> ReplicaDir {
        ReplicaDir::new(self.replicas().join(volume))
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
        let mut file = std::fs::OpenOptions::new()
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
