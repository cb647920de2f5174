//! Group snapshots: the snapshots of one group marker (one id) on the members an applier
//! holds. Recorded in `ADIR/groups/GROUP/NAME.json` once every member held here has a valid
//! snapshot of it; until then `applier snapshot list` shows the group as incomplete.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::SnapshotInfo;
use super::SnapshotMeta;
use crate::layout::ApplierDir;

/// A group snapshot as `applier snapshot list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub group: String,
    pub name: String,
    pub id: uuid::Uuid,
    /// The group's members that this applier holds, and each one's snapshot LSN (absent:
    /// not applied yet, or invalid).
    pub members: BTreeMap<String, Option<u64>>,
    /// Every member held here has a valid snapshot of this instant.
    pub complete: bool,
}

/// Records the group snapshot `meta` belongs to if it is now complete. Members are the
/// marker's volumes that have a replica in `dir` (by name, from any source); `snapshots_of`
/// gives a member's snapshots (of every replica of that name: the marker's id tells).
pub fn record_if_complete(dir: &ApplierDir, meta: &SnapshotMeta, snapshots_of: impl Fn(&str) -> Vec<SnapshotMeta>) -> Option<GroupSnapshot> {
    let group = meta.group.clone()?;
    let snapshot = gather(dir, &group, &meta.name, meta.marker_id, &meta.members, snapshots_of);
    if !snapshot.complete {
        return None;
    }
    let folder = dir.groups().join(&group);
    let path = folder.join(format!("{}.json", meta.name));
    if path.exists() {
        return Some(snapshot);
    }
    let written = crate::permissions::create_dir_all(&folder)
        .and_then(|_| crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&snapshot).expect("serialises")))
        .and_then(|_| crate::fsutil::sync_dir(&folder));
    match written {
        Ok(()) => tracing::info!(group = %group, snapshot = %meta.name, members = snapshot.members.len(), "group snapshot complete"),
        Err(error) => tracing::warn!(group = %group, snapshot = %meta.name, %error, "recording a group snapshot failed (it is listed from the members)"),
    }
    Some(snapshot)
}

fn gather(dir: &ApplierDir, group: &str, name: &str, id: uuid::Uuid, members: &[String], snapshots_of: impl Fn(&str) -> Vec<SnapshotMeta>) -> GroupSnapshot {
    let held: Vec<&String> = members.iter().filter(|m| !crate::applier::replicas::named(dir, m).is_empty()).collect();
    let members: BTreeMap<String, Option<u64>> = held
        .iter()
        .map(|member| {
            let lsn = snapshots_of(member).into_iter().find(|s| s.marker_id == id && s.group.as_deref() == Some(group) && s.is_valid()).map(|s| s.lsn);
            (member.to_string(), lsn)
        })
        .collect();
    let complete = !members.is_empty() && members.values().all(Option::is_some);
    GroupSnapshot { group: group.to_string(), name: name.to_string(), id, members, complete }
}

/// Every group snapshot that the listed snapshots belong to, complete or not.
pub fn list(dir: &ApplierDir, snapshots: &[SnapshotInfo], metas_of: impl Fn(&str) -> Vec<SnapshotMeta>) -> Vec<GroupSnapshot> {
    let mut seen = std::collections::HashSet::new();
    let mut groups = Vec::new();
    for info in snapshots {
        let Some(group) = &info.group else { continue };
        let Some(meta) = metas_of(&info.volume).into_iter().find(|m| m.name == info.name) else { continue };
        if !seen.insert(meta.marker_id) {
            continue;
        }
        groups.push(gather(dir, group, &meta.name, meta.marker_id, &meta.members, &metas_of));
    }
    groups
}
