//! The volume's state file `VDIR/state.json`: what survives restarts besides the journal,
//! replaced atomically at every checkpoint.

use serde::{Deserialize, Serialize};

use super::VolumeError;
use crate::layout::VolumeDir;

/// What survives restarts besides the journal: how far the backing store is known durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    pub format_version: u32,
    /// Every record up to this LSN is durable in the backing store.
    pub applied_lsn: u64,
    /// Identity of this volume's write history (new on promote or divergence).
    pub generation: uuid::Uuid,
    /// True when the last `run` stopped cleanly (drained, flushed, checkpointed).
    pub clean_shutdown: bool,
}

impl VolumeState {
    pub fn load(dir: &VolumeDir) -> Result<Self, VolumeError> {
        let path = dir.state();
        let text = std::fs::read_to_string(&path).map_err(|source| VolumeError::Io { context: format!("read {}", path.display()), source })?;
        serde_json::from_str(&text).map_err(|error| VolumeError::Config { path, message: error.to_string() })
    }

    pub fn save(&self, dir: &VolumeDir) -> Result<(), VolumeError> {
        let path = dir.state();
        let text = serde_json::to_vec_pretty(self).expect("state serialises");
        crate::fsutil::write_atomic(&path, &text).map_err(|source| VolumeError::Io { context: format!("write {}", path.display()), source })
    }
}
