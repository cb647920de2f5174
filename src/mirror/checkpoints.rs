//! A mirror's saved checkpoints `VDIR/mirrors/NAME.state.json`: the last `received` and
//! `applied` LSNs its applier acknowledged. They only have to be no newer than the
//! applier's (it sends its own on every connect): `received` is the mirror's journal hold
//! when the volume starts.

use serde::{Deserialize, Serialize};

use super::MirrorError;
use crate::layout::VolumeDir;

/// The checkpoints of one mirror (the file's format).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    pub received_lsn: u64,
    pub applied_lsn: u64,
}

/// The saved checkpoints; none saved (or unreadable) reads as zero, which holds the whole
/// journal: safe, at worst a synchronisation more.
pub fn load(dir: &VolumeDir, name: &str) -> Checkpoints {
    std::fs::read_to_string(dir.mirror_state(name)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

pub fn save(dir: &VolumeDir, name: &str, checkpoints: Checkpoints) -> Result<(), MirrorError> {
    let path = dir.mirror_state(name);
    crate::fsutil::write_atomic(&path, &serde_json::to_vec(&checkpoints).expect("checkpoints serialise"))
        .map_err(|source| MirrorError::Io { context: format!("write {}", path.display()), source })
}

pub fn remove(dir: &VolumeDir, name: &str) {
    let _ = std::fs::remove_file(dir.mirror_state(name));
}
