//! What the applier knows about one replica: `ADIR/replicas/SOURCE/NAME/replica.json`, replaced
//! atomically at every checkpoint. Its consistency is typed ([`Consistency`]); the file
//! keeps the format it always had (`consistent` and `consistent_lsn`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ReplicaError;
use crate::layout::ReplicaDir;

/// Whether the image is a consistent past state of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Nothing is known about the image (new, attached, or a synchronisation was
    /// interrupted): a synchronisation must copy the device before records are taken.
    NeedsSync,
    /// A synchronisation copied the device while writes went on: the image becomes
    /// consistent once `applied_lsn` reaches `at` (replaying the journal written meanwhile
    /// completes the chunks).
    Converging { at: u64 },
    /// The image equals the source at `applied_lsn`.
    Consistent,
}

/// A resync in progress: the image stays as it is (consistent) while the stage collects what
/// the resync sends; `commit_lsn` once the stage is sealed and being copied over the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncState {
    /// Records after this LSN belong to the resync (the journal continues there).
    pub base_lsn: u64,
    pub region_bytes: u64,
    /// Set when the commit began: the image becomes the source at this LSN.
    #[serde(default)]
    pub commit_lsn: Option<u64>,
}

/// A promote of this replica to a volume (`applier replica promote`), saved before its first
/// step so that a crash is finished by running the command again; once `done`, the image is
/// the volume's backing store and the replica takes nothing more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The volume directory made from the replica.
    pub to: PathBuf,
    /// The new volume's generation, and the last LSN of the replica's history it holds.
    pub generation: uuid::Uuid,
    pub branch_lsn: u64,
    /// The snapshot promoted (absent: the replica's latest state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// When the promote began (microseconds since the Unix epoch).
    pub created_us: u64,
    #[serde(default)]
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StateFile", into = "StateFile")]
pub struct ReplicaState {
    pub format_version: u32,
    pub volume_uuid: uuid::Uuid,
    pub volume_name: String,
    pub size: u64,
    pub generation: uuid::Uuid,
    pub image: PathBuf,
    /// Every record through this LSN is durable in the image.
    pub applied_lsn: u64,
    pub consistency: Consistency,
    pub resync: Option<ResyncState>,
    pub promotion: Option<Promotion>,
    /// A demoted volume's replica: the volume directory it was (a switchover back promotes
    /// into it again).
    pub demoted_from: Option<PathBuf>,
}

impl ReplicaState {
    pub fn is_consistent(&self) -> bool {
        self.consistency == Consistency::Consistent
    }

    /// True until a synchronisation has copied the device.
    pub fn needs_sync(&self) -> bool {
        self.consistency == Consistency::NeedsSync
    }

    /// While converging: the applied LSN at which the image becomes consistent.
    pub fn consistent_lsn(&self) -> Option<u64> {
        match self.consistency {
            Consistency::Converging { at } => Some(at),
            _ => None,
        }
    }

    /// A converging image that reached its LSN is consistent from now on.
    pub fn settle(&mut self) {
        if self.consistent_lsn().is_some_and(|at| self.applied_lsn >= at) {
            self.consistency = Consistency::Consistent;
        }
    }

    /// After the replica's directory was moved (bound to its source, `applier/replicas.rs`):
    /// an image that was the default one of the old directory is the new directory's. True
    /// if the state changed (to be saved).
    pub fn follow_move(&mut self, dir: &ReplicaDir) -> bool {
        let new = dir.default_image();
        let was_default = self.image.file_name() == new.file_name() && self.image.parent().and_then(|p| p.file_name()) == dir.root().file_name();
        if self.image == new || !was_default || self.image.exists() || !new.exists() {
            return false;
        }
        tracing::info!(from = %self.image.display(), to = %new.display(), "the replica's directory moved: its image is followed");
        self.image = new;
        true
    }

    pub fn load(dir: &ReplicaDir) -> Result<Self, ReplicaError> {
        let path = dir.state();
        let text = std::fs::read_to_string(&path).map_err(super::io(format!("read {}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| ReplicaError::State { path, message: e.to_string() })
    }

    pub fn save(&self, dir: &ReplicaDir) -> Result<(), ReplicaError> {
        let path = dir.state();
        crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(self).expect("state serialises")).map_err(super::io(format!("write {}", path.display())))
    }
}

/// The file's fields, as they have always been written.
#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    volume_uuid: uuid::Uuid,
    volume_name: String,
    size: u64,
    generation: uuid::Uuid,
    image: PathBuf,
    applied_lsn: u64,
    /// False while the image is not yet a consistent past state of the source.
    consistent: bool,
    /// With `consistent == false`: the applied LSN at which it becomes consistent; `None`:
    /// a synchronisation is needed.
    #[serde(default)]
    consistent_lsn: Option<u64>,
    /// A resync in progress (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resync: Option<ResyncState>,
    /// A promote to a volume, begun or done (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    promotion: Option<Promotion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    demoted_from: Option<PathBuf>,
}

impl From<StateFile> for ReplicaState {
    fn from(file: StateFile) -> ReplicaState {
        let consistency = match (file.consistent, file.consistent_lsn) {
            (true, _) => Consistency::Consistent,
            (false, Some(at)) => Consistency::Converging { at },
            (false, None) => Consistency::NeedsSync,
        };
        ReplicaState {
            format_version: file.format_version,
            volume_uuid: file.volume_uuid,
            volume_name: file.volume_name,
            size: file.size,
            generation: file.generation,
            image: file.image,
            applied_lsn: file.applied_lsn,
            consistency,
            resync: file.resync,
            promotion: file.promotion,
            demoted_from: file.demoted_from,
        }
    }
}

impl From<ReplicaState> for StateFile {
    fn from(state: ReplicaState) -> StateFile {
        StateFile {
            consistent: state.is_consistent(),
            consistent_lsn: state.consistent_lsn(),
            format_version: state.format_version,
            volume_uuid: state.volume_uuid,
            volume_name: state.volume_name,
            size: state.size,
            generation: state.generation,
            image: state.image,
            applied_lsn: state.applied_lsn,
            resync: state.resync,
            promotion: state.promotion,
            demoted_from: state.demoted_from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_keeps_its_format() {
        let text = r#"{"format_version":1,"volume_uuid":"00000000-0000-0000-0000-000000000004","volume_name":"vol0","size":4096,
            "generation":"00000000-0000-0000-0000-000000000005","image":"/x/data.img","applied_lsn":7,"consistent":false,"consistent_lsn":9}"#;
        let mut state: ReplicaState = serde_json::from_str(text).unwrap();
        assert_eq!(state.consistency, Consistency::Converging { at: 9 });
        state.applied_lsn = 9;
        state.settle();
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!((json["consistent"].clone(), json["consistent_lsn"].clone()), (serde_json::json!(true), serde_json::Value::Null));
        let old: ReplicaState = serde_json::from_str(&text.replace(r#","consistent_lsn":9"#, "")).unwrap();
        assert!(old.needs_sync(), "a file from before consistent_lsn existed reads as needing a sync");
    }
}
