//! A resync's stage: where a consistent replica collects what a resync sends (region contents
//! and the records after the resync's base) while its image stays the old consistent state.
//! A sparse file the size of the device, whole regions at their own offsets, and a map of the
//! regions it holds (`stage.map`, a dirty map, saved when the stage is committed). A region
//! a record touches is first copied from the image, so every staged region is whole and
//! committing is copying staged regions over the image (idempotent: a crash while
//! committing copies them again).

use std::path::Path;

use super::{io, ReplicaError};
use crate::dirty_map::DirtyMap;
use crate::extent::Extent;
use crate::journal::RecordKind;
use crate::layout::ReplicaDir;
use crate::store::Store;

pub(super) struct Stage {
    store: Store,
    map: DirtyMap,
}

impl Stage {
    /// A new, empty stage for a device of `size` bytes in regions of `region_size`.
    pub fn create(dir: &ReplicaDir, size: u64, region_size: u64) -> Result<Stage, ReplicaError> {
        let _ = std::fs::remove_dir_all(dir.resync());
        crate::permissions::create_dir_all(dir.resync()).map_err(io(format!("create {}", dir.resync().display())))?;
        Store::create_sparse(&dir.stage_image(), size)?;
        Ok(Stage { store: Store::open_sized(&dir.stage_image(), "resync stage", size)?, map: DirtyMap::new(size, region_size, 0) })
    }

    /// The stage of a resync that was being committed (its map was saved first).
    pub fn open_committing(dir: &ReplicaDir, size: u64) -> Result<Stage, ReplicaError> {
        let path = dir.stage_map();
        let map = DirtyMap::load(&path, size)
            .map_err(|error| ReplicaError::Stage(error.to_string()))?
            .ok_or_else(|| ReplicaError::Stage(format!("{} is missing: the commit cannot be completed", path.display())))?;
        Ok(Stage { store: Store::open_sized(&dir.stage_image(), "resync stage", size)?, map })
    }

    /// Removes a stage from disk.
    pub fn discard(dir: &ReplicaDir) {
        let _ = std::fs::remove_dir_all(dir.resync());
    }

    pub fn staged_bytes(&self) -> u64 {
        self.map.dirty_bytes()
    }

    fn region_of(&self, region: u64) -> Result<Extent, ReplicaError> {
        if region >= self.map.regions() {
            return Err(ReplicaError::Rejected(format!("region {region} is outside the device ({} regions)", self.map.regions())));
        }
        Ok(self.map.region_extent(region))
    }

    /// Copies the regions `extent` touches from `image` into the stage, where not staged yet.
    fn stage_regions(&mut self, image: &Store, extent: Extent) -> Result<(), ReplicaError> {
        if extent.is_empty() {
            return Ok(());
        }
        let size = self.map.region_size();
        let end = extent.end().unwrap_or(u64::MAX).min(self.map.device_size());
        for region in extent.offset / size..end.div_ceil(size) {
            if self.map.is_dirty(region) {
                continue;
            }
            let range = self.map.region_extent(region);
            let mut buffer = vec![0u8; range.length as usize];
            let hole = image.read_for_scan(&mut buffer, range.offset, true).map_err(io(format!("read {}", image.path().display())))?;
            if !hole {
                self.store.write_all_at(&buffer, range.offset).map_err(io("write the resync stage"))?;
            }
            self.map.mark(range);
        }
        Ok(())
    }

    /// Applies a record to the stage (the regions it touches are staged from `image` first).
    pub fn apply(&mut self, image: &Store, kind: RecordKind, extent: Extent, payload: &[bytes::Bytes]) -> Result<(), ReplicaError> {
        if kind == RecordKind::Marker {
            return Ok(());
        }
        self.stage_regions(image, extent)?;
        self.store.apply(kind, extent, payload).map_err(io("apply a record to the resync stage"))
    }

    /// A region's bytes from the source replace the staged ones.
    pub fn write_region(&mut self, region: u64, zero: bool, data: &[u8]) -> Result<(), ReplicaError> {
        let range = self.region_of(region)?;
        if zero {
            if !data.is_empty() {
                return Err(ReplicaError::Rejected(format!("zero region {region} carries {} bytes", data.len())));
            }
            self.store.zero(range, true).map_err(io("zero a region of the resync stage"))?;
        } else {
            if data.len() as u64 != range.length {
                return Err(ReplicaError::Rejected(format!("region {region} has {} bytes, expected {}", data.len(), range.length)));
            }
            self.store.write_all_at(data, range.offset).map_err(io("write the resync stage"))?;
        }
        self.map.mark(range);
        Ok(())
    }

    /// The replica's view of `region` now: the stage's if staged, else the image's. Returns
    /// its hash.
    pub fn region_hash(&self, image: &Store, region: u64, buffer: &mut Vec<u8>) -> Result<[u8; 32], ReplicaError> {
        let range = self.region_of(region)?;
        buffer.resize(range.length as usize, 0);
        let source = if self.map.is_dirty(region) { &self.store } else { image };
        let hole = source.read_for_scan(buffer, range.offset, true).map_err(io(format!("read {}", source.path().display())))?;
        Ok(crate::store::chunk_hash(buffer, hole))
    }

    /// First step of a commit: the stage and its map are made durable.
    pub fn seal(&mut self, dir: &ReplicaDir, lsn: u64) -> Result<(), ReplicaError> {
        self.store.sync_data().map_err(io("sync the resync stage"))?;
        self.map.set_covered_lsn(lsn);
        self.map.save(&dir.stage_map()).map_err(|error| ReplicaError::Stage(error.to_string()))
    }

    /// The device bytes a commit overwrites.
    pub fn staged_extents(&self) -> Vec<(u64, Extent)> {
        // After every snapshot's LSN: a commit changes the image now.
        self.map.iter().map(|region| (u64::MAX, self.map.region_extent(region))).collect()
    }

    /// Second step: every staged region is copied over the image, which is then synced.
    pub fn copy_to(&self, image: &Store) -> Result<(), ReplicaError> {
        let mut buffer = Vec::new();
        for region in self.map.iter() {
            let range = self.map.region_extent(region);
            buffer.resize(range.length as usize, 0);
            let hole = self.store.read_for_scan(&mut buffer, range.offset, true).map_err(io("read the resync stage"))?;
            if hole {
                image.zero(range, true).map_err(io(format!("zero a region of {}", image.path().display())))?;
            } else {
                image.write_all_at(&buffer, range.offset).map_err(io(format!("write {}", image.path().display())))?;
            }
        }
        image.sync_data().map_err(io(format!("sync {}", image.path().display())))
    }
}

/// True when `path` lies on a file system with at least `bytes` free.
pub(super) fn has_room(path: &Path, bytes: u64) -> Result<bool, ReplicaError> {
    let stats = rustix::fs::statvfs(path).map_err(|error| ReplicaError::Io { context: format!("free space of {}", path.display()), source: error.into() })?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize) >= bytes)
}
