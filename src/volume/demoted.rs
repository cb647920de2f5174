//! `VDIR/demoted.json`: the volume was demoted to a replica (`volume demote`); from then on
//! its backing store is that replica's image, kept by an applier, and `run` refuses the
//! directory (the new primary serves the volume).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VolumeError;
use crate::layout::VolumeDir;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demoted {
    /// The applier directory whose replica the volume became.
    pub applier: PathBuf,
    /// When (microseconds since the Unix epoch).
    pub at_us: u64,
    /// The replica holds the shared history through this LSN; what the volume wrote after it
    /// is in `demote.dirty` and is replaced by the new primary's data on the first resync.
    pub common_lsn: u64,
    /// Records written after `common_lsn` (and how many of them after the promote, as far
    /// as known), and their bytes.
    pub local_records: u64,
    pub local_bytes: u64,
    pub after_promote: u64,
    /// `--discard-local-changes` was given.
    pub discard_local_changes: bool,
}

impl Demoted {
    pub fn load(dir: &VolumeDir) -> Result<Option<Demoted>, VolumeError> {
        let path = dir.demoted();
        match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text).map(Some).map_err(|error| VolumeError::Config { path, message: error.to_string() }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(VolumeError::Io { context: format!("read {}", path.display()), source }),
        }
    }

    pub fn save(&self, dir: &VolumeDir) -> Result<(), VolumeError> {
        let path = dir.demoted();
        crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(self).expect("serialises"))
            .map_err(|source| VolumeError::Io { context: format!("write {}", path.display()), source })
    }

    /// The refusal `run` gives a demoted volume.
    pub fn refusal(&self, dir: &Path) -> VolumeError {
        VolumeError::Invalid(format!(
            "volume {} was demoted to a replica (applier {}): its new primary serves the volume; to serve it here again, make it the primary with `mirror switchover` from the new primary, or promote its replica",
            dir.display(),
            self.applier.display()
        ))
    }
}
