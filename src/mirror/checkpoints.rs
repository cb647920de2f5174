//! What a mirror keeps in the volume directory besides its configuration: its saved
//! checkpoints `VDIR/mirrors/NAME.state.json` (the last `received` and `applied` LSNs its
//! applier acknowledged; they only have to be no newer than the applier's, which sends its
//! own on every connect: `received` is the mirror's journal hold when the volume starts) and,
//! while it tracks or resyncs, its dirty map `NAME.dirty` (format in `dirty_map.rs`); its last
//! online verify `NAME.verify.json`.

use serde::{Deserialize, Serialize};

use super::MirrorError;
use crate::dirty_map::{DirtyMap, DEFAULT_REGION_SIZE};
use crate::layout::VolumeDir;
use crate::status::VerifyReport;

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

/// Ranges of resynced LSNs kept (the oldest beyond are dropped).
const GAPS_KEPT: usize = 256;

/// The LSN ranges `(after, through]` the mirror's replica got by resyncs (`NAME.gaps.json`).
pub fn load_gaps(dir: &VolumeDir, name: &str) -> Vec<[u64; 2]> {
    std::fs::read(dir.mirror_gaps(name)).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

/// Records one more resynced range (best effort: it only affects what `marker list` says).
pub fn add_gap(dir: &VolumeDir, name: &str, gap: (u64, u64)) -> Vec<[u64; 2]> {
    let mut gaps = load_gaps(dir, name);
    if gap.1 > gap.0 {
        gaps.push([gap.0, gap.1]);
    }
    let excess = gaps.len().saturating_sub(GAPS_KEPT);
    gaps.drain(..excess);
    if let Err(error) = crate::fsutil::write_atomic(&dir.mirror_gaps(name), &serde_json::to_vec(&gaps).expect("serialises")) {
        tracing::warn!(mirror = name, %error, "could not record the resynced LSN range");
    }
    gaps
}

/// Forgets a removed mirror's checkpoints and dirty map.
pub fn remove(dir: &VolumeDir, name: &str) {
    let _ = std::fs::remove_file(dir.mirror_gaps(name));
    let _ = std::fs::remove_file(dir.mirror_state(name));
    let _ = std::fs::remove_file(dir.mirror_dirty_map(name));
    let _ = std::fs::remove_file(dir.mirror_promoted(name));
    let _ = std::fs::remove_file(dir.mirror_verify(name));
}

/// The mirror's last online verify (`NAME.verify.json`), if one ran and the file reads.
pub fn load_verify(dir: &VolumeDir, name: &str) -> Option<VerifyReport> {
    std::fs::read(dir.mirror_verify(name)).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// Keeps a finished verify's report (best effort: the schedule and the metrics use it).
pub fn save_verify(dir: &VolumeDir, name: &str, report: &VerifyReport) {
    let bytes = serde_json::to_vec_pretty(report).expect("a verify report serialises");
    if let Err(error) = crate::fsutil::write_atomic(&dir.mirror_verify(name), &bytes) {
        tracing::warn!(mirror = name, %error, "could not save the verify report");
    }
}

/// The mirror's dirty map, if it tracks. A damaged or unreadable map is never taken as
/// "nothing dirty": the whole device is marked (a resync then compares every region's hash)
/// and the problem is returned for the log and status.
pub fn load_dirty_map(dir: &VolumeDir, name: &str, device_size: u64) -> (Option<DirtyMap>, Option<String>) {
    let path = dir.mirror_dirty_map(name);
    match DirtyMap::load(&path, device_size) {
        Ok(map) => (map, None),
        Err(error) => {
            let problem = format!("{error}; the whole device will be resynchronised (every region's hash compared)");
            tracing::error!(mirror = %name, "{problem}");
            (Some(DirtyMap::full(device_size, DEFAULT_REGION_SIZE, 0)), Some(problem))
        }
    }
}
