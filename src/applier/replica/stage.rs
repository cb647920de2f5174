//! A resync's stage: where a consistent replica collects what a resync sends (region contents
//! and the records after the resync's base) while its image stays the old consistent state.
//! A sparse file the size of the device, whole regions at their own offsets, and a map of the
//! regions it holds (`stage.map`, a dirty map, saved when the stage is committed). A region
//! a record touches is first copied from the image, so every staged region is whole and
//! committing is copying staged regions over the image (idempotent: a crash while
//! committing copies them again).

use std::path::Path;

use super::{io, ReplicaError};
use crate::dirty_map::{run_length, DirtyMap};
use crate::extent::Extent;
use crate::fsutil::AlignedBuffer;
use crate::journal::RecordKind;
use crate::layout::ReplicaDir;
use crate::store::Store;

/// Most bytes of consecutive regions read or copied at once.
const RUN_BYTES: u64 = 4 << 20;
/// Bytes staged between two `Store::release_written` calls: the page cache's own writeback
/// starts only at a tenth of the memory dirty, so a 2 GiB stage was left for its seal to
/// write (1 s of a 9 s resync here) and for its close to free (0.6 s).
const RELEASE_EVERY: u64 = 8 << 20;

pub(super) struct Stage {
    store: Store,
    map: DirtyMap,
    /// Bytes written since the last `release_written`.
    unreleased: u64,
}

impl Stage {
    /// A new, empty stage for a device of `size` bytes in regions of `region_size`.
    pub fn create(dir: &ReplicaDir, size: u64, region_size: u64) -> Result<Stage, ReplicaError> {
        let _ = std::fs::remove_dir_all(dir.resync());
        crate::permissions::create_dir_all(dir.resync()).map_err(io(format!("create {}", dir.resync().display())))?;
        Store::create_sparse(&dir.stage_image(), size)?;
        Ok(Stage { store: Store::open_sized(&dir.stage_image(), "resync stage", size)?, map: DirtyMap::new(size, region_size, 0), unreleased: 0 })
    }

    /// The stage of a resync that was being committed (its map was saved first).
    pub fn open_committing(dir: &ReplicaDir, size: u64) -> Result<Stage, ReplicaError> {
        let path = dir.stage_map();
        let map = DirtyMap::load(&path, size)
            .map_err(|error| ReplicaError::Stage(error.to_string()))?
            .ok_or_else(|| ReplicaError::Stage(format!("{} is missing: the commit cannot be completed", path.display())))?;
        Ok(Stage { store: Store::open_sized(&dir.stage_image(), "resync stage", size)?, map, unreleased: 0 })
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
            self.unreleased += range.length;
            if self.unreleased >= RELEASE_EVERY {
                self.store.release_written();
                self.unreleased = 0;
            }
        }
        self.map.mark(range);
        Ok(())
    }

    /// The replica's view of `regions` now (the stage's where staged, else the image's): their
    /// hashes, in order. Consecutive regions from the same file are read at once.
    pub fn region_hashes(&self, image: &Store, regions: &[u64], buffer: &mut Vec<u8>) -> Result<Vec<[u8; 32]>, ReplicaError> {
        for &region in regions {
            self.region_of(region)?;
        }
        let mut hashes = Vec::with_capacity(regions.len());
        let mut next = 0;
        while next < regions.len() {
            let first = regions[next];
            let staged = self.map.is_dirty(first);
            let same_file = regions[next..].iter().copied().take_while(|&region| self.map.is_dirty(region) == staged);
            let count = run_length(same_file, self.map.regions_in(RUN_BYTES));
            let run = self.map.run_extent(first, count);
            let source = if staged { &self.store } else { image };
            buffer.resize(run.length as usize, 0);
            let hole = source.read_for_scan(buffer, run.offset, true).map_err(io(format!("read {}", source.path().display())))?;
            hashes.extend(self.map.run_regions(first, count).map(|(_, bytes)| crate::store::chunk_hash(&buffer[bytes], hole)));
            next += count;
        }
        Ok(hashes)
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

    /// Second step: every staged region is copied over the image, which is then synced. Runs
    /// of consecutive regions are copied at once; a region that is a hole of the stage (a zero
    /// region from the source) is zeroed in the image, freeing its space.
    pub fn copy_to(&self, image: &Store) -> Result<(), ReplicaError> {
        let mut bounce = AlignedBuffer::new(RUN_BYTES as usize);
        let staged: Vec<u64> = self.map.iter().collect();
        let is_hole = |region: u64| self.store.is_hole(self.map.region_extent(region));
        let mut next = 0;
        while next < staged.len() {
            let first = staged[next];
            let hole = is_hole(first);
            let alike = staged[next..].iter().copied().take_while(|&region| region == first || is_hole(region) == hole);
            let count = run_length(alike, self.map.regions_in(RUN_BYTES));
            let run = self.map.run_extent(first, count);
            if hole {
                image.zero(run, true).map_err(io(format!("zero a region of {}", image.path().display())))?;
            } else {
                image.copy_from(&self.store, run, &mut bounce).map_err(io(format!("copy the resync stage to {}", image.path().display())))?;
            }
            next += count;
        }
        image.sync_data().map_err(io(format!("sync {}", image.path().display())))
    }
}

/// True when `path` lies on a file system with at least `bytes` free.
pub(super) fn has_room(path: &Path, bytes: u64) -> Result<bool, ReplicaError> {
    let stats = rustix::fs::statvfs(path).map_err(|error| ReplicaError::Io { context: format!("free space of {}", path.display()), source: error.into() })?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize) >= bytes)
}
