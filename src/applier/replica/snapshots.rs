//! The replica's side of snapshots: a marker record applied takes one (or records why it
//! cannot be one), `export --latest` takes a temporary one, retention and deletion.

use super::{Replica, ReplicaError};
use crate::applier::snapshot::{SnapshotInfo, SnapshotMeta};
use crate::marker::Marker;

impl Replica {
    /// Applies a marker record at `lsn`: a snapshot of the image, which now holds every
    /// record before it and none after. Never fails the apply: a snapshot that cannot be taken
    /// is logged (and recorded invalid where possible); the replica goes on.
    pub(super) fn take_snapshot(&mut self, lsn: u64, payload: &[bytes::Bytes]) {
        let bytes: Vec<u8> = payload.iter().flat_map(|part| part.iter().copied()).collect();
        let Some(marker) = Marker::decode(&bytes) else {
            tracing::warn!(volume = %self.state.volume_name, lsn, "a marker record with an unreadable payload: no snapshot");
            return;
        };
        // The image must be the source at `lsn`: not during a resync (it stays at an older
        // state, the stage holds a mix), nor before a synchronisation has converged.
        let unusable = if self.stage.is_some() {
            Some("the marker came during a resync: the replica never held that instant".to_string())
        } else {
            match self.state.consistent_lsn() {
                Some(at) if lsn < at => Some(format!("the replica was still being synchronised (consistent from LSN {at})")),
                _ if self.state.needs_sync() => Some("the replica was not synchronised".to_string()),
                _ => None,
            }
        };
        match self.snapshots.create(&self.image, &marker, lsn, unusable, false) {
            Ok(name) => {
                if let Some(meta) = self.snapshots.metas().find(|m| m.name == name) {
                    self.taken.push(meta.clone());
                }
                self.snapshots.retain(self.keep_snapshots);
            }
            Err(error) => tracing::error!(volume = %self.state.volume_name, marker = %marker.name, lsn, %error, "snapshot not taken; replication goes on"),
        }
    }

    /// A temporary snapshot of the replica's latest consistent state (for `export
    /// --latest`), deleted once no export holds it. Returns its name and LSN.
    pub fn snapshot_latest(&mut self) -> Result<(String, u64), ReplicaError> {
        if self.state.needs_sync() {
            return Err(ReplicaError::Rejected("the replica has not been synchronised: it has no consistent state yet".into()));
        }
        // During a resync the image is still the old consistent state (`applied`); else it
        // holds everything applied so far.
        let lsn = if self.stage.is_some() { self.state.applied_lsn } else { self.applied_unsynced };
        if let Some(at) = self.state.consistent_lsn().filter(|at| lsn < *at) {
            return Err(ReplicaError::Rejected(format!("the replica is still being synchronised: consistent from LSN {at}, applied {lsn}")));
        }
        let marker = Marker::single(&format!("latest-{lsn}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let name = self.snapshots.create(&self.image, &marker, lsn, None, true)?;
        Ok((name, lsn))
    }

    pub fn delete_snapshot(&mut self, name: &str) -> Result<(), ReplicaError> {
        if let Some(promotion) = self.state.promotion.as_ref().filter(|p| p.snapshot.as_deref() == Some(name)) {
            return Err(ReplicaError::Rejected(format!(
                "snapshot {name} was promoted to the volume in {}: it may be its backing store",
                promotion.to.display()
            )));
        }
        Ok(self.snapshots.delete(name)?)
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.list()
    }

    pub fn snapshot_count(&self) -> u64 {
        self.snapshots.metas().count() as u64
    }

    /// Snapshots kept that cannot be read (recorded invalid, or invalidated since).
    pub fn invalid_snapshot_count(&self) -> u64 {
        self.snapshots.metas().filter(|m| !m.is_valid()).count() as u64
    }

    /// Space the snapshots hold (a copy-on-write store's size is known without a look at
    /// the disk; a clone's own extents are counted by FIEMAP).
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshots.list().iter().map(|s| s.size_bytes).sum()
    }

    /// Snapshots kept; applied at the next snapshot.
    pub fn set_keep_snapshots(&mut self, keep: usize) {
        self.keep_snapshots = keep.max(1);
    }

    /// The snapshots taken since the last call (the daemon records group snapshots).
    pub fn take_new_snapshots(&mut self) -> Vec<SnapshotMeta> {
        std::mem::take(&mut self.taken)
    }
}
