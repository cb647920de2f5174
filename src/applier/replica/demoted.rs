//! A demoted volume's replica (`volume demote`): the old source's backing store becomes the
//! image of a replica that follows the new primary. Its image holds the shared history
//! through `applied_lsn` plus what the old source wrote after it, which the new primary lacks:
//! those regions are kept in `local-changes.dirty`, sent in the Welcome, and resynced with
//! everything the new primary wrote since the branch (the image is never torn: the resync is
//! staged like any other). Once that resync commits, the map goes.

use std::path::{Path, PathBuf};

use super::journal::{new_journal, owner};
use super::{Consistency, Replica, ReplicaError, ReplicaJournal, ReplicaState};
use crate::dirty_map::DirtyMap;
use crate::generation::History;
use crate::layout::ReplicaDir;
use crate::store::Store;

/// What a demoted volume's replica is made of.
#[derive(Debug, Clone)]
pub struct DemotedImage {
    pub volume_uuid: uuid::Uuid,
    pub volume_name: String,
    pub size: u64,
    pub history: History,
    /// The old source's backing store, used where it is.
    pub image: PathBuf,
    /// The shared history the image holds for sure.
    pub common_lsn: u64,
    /// The regions the old source wrote after `common_lsn`.
    pub local_changes: DirtyMap,
    /// The volume directory demoted.
    pub from: PathBuf,
    /// Where the replica's journal goes (`applier.toml` `journal_dir`; `None`: inside it).
    pub journal: Option<ReplicaJournal>,
}

impl Replica {
    /// Makes the replica in `dir` (files first, `replica.json` last: its presence marks a
    /// complete replica, so a crash midway is redone from the start).
    pub fn create_demoted(dir: &Path, demoted: &DemotedImage) -> Result<Replica, ReplicaError> {
        crate::permissions::create_dir_all(dir).map_err(super::io(format!("create {}", dir.display())))?;
        let layout = ReplicaDir::new(dir);
        let size = Store::open(&demoted.image, super::IMAGE)?.size();
        if size != demoted.size {
            return Err(ReplicaError::Rejected(format!("{} is {size} bytes, the volume {}", demoted.image.display(), demoted.size)));
        }
        // A journal already there (a promoted replica's, or this create's own that a crash
        // interrupted) is replaced where it lives.
        new_journal(&layout, &owner(&layout, &demoted.volume_name, demoted.volume_uuid), demoted.journal.as_ref(), demoted.common_lsn + 1)?;
        demoted.history.save(&layout.generations()).map_err(|e| ReplicaError::State { path: layout.generations(), message: e.to_string() })?;
        // No local changes (a switchover, or nothing written after the branch): the new
        // primary streams its journal, nothing is resynced.
        let _ = std::fs::remove_file(layout.local_changes());
        if demoted.local_changes.dirty_regions() > 0 {
            demoted.local_changes.save(&layout.local_changes()).map_err(|e| ReplicaError::State { path: layout.local_changes(), message: e.to_string() })?;
        }
        let state = ReplicaState {
            format_version: 1,
            volume_uuid: demoted.volume_uuid,
            volume_name: demoted.volume_name.clone(),
            size: demoted.size,
            generation: demoted.history.current().id,
            image: demoted.image.clone(),
            applied_lsn: demoted.common_lsn,
            // Consistent as far as the shared history goes; the local changes are resynced
            // before anything else is applied.
            consistency: Consistency::Consistent,
            resync: None,
            promotion: None,
            demoted_from: Some(demoted.from.clone()),
        };
        state.save(&layout)?;
        crate::fsutil::sync_dir(dir).map_err(super::io(format!("sync {}", dir.display())))?;
        Replica::open(dir)
    }

    /// The encoded map of a demoted volume's local changes, for the Welcome (`None` once
    /// resynced, or for any other replica).
    pub fn local_changes(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        let path = self.dir.local_changes();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ReplicaError::Io { context: format!("read {}", path.display()), source }),
        };
        match DirtyMap::decode(&bytes, &path, self.state.size) {
            Ok(_) => Ok(Some(bytes)),
            // Damaged: every region may differ.
            Err(error) => {
                tracing::error!(%error, "the map of local changes is damaged: the failback compares every region");
                Ok(Some(DirtyMap::full(self.state.size, crate::dirty_map::DEFAULT_REGION_SIZE, self.state.applied_lsn).encode()))
            }
        }
    }

    /// After a resync committed: the local changes are replaced, their map goes.
    pub(super) fn forget_local_changes(&self) {
        if std::fs::remove_file(self.dir.local_changes()).is_ok() {
            let _ = crate::fsutil::sync_dir(self.dir.root());
            tracing::info!(volume = %self.state.volume_name, "failback resync committed: the demoted volume's local changes are replaced");
        }
    }
}
