//! Promote: the replica (its latest consistent state, or a snapshot) becomes a volume
//! directory that `run` serves, with a new generation branching from the replica's history.
//!
//! The image becomes the volume's backing store where it is (`volume.toml` names it): no
//! copy. From a copy-on-write snapshot, its preserved chunks are written back over the image
//! first (only those bytes); from a reflink snapshot, the snapshot's own file is the backing
//! store. The steps, each safe to repeat, so a crash is finished by running the command
//! again: the promotion is saved in `replica.json` (from then on the replica takes nothing);
//! the snapshot is restored onto the image; the volume directory is made (its journal
//! continues after the branch LSN); the promotion is marked done.

use std::path::{Path, PathBuf};

use super::{Promotion, Replica, ReplicaError};
use crate::dirty_map::{DirtyMap, DEFAULT_REGION_SIZE};
use crate::generation::History;
use crate::journal::placement::{self, Owner, Role};
use crate::journal::JournalError;
use crate::layout::JOURNAL_NEW_SUFFIX;
use crate::volume::{CreateOptions, Origin, Volume};

#[derive(Debug, Clone, Default)]
pub struct PromoteOptions {
    /// The volume directory to make (empty or absent).
    pub to: PathBuf,
    /// Promote this snapshot instead of the latest state.
    pub snapshot: Option<String>,
    /// The new volume's journal size (default: `volume create`'s).
    pub journal_size: Option<u64>,
}

/// What a promote made.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Promoted {
    pub volume: String,
    pub dir: PathBuf,
    pub generation: uuid::Uuid,
    pub parent: uuid::Uuid,
    pub branch_lsn: u64,
    pub snapshot: Option<String>,
    /// The file that is now the volume's backing store.
    pub backing: PathBuf,
    /// Bytes written to make it (a copy-on-write snapshot's chunks; 0: nothing copied).
    pub copied_bytes: u64,
    pub fingerprint: String,
}

impl Replica {
    /// Promotes the replica (see the module's description). Refuses an inconsistent replica
    /// unless a valid snapshot is named, and a target directory that is not empty.
    pub fn promote(&mut self, options: &PromoteOptions) -> Result<Promoted, ReplicaError> {
        let to = std::path::absolute(&options.to).map_err(super::io(format!("resolve {}", options.to.display())))?;
        let promotion = match self.state.promotion.clone() {
            Some(done) if done.done => {
                return Err(ReplicaError::Rejected(format!(
                    "the replica of {} was already promoted to {} (generation {})",
                    self.state.volume_name,
                    done.to.display(),
                    done.generation
                )))
            }
            Some(begun) if begun.to != to || begun.snapshot != options.snapshot => {
                return Err(ReplicaError::Rejected(format!(
                    "a promote to {}{} was begun and not finished; run it again with the same --to{}",
                    begun.to.display(),
                    begun.snapshot.as_ref().map(|s| format!(" from snapshot {s}")).unwrap_or_default(),
                    if begun.snapshot.is_some() { " and --snapshot" } else { "" }
                )))
            }
            Some(begun) => {
                tracing::info!(volume = %self.state.volume_name, to = %to.display(), "finishing a promote that was interrupted");
                begun
            }
            None => self.begin_promotion(&to, options.snapshot.as_deref())?,
        };
        let (backing, copied_bytes) = match &promotion.snapshot {
            Some(name) => self.snapshots.materialise(name, &self.image)?,
            None => (self.state.image.clone(), 0),
        };
        if crate::failpoint::hit("promote-before-volume") {
            std::process::abort();
        }
        let fingerprint = self.make_volume(&promotion, &backing, options.journal_size)?;
        if crate::failpoint::hit("promote-before-done") {
            std::process::abort();
        }
        self.snapshots.invalidate_cow(&format!("the replica's image was promoted to the volume in {}", to.display()));
        let mut done = promotion.clone();
        done.done = true;
        self.state.promotion = Some(done);
        self.state.save(&self.dir)?;
        tracing::info!(volume = %self.state.volume_name, to = %to.display(), generation = %promotion.generation, branch_lsn = promotion.branch_lsn, "replica promoted");
        Ok(Promoted {
            volume: self.state.volume_name.clone(),
            dir: to,
            generation: promotion.generation,
            parent: self.history.current().id,
            branch_lsn: promotion.branch_lsn,
            snapshot: promotion.snapshot.clone(),
            backing,
            copied_bytes,
            fingerprint,
        })
    }

    /// Checks, brings the image to the state promoted, and saves the promotion.
    fn begin_promotion(&mut self, to: &Path, snapshot: Option<&str>) -> Result<Promotion, ReplicaError> {
        match std::fs::read_dir(to) {
            Ok(_) if self.reinstates(to) => {}
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(ReplicaError::Rejected(format!("{} is not empty: promote makes a new volume directory", to.display())));
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ReplicaError::Io { context: format!("read {}", to.display()), source }),
        }
        // A resync in progress is dropped: the image stays the consistent state it was.
        self.abandon_resync()?;
        let branch_lsn = match snapshot {
            Some(name) => {
                let meta = self.snapshots.metas().find(|m| m.name == name).cloned();
                let meta = meta.ok_or_else(|| ReplicaError::Rejected(format!("the replica of {} has no snapshot {name}", self.state.volume_name)))?;
                if let Some(reason) = &meta.invalid_reason {
                    return Err(ReplicaError::Rejected(format!("snapshot {name} is not valid: {reason}")));
                }
                if meta.temporary {
                    return Err(ReplicaError::Rejected(format!("snapshot {name} is a temporary export's")));
                }
                meta.lsn
            }
            None => {
                if !self.state.is_consistent() {
                    let valid: Vec<String> = self.snapshots.metas().filter(|m| m.is_valid() && !m.temporary).map(|m| m.name.clone()).collect();
                    let why = match self.state.consistent_lsn() {
                        Some(at) => format!("a synchronisation is still converging (consistent at LSN {at}, applied {})", self.state.applied_lsn),
                        None => "it was never completely synchronised".to_string(),
                    };
                    return Err(ReplicaError::Rejected(format!(
                        "the replica of {} is not consistent: {why}; {}",
                        self.state.volume_name,
                        if valid.is_empty() {
                            "and it has no valid snapshot to promote instead".to_string()
                        } else {
                            format!("promote a snapshot instead (--snapshot NAME: {})", valid.join(", "))
                        }
                    )));
                }
                // Everything received becomes part of the promoted state.
                self.apply()?
            }
        };
        let promotion = Promotion {
            to: to.to_path_buf(),
            generation: uuid::Uuid::new_v4(),
            branch_lsn,
            snapshot: snapshot.map(str::to_string),
            created_us: crate::clock::now_micros(),
            done: false,
        };
        self.state.promotion = Some(promotion.clone());
        self.state.save(&self.dir)?;
        Ok(promotion)
    }

    /// Makes the volume directory (or finds the one an interrupted promote made) and returns
    /// its fingerprint.
    fn make_volume(&self, promotion: &Promotion, backing: &Path, journal_size: Option<u64>) -> Result<String, ReplicaError> {
        let dir = crate::layout::VolumeDir::new(&promotion.to);
        let failed = |error: crate::volume::VolumeError| ReplicaError::Rejected(format!("make the volume in {}: {error}", promotion.to.display()));
        if self.reinstates(&promotion.to) {
            self.reinstate(promotion, &dir)?;
        } else if dir.holds_volume() {
            let state = crate::volume::VolumeState::load(&dir).map_err(failed)?;
            if state.generation != promotion.generation {
                return Err(ReplicaError::Rejected(format!("{} holds another volume (generation {})", promotion.to.display(), state.generation)));
            }
        } else {
            // What an interrupted `Volume::create` left (the promotion checked the directory
            // was empty when it began).
            for path in dir.created_entries() {
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
            let history: History = self.history.branch(promotion.generation, promotion.branch_lsn, promotion.created_us);
            let options = CreateOptions {
                name: self.state.volume_name.clone(),
                size: self.state.size,
                backing: Some(backing.to_path_buf()),
                journal_size,
                origin: Some(Origin { uuid: self.state.volume_uuid, history }),
                ..Default::default()
            };
            Volume::create(&promotion.to, &options).map_err(failed)?;
        }
        // The regions the new primary writes from now on, for a failback to the old source.
        if !dir.branch_map().exists() {
            let map = DirtyMap::new(self.state.size, DEFAULT_REGION_SIZE, promotion.branch_lsn);
            map.save(&dir.branch_map()).map_err(|error| ReplicaError::Rejected(format!("save the branch map: {error}")))?;
        }
        crate::identity::fingerprint(&dir.identity()).map_err(|error| ReplicaError::Rejected(format!("read the new volume's identity: {error}")))
    }

    /// `to` is the demoted volume this replica was made from, demoted to this applier: the
    /// promote makes it the primary again in place (a switchover back).
    fn reinstates(&self, to: &Path) -> bool {
        let applier = self.dir.applier_root();
        self.state.demoted_from.as_deref() == Some(to)
            && crate::volume::Demoted::load(&crate::layout::VolumeDir::new(to)).ok().flatten().is_some_and(|d| Some(d.applier.as_path()) == applier)
    }

    /// Makes the demoted volume in `dir` the primary again, continuing this replica's history
    /// (its backing store is this replica's image): a new generation, a fresh journal after
    /// the branch; `demoted.json` goes last, so a crash is redone by running the promote again.
    fn reinstate(&self, promotion: &Promotion, dir: &crate::layout::VolumeDir) -> Result<(), ReplicaError> {
        let failed = |error: crate::volume::VolumeError| ReplicaError::Rejected(format!("make {} the primary again: {error}", dir.root().display()));
        let config = crate::volume::VolumeConfig::load(dir).map_err(failed)?;
        if config.uuid != self.state.volume_uuid || config.backing != self.state.image {
            return Err(ReplicaError::Rejected(format!("{} is not the volume this replica was demoted from", dir.root().display())));
        }
        let history = self.history.branch(promotion.generation, promotion.branch_lsn, promotion.created_us);
        history.save(&dir.generations()).map_err(|e| ReplicaError::State { path: dir.generations(), message: e.to_string() })?;
        // The fresh journal is made beside the segments' directory: on its own filesystem when
        // `volume create --journal-dir` placed it (the link stays). A crash after the old one
        // went leaves only the fresh one (`.new`), which the next run finds and replaces.
        let owner = Owner::new(Role::Volume, &config.name, config.uuid, dir.root());
        let located = placement::check_or_interrupted(&dir.journal(), &owner, JOURNAL_NEW_SUFFIX).map_err(JournalError::from)?;
        let fresh = located.beside(JOURNAL_NEW_SUFFIX);
        let _ = std::fs::remove_dir_all(&fresh);
        crate::journal::Journal::create_at(&fresh, config.journal_options(), promotion.branch_lsn + 1)?;
        if located.placed {
            owner.claim(&fresh).map_err(JournalError::from)?;
        }
        let _ = std::fs::remove_dir_all(&located.segments);
        std::fs::rename(&fresh, &located.segments).map_err(super::io(format!("move {} into place", fresh.display())))?;
        crate::fsutil::sync_dir(located.parent()).map_err(super::io(format!("sync {}", located.parent().display())))?;
        let mut state = crate::volume::VolumeState::load(dir).map_err(failed)?;
        state.applied_lsn = promotion.branch_lsn;
        state.generation = promotion.generation;
        state.clean_shutdown = true;
        state.save(dir).map_err(failed)?;
        if let Ok(mirrors) = std::fs::read_dir(dir.mirrors()) {
            for entry in mirrors.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".promoted.json")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_file(dir.demote_map());
        // A branch map of an older promote covers too much: the new one starts empty.
        let _ = std::fs::remove_file(dir.branch_map());
        crate::fsutil::sync_dir(dir.root()).map_err(super::io(format!("sync {}", dir.root().display())))?;
        std::fs::remove_file(dir.demoted()).map_err(super::io(format!("remove {}", dir.demoted().display())))?;
        crate::fsutil::sync_dir(dir.root()).map_err(super::io(format!("sync {}", dir.root().display())))?;
        Ok(())
    }

    /// Where this replica was promoted to (once done).
    pub fn promoted_to(&self) -> Option<&Path> {
        self.state.promotion.as_ref().filter(|p| p.done).map(|p| p.to.as_path())
    }
}
