//! `volume demote`: the stale old source becomes a replica held by an applier on its host,
//! keeping the map of what it wrote after the point its new primary holds (its journal and
//! its mirror's dirty map tell), so the new primary's `mirror add` to it resyncs only those
//! regions and the ones written since the promote: no full copy.
//!
//! The records the old source wrote after that point are counted first and only given up
//! without `--discard-local-changes` when they provably never reached the replica before the
//! promote (stale, not split brain): the mirror saved what the applier said when it refused
//! it (`mirrors/NAME.promoted.json`). Steps, each redone after a crash: the volume is opened
//! and closed (journal redone into the backing store, the lock proves no one serves it);
//! the map and `demoted.json` are saved (from then on `run` refuses the directory); the
//! replica is made on the backing store where it is.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::replica::{DemotedImage, Replica};
use super::ApplierError;
use crate::dirty_map::{DirtyMap, DEFAULT_REGION_SIZE};
use crate::generation::History;
use crate::layout::{ApplierDir, VolumeDir};
use crate::mirror::{self, PromotionSeen};
use crate::volume::{Demoted, Volume, VolumeConfig, VolumeState};

#[derive(Debug, Clone, Default)]
pub struct DemoteOptions {
    /// The mirror to the replica that was promoted (default: the volume's only mirror).
    pub mirror: Option<String>,
    pub discard_local_changes: bool,
}

/// What a demote did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoteReport {
    pub volume: String,
    pub replica_dir: PathBuf,
    pub image: PathBuf,
    /// The replica holds the shared history through this LSN.
    pub common_lsn: u64,
    /// Records this volume wrote after it (undone by the failback), their bytes, how many of
    /// them after the promote, and the regions they cover.
    pub local_records: u64,
    pub local_bytes: u64,
    pub after_promote: u64,
    pub local_region_bytes: u64,
    pub discard_local_changes: bool,
}

fn invalid(message: String) -> ApplierError {
    ApplierError::Invalid(message)
}

/// Demotes the volume in `vdir` to a replica in the applier directory `adir`.
pub fn demote(vdir: &Path, adir: &Path, options: &DemoteOptions) -> Result<DemoteReport, ApplierError> {
    let resolve = |path: &Path| std::path::absolute(path).map_err(|source| ApplierError::Io { context: format!("resolve {}", path.display()), source });
    let layout = VolumeDir::new(resolve(vdir)?);
    let applier = ApplierDir::new(resolve(adir)?);
    let volume_error = |error: crate::volume::VolumeError| invalid(format!("volume {}: {error}", vdir.display()));
    if !layout.holds_volume() {
        return Err(invalid(format!("{} holds no volume", vdir.display())));
    }
    if !applier.holds_applier() {
        return Err(invalid(format!("{} holds no applier: run `ublk-mirror applier init --dir {}` first", adir.display(), adir.display())));
    }
    let config = VolumeConfig::load(&layout).map_err(volume_error)?;
    // The replica this volume was promoted from, made a replica again (a switchover back),
    // or a new one not bound to a source yet: its new primary's first connection binds it.
    let replica_dir = super::replicas::named(&applier, &config.name)
        .into_iter()
        .find(|dir| promoted_into(dir, layout.root()) || demoted_into(dir, layout.root()))
        .unwrap_or_else(|| applier.replica(&crate::layout::ReplicaKey::unbound(&config.name)));
    let (record, map) = match Demoted::load(&layout).map_err(volume_error)? {
        Some(record) if record.applier != applier.root() => {
            return Err(invalid(format!("volume {} was already demoted to the applier in {}", vdir.display(), record.applier.display())))
        }
        Some(record) => {
            let map = DirtyMap::load(&layout.demote_map(), config.size)
                .ok()
                .flatten()
                .unwrap_or_else(|| DirtyMap::full(config.size, DEFAULT_REGION_SIZE, record.common_lsn));
            (record, map)
        }
        None => {
            if replica_dir.root().exists() && !promoted_into(&replica_dir, layout.root()) {
                return Err(invalid(format!("{} already holds a replica of {}", adir.display(), config.name)));
            }
            let (mut record, map) = local_changes(&layout, &config, options)?;
            record.applier = applier.root().to_path_buf();
            map.save(&layout.demote_map()).map_err(|error| invalid(format!("save {}: {error}", layout.demote_map().display())))?;
            record.save(&layout).map_err(volume_error)?;
            if crate::failpoint::hit("demote-before-replica") {
                std::process::abort();
            }
            (record, map)
        }
    };
    if !replica_dir.holds_replica() || promoted_into(&replica_dir, layout.root()) {
        let state = VolumeState::load(&layout).map_err(volume_error)?;
        let history = History::load_or_first(&layout.generations(), state.generation).map_err(|error| invalid(error.to_string()))?;
        Replica::create_demoted(
            replica_dir.root(),
            &DemotedImage {
                volume_uuid: config.uuid,
                volume_name: config.name.clone(),
                size: config.size,
                history,
                image: config.backing.clone(),
                common_lsn: record.common_lsn,
                local_changes: map.clone(),
                from: layout.root().to_path_buf(),
                journal: crate::applier::ApplierConfig::load(&applier).map_err(|e| invalid(e.to_string()))?.replica_journal(&applier, &replica_dir),
            },
        )?;
    }
    tracing::info!(volume = %config.name, replica = %replica_dir.root().display(), common_lsn = record.common_lsn, local_records = record.local_records, "volume demoted");
    Ok(DemoteReport {
        volume: config.name,
        replica_dir: replica_dir.root().to_path_buf(),
        image: config.backing,
        common_lsn: record.common_lsn,
        local_records: record.local_records,
        local_bytes: record.local_bytes,
        after_promote: record.after_promote,
        local_region_bytes: map.dirty_bytes(),
        discard_local_changes: record.discard_local_changes,
    })
}

/// The replica in `dir` is the one this volume was promoted from (a switchover's leftover):
/// its image is this volume's backing store, and it becomes this volume's replica again.
fn promoted_into(dir: &crate::layout::ReplicaDir, volume: &Path) -> bool {
    crate::applier::replica::ReplicaState::load(dir).is_ok_and(|state| state.promotion.is_some_and(|p| p.done && p.to == volume))
}

/// The replica in `dir` was made by an earlier run of this demote (it may have been bound to
/// its source since).
fn demoted_into(dir: &crate::layout::ReplicaDir, volume: &Path) -> bool {
    crate::applier::replica::ReplicaState::load(dir).is_ok_and(|state| state.promotion.is_none() && state.demoted_from.as_deref() == Some(volume))
}

/// Opens the volume (redo, lock), finds the point the replica holds and the regions written
/// after it, and decides whether they may go without `--discard-local-changes`.
fn local_changes(layout: &VolumeDir, config: &VolumeConfig, options: &DemoteOptions) -> Result<(Demoted, DirtyMap), ApplierError> {
    let mirrors = mirror::list(layout).map_err(|error| invalid(error.to_string()))?;
    let name = match (&options.mirror, mirrors.as_slice()) {
        (Some(name), _) if mirrors.iter().any(|m| &m.name == name) => Some(name.clone()),
        (Some(name), _) => return Err(invalid(format!("volume {} has no mirror {name}", config.name))),
        (None, [only]) => Some(only.name.clone()),
        (None, []) => None,
        (None, _) => return Err(invalid(format!("volume {} has several mirrors: name the one whose replica was promoted with --mirror", config.name))),
    };
    let received = name.as_ref().map_or(0, |m| mirror::checkpoints::load(layout, m).received_lsn);
    let seen = name.as_ref().and_then(|m| PromotionSeen::load(layout, m));
    let holds = mirror::holds(layout, config.size).map_err(|error| invalid(error.to_string()))?;
    let volume = Volume::open(layout.root(), holds).map_err(|error| invalid(format!("open volume {}: {error}", layout.root().display())))?;
    let last = volume.journal().written_lsn();
    // The replica holds the shared history through the promote's branch when the applier
    // said so, else at least through what the mirror knew it had received.
    let common_lsn = seen.as_ref().map_or(received, |s| s.branch_lsn.max(received)).min(last);
    let mut map = name
        .as_ref()
        .and_then(|m| mirror::checkpoints::load_dirty_map(layout, m, config.size).0)
        .unwrap_or_else(|| DirtyMap::new(config.size, DEFAULT_REGION_SIZE, common_lsn));
    if !volume.journal().fold_into(&mut map, last) {
        map = DirtyMap::full(config.size, DEFAULT_REGION_SIZE, last);
    }
    map.set_tracked_from(common_lsn);
    let written = mirror::written_after(&volume, common_lsn, seen.as_ref().map_or(0, |s| s.promoted_us));
    drop(volume);
    if written.records > 0 && !options.discard_local_changes {
        let what = format!("volume {} wrote {} records ({}) after LSN {common_lsn}", config.name, written.records, crate::size::human_size(written.bytes));
        match &seen {
            None => {
                return Err(invalid(format!(
                    "{what}, and its mirror has not been told that its replica was promoted (run the volume until `status` shows the applier's refusal), so they may be a split brain's; nothing was changed; give --discard-local-changes to let the new primary's data replace them"
                )))
            }
            Some(_) if written.after_promote > 0 => {
                return Err(invalid(format!(
                    "split brain: {what}, {} of them after its replica was promoted; nothing was changed; if the new primary's data is the one to keep, give --discard-local-changes",
                    written.after_promote
                )))
            }
            Some(_) => {}
        }
    }
    let record = Demoted {
        applier: PathBuf::new(),
        at_us: crate::clock::now_micros(),
        common_lsn,
        local_records: written.records,
        local_bytes: written.bytes,
        after_promote: written.after_promote,
        discard_local_changes: options.discard_local_changes,
    };
    Ok((record, map))
}
