//! The status contract: the typed values `status --json`, `applier status --json`, the text
//! tables, `mirror wait`, systemd's STATUS line and the Prometheus metrics all render, so
//! they always agree. JSON field names are a contract (add fields, rename none).
//!
//! A running `run` builds its [`Status`] live (the volume's numbers, the senders' mirror
//! statuses) and answers it on its control socket; a stopped volume's is read from its
//! files without changing anything.

mod applier;
mod mirror;
mod text;
mod verify;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use applier::{ApplierStatus, ReplicaStatus, ResyncProgress};
pub use mirror::{LinkStats, MarkerState, MirrorState, MirrorStatus, TransitionError, VerifyResult};
pub use text::{applier_one_line, applier_text, one_line, render_text};
pub use verify::{VerifyReport, VerifyState, OFFSETS_LISTED};

use crate::journal::{Journal, JournalUsage, RecoveryReport, SEGMENT_HEADER_SIZE};
use crate::layout::VolumeDir;
use crate::volume::{Mode, Volume, VolumeConfig, VolumeError, VolumeNumbers, VolumeState};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub volume: VolumeStatus,
    pub journal: JournalStatus,
    /// One per configured mirror; empty until a mirror is configured.
    pub mirrors: Vec<MirrorStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub size: u64,
    pub backing: String,
    pub generation: uuid::Uuid,
    /// `primary`: the volume serves its own history (`demoted`: it became a replica).
    #[serde(default = "primary")]
    pub role: String,
    /// The generation history, oldest first (the current generation last).
    #[serde(default)]
    pub generations: Vec<crate::generation::Generation>,
    /// The volume's certificate fingerprint (what an applier's `allow` names).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// A promoted volume: the bytes written since its branch, as far as its branch map and
    /// journal tell (64 KiB regions of the map, plus the payload of the records not yet
    /// folded into it: an upper bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_since_branch_bytes: Option<u64>,
    pub running: bool,
    pub pid: Option<u32>,
    pub exports: Vec<String>,
    /// The ublk block device (/dev/ublkbN) while `run --ublk` serves the volume.
    #[serde(default)]
    pub device: Option<String>,
    pub clean_shutdown: Option<bool>,
    /// mode, LSNs, pending bytes, counters and failure, as top-level fields of `volume`.
    #[serde(flatten)]
    pub numbers: VolumeNumbers,
}

fn primary() -> String {
    "primary".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalStatus {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub segments: usize,
    pub segment_size: u64,
    /// The directory holding the segments, resolved (`VDIR/journal`, or where
    /// `volume create --journal-dir` placed them).
    #[serde(default)]
    pub dir: String,
    /// The segments are on another filesystem than the volume directory.
    #[serde(default)]
    pub separate_filesystem: bool,
    /// Recent records kept in memory for connected mirrors' senders, as charged against
    /// their 32 MiB budget (payloads plus 128 bytes a record; most payloads are buffers the
    /// volume's writeback holds anyway), let go once every mirror has read them; 0 when
    /// nobody serves the volume.
    #[serde(default)]
    pub memory_bytes: u64,
}

impl JournalStatus {
    /// `memory_bytes`: [`Journal::recent_bytes`] of the open journal (0 offline).
    fn of(usage: JournalUsage, memory_bytes: u64, segment_size: u64, dir: &VolumeDir) -> JournalStatus {
        let (segments_dir, separate_filesystem) = crate::journal::placement::describe(&dir.journal());
        JournalStatus {
            first_lsn: usage.first_lsn,
            last_lsn: usage.last_lsn,
            used_bytes: usage.used_bytes,
            capacity_bytes: usage.capacity_bytes,
            segments: usage.segments,
            segment_size,
            dir: segments_dir.display().to_string(),
            separate_filesystem,
            memory_bytes,
        }
    }

    /// used / capacity, 0 to 1.
    pub fn fill(&self) -> f64 {
        if self.capacity_bytes > 0 {
            self.used_bytes as f64 / self.capacity_bytes as f64
        } else {
            0.0
        }
    }
}

/// Status of a volume served by this process: its exports (and ublk device) and its
/// mirrors as the senders report them.
pub fn live(volume: &Volume, exports: &[String], device: Option<String>, mut mirrors: Vec<MirrorStatus>) -> Status {
    let config = volume.config();
    let markers = volume.markers();
    let first_lsn = volume.journal().first_lsn();
    for mirror in &mut mirrors {
        mirror.count_markers(&markers, first_lsn);
    }
    Status {
        volume: VolumeStatus {
            name: config.name.clone(),
            uuid: config.uuid,
            size: config.size,
            backing: config.backing.display().to_string(),
            generation: volume.generation(),
            role: primary(),
            generations: volume.history().generations().to_vec(),
            fingerprint: crate::identity::fingerprint(&volume.dir().identity()).ok(),
            written_since_branch_bytes: volume.retention().holds().into_iter().find(|(name, _)| name == crate::journal::BRANCH_HOLD).map(|(_, state)| {
                match state {
                    crate::journal::HoldState::Tracking { covered_lsn, dirty_bytes } => dirty_bytes + volume.journal().backlog_after(covered_lsn).payload_bytes,
                    _ => 0,
                }
            }),
            running: true,
            pid: Some(std::process::id()),
            exports: exports.to_vec(),
            device,
            clean_shutdown: None,
            numbers: volume.numbers(),
        },
        journal: JournalStatus::of(volume.journal().usage(), volume.journal().recent_bytes(), config.journal.segment_size, volume.dir()),
        mirrors,
    }
}

/// Status read from the files of a volume nobody serves. Changes nothing. `mirrors` gives
/// the mirrors' part from the journal as it stands (their files are the mirror module's).
pub fn offline(dir: &VolumeDir, mirrors: impl FnOnce(&Arc<Journal>, u64) -> Vec<MirrorStatus>) -> Result<Status, VolumeError> {
    let config = VolumeConfig::load(dir)?;
    let state = VolumeState::load(dir)?;
    crate::volume::check_journal(dir, &config, true)?;
    let (journal, report): (Arc<Journal>, RecoveryReport) = Journal::open_read_only(&dir.journal())?;
    let options = config.journal_options();
    let usage = JournalUsage {
        first_lsn: report.first_lsn,
        last_lsn: report.last_lsn,
        used_bytes: report.used_bytes,
        capacity_bytes: options.max_segments() as u64 * (options.segment_size - SEGMENT_HEADER_SIZE),
        segments: report.segments,
    };
    Ok(Status {
        volume: VolumeStatus {
            name: config.name.clone(),
            uuid: config.uuid,
            size: config.size,
            backing: config.backing.display().to_string(),
            generation: state.generation,
            role: if dir.demoted().exists() { "demoted".into() } else { primary() },
            generations: crate::generation::History::load_or_first(&dir.generations(), state.generation)
                .map_err(|error| VolumeError::Invalid(error.to_string()))?
                .generations()
                .to_vec(),
            fingerprint: crate::identity::fingerprint(&dir.identity()).ok(),
            written_since_branch_bytes: crate::dirty_map::DirtyMap::load(&dir.branch_map(), config.size)
                .ok()
                .flatten()
                .map(|map| map.dirty_bytes() + journal.backlog_after(map.covered_lsn()).payload_bytes),
            running: false,
            pid: None,
            exports: Vec::new(),
            device: None,
            clean_shutdown: Some(state.clean_shutdown),
            numbers: VolumeNumbers {
                mode: Mode::Stopped,
                last_lsn: report.last_lsn,
                synced_lsn: report.last_lsn,
                applied_lsn: state.applied_lsn,
                checkpoint_lsn: state.applied_lsn,
                ..VolumeNumbers::default()
            },
        },
        journal: JournalStatus::of(usage, 0, options.segment_size, dir),
        mirrors: {
            let markers = crate::volume::marker_history(dir.root())?;
            let mut mirrors = mirrors(&journal, config.size);
            for mirror in &mut mirrors {
                mirror.count_markers(&markers, report.first_lsn);
            }
            mirrors
        },
    })
}
