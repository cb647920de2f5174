//! A dirty map: which fixed-size regions of a device a replica lacks, as a bitmap. A mirror
//! that fell out of the journal (tracking) keeps one: every record trimmed from the journal
//! before the mirror received it is folded in (its extent marks the regions it touched), and
//! a resync sends those regions. A replica's resync stage uses one for the regions it holds.
//!
//! File format, version 1 (`VDIR/mirrors/NAME.dirty`, replaced atomically):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `UBMDIRTY` |
//! | 8 | 4 | format version (1), little-endian like every field |
//! | 12 | 4 | region size in bytes (a power of two, at least 4096) |
//! | 16 | 8 | device size in bytes |
//! | 24 | 8 | covered LSN: the map holds every write through it that the replica lacks |
//! | 32 | 8 | region count (device size / region size, rounded up) |
//! | 40 | 4 | CRC32C of the header (these 4 bytes zero) and the bitmap |
//! | 44 | 8 | tracked-from LSN: the mirror had received every record through it when it began to track (0: unknown) |
//! | 52 | 12 | zero |
//! | 64 | ... | bitmap: region i is bit i % 8 of byte i / 8 |

use std::path::{Path, PathBuf};

use crate::extent::Extent;

pub const MAGIC: [u8; 8] = *b"UBMDIRTY";
pub const FORMAT_VERSION: u32 = 1;
const HEADER_SIZE: usize = 64;
/// The default region size: small enough that a few scattered 4 KiB writes cost little to
/// resend, large enough that a 1 TiB volume's map is 2 MiB.
pub const DEFAULT_REGION_SIZE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DirtyMapError {
    #[error("dirty map {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    region_size: u64,
    device_size: u64,
    covered_lsn: u64,
    /// The covered LSN the map was made with: what the replica had received in order.
    tracked_from: u64,
    bits: Vec<u8>,
    dirty: u64,
}

impl DirtyMap {
    /// An empty map of a device of `device_size` bytes in regions of `region_size`.
    pub fn new(device_size: u64, region_size: u64, covered_lsn: u64) -> DirtyMap {
        assert!(region_size.is_power_of_two() && region_size >= 4096, "region size {region_size}");
        let regions = device_size.div_ceil(region_size);
        DirtyMap { region_size, device_size, covered_lsn, tracked_from: covered_lsn, bits: vec![0; regions.div_ceil(8) as usize], dirty: 0 }
    }

    /// A map with every region dirty (the safe answer when a map was lost or damaged).
    pub fn full(device_size: u64, region_size: u64, covered_lsn: u64) -> DirtyMap {
        let mut map = DirtyMap::new(device_size, region_size, covered_lsn);
        for region in 0..map.regions() {
            map.set(region);
        }
        map
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    pub fn regions(&self) -> u64 {
        self.device_size.div_ceil(self.region_size)
    }

    /// The map holds every write through this LSN that the replica lacks.
    pub fn covered_lsn(&self) -> u64 {
        self.covered_lsn
    }

    /// The records after this LSN (through `covered_lsn`) reached the replica only as dirty
    /// regions, not one by one: markers among them have no snapshot there.
    pub fn tracked_from(&self) -> u64 {
        self.tracked_from
    }

    pub fn set_tracked_from(&mut self, lsn: u64) {
        self.tracked_from = lsn.min(self.covered_lsn);
    }

    pub fn set_covered_lsn(&mut self, lsn: u64) {
        self.covered_lsn = lsn;
    }

    pub fn dirty_regions(&self) -> u64 {
        self.dirty
    }

    /// Every region is dirty: nothing more can be folded in.
    pub fn is_full(&self) -> bool {
        self.dirty == self.regions()
    }

    /// Bytes the dirty regions cover (the last region may be short).
    pub fn dirty_bytes(&self) -> u64 {
        if self.dirty == 0 {
            return 0;
        }
        let last = self.regions() - 1;
        let short = self.region_size - (self.device_size - last * self.region_size);
        self.dirty * self.region_size - if self.is_dirty(last) { short } else { 0 }
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        self.bits.get((region / 8) as usize).is_some_and(|byte| byte & (1 << (region % 8)) != 0)
    }

    fn set(&mut self, region: u64) {
        let Some(byte) = self.bits.get_mut((region / 8) as usize) else { return };
        let bit = 1 << (region % 8);
        if *byte & bit == 0 {
            *byte |= bit;
            self.dirty += 1;
        }
    }

    /// Marks the regions `extent` touches (the part inside the device).
    pub fn mark(&mut self, extent: Extent) {
        if extent.is_empty() || extent.offset >= self.device_size {
            return;
        }
        let end = extent.end().unwrap_or(u64::MAX).min(self.device_size);
        for region in extent.offset / self.region_size..end.div_ceil(self.region_size) {
            self.set(region);
        }
    }

    /// Marks every region `other` marks (maps of the same geometry).
    pub fn merge(&mut self, other: &DirtyMap) {
        for region in other.iter() {
            self.set(region);
        }
    }

    /// The dirty regions, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, byte)| **byte != 0)
            .flat_map(|(index, byte)| (0..8).filter(move |bit| byte & (1 << bit) != 0).map(move |bit| index as u64 * 8 + bit))
    }

    /// The device bytes of region `region` (the last one may be short).
    pub fn region_extent(&self, region: u64) -> Extent {
        let offset = region * self.region_size;
        Extent::new(offset, self.region_size.min(self.device_size.saturating_sub(offset)))
    }

    /// The device bytes of `count` consecutive regions from `first` (inside the device).
    pub fn run_extent(&self, first: u64, count: usize) -> Extent {
        let start = self.region_extent(first).offset;
        let last = self.region_extent(first + count.max(1) as u64 - 1);
        Extent::new(start, last.offset + last.length - start)
    }

    /// The regions of that run, each with its bytes' place in a buffer holding the run.
    pub fn run_regions(&self, first: u64, count: usize) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> + '_ {
        let start = self.region_extent(first).offset;
        (first..first + count as u64).map(move |region| {
            let extent = self.region_extent(region);
            let at = (extent.offset - start) as usize;
            (region, at..at + extent.length as usize)
        })
    }

    /// How many regions to take at once: `bytes` worth, at least one.
    pub fn regions_in(&self, bytes: u64) -> usize {
        (bytes / self.region_size).max(1) as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_SIZE + self.bits.len()];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(self.region_size as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.device_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.covered_lsn.to_le_bytes());
        out[32..40].copy_from_slice(&self.regions().to_le_bytes());
        out[44..52].copy_from_slice(&self.tracked_from.to_le_bytes());
        out[HEADER_SIZE..].copy_from_slice(&self.bits);
        let crc = checksum(&out);
        out[40..44].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a map; `path` names the file in errors. Anything but a whole, verified map of
    /// a device of `device_size` bytes is an error (never a partial map).
    pub fn decode(bytes: &[u8], path: &Path, device_size: u64) -> Result<DirtyMap, DirtyMapError> {
        let corrupt = |reason: String| DirtyMapError::Corrupt { path: path.to_path_buf(), reason };
        if bytes.len() < HEADER_SIZE {
            return Err(corrupt(format!("{} bytes, shorter than the {HEADER_SIZE}-byte header", bytes.len())));
        }
        if bytes[0..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("format version {version} (this build reads {FORMAT_VERSION})")));
        }
        let region_size = u32_at(12) as u64;
        if !region_size.is_power_of_two() || region_size < 4096 {
            return Err(corrupt(format!("region size {region_size} is not a power of two of at least 4096")));
        }
        let size = u64_at(16);
        if size != device_size {
            return Err(corrupt(format!("made for a device of {size} bytes, the volume is {device_size}")));
        }
        let regions = u64_at(32);
        if regions != size.div_ceil(region_size) {
            return Err(corrupt(format!("{regions} regions do not fit {size} bytes in regions of {region_size}")));
        }
        let expected_len = HEADER_SIZE as u64 + regions.div_ceil(8);
        if bytes.len() as u64 != expected_len {
            return Err(corrupt(format!("{} bytes, expected {expected_len} (truncated?)", bytes.len())));
        }
        if checksum(bytes) != u32_at(40) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let mut map = DirtyMap::new(size, region_size, u64_at(24));
        map.tracked_from = u64_at(44).min(map.covered_lsn);
        map.bits.copy_from_slice(&bytes[HEADER_SIZE..]);
        // Bits past the last region must be zero in a well-formed map.
        let last_bits = (regions % 8) as u32;
        if last_bits != 0 && map.bits.last().is_some_and(|byte| byte >> last_bits != 0) {
            return Err(corrupt("bits set past the last region".into()));
        }
        map.dirty = map.bits.iter().map(|byte| byte.count_ones() as u64).sum();
        Ok(map)
    }

    /// Reads the map at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path, device_size: u64) -> Result<Option<DirtyMap>, DirtyMapError> {
        match std::fs::read(path) {
            Ok(bytes) => DirtyMap::decode(&bytes, path, device_size).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DirtyMapError::Io { context: format!("read {}", path.display()), source }),
        }
    }

    /// Replaces the map at `path` durably (write, fsync, rename, fsync the directory).
    pub fn save(&self, path: &Path) -> Result<(), DirtyMapError> {
        crate::fsutil::write_atomic(path, &self.encode()).map_err(|source| DirtyMapError::Io { context: format!("write {}", path.display()), source })
    }
}

/// How many of `regions` (in order) are consecutive from the first, `most` at most: runs
/// of regions are read and written at once (one I/O per 64 KiB region kept a resync of a
/// 2 GiB volume waiting on the disk for most of its 40 s).
pub fn run_length(regions: impl Iterator<Item = u64>, most: usize) -> usize {
    let mut regions = regions.take(most);
    let Some(first) = regions.next() else { return 0 };
    1 + regions.enumerate().take_while(|&(i, region)| region == first + 1 + i as u64).count()
}

/// CRC32C of an encoded map with its CRC field taken as zero.
fn checksum(encoded: &[u8]) -> u32 {
    let mut header = [0u8; HEADER_SIZE];
    header.copy_from_slice(&encoded[..HEADER_SIZE]);
    header[40..44].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&header), &encoded[HEADER_SIZE..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_regions_and_round_trips() {
        let size = 10 * DEFAULT_REGION_SIZE + 4096;
        let mut map = DirtyMap::new(size, DEFAULT_REGION_SIZE, 7);
        map.mark(Extent::new(100, 10));
        map.mark(Extent::new(DEFAULT_REGION_SIZE - 1, 2));
        map.mark(Extent::new(10 * DEFAULT_REGION_SIZE, 4096));
        map.mark(Extent::new(size, 4096));
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![0, 1, 10]);
        assert_eq!(map.dirty_bytes(), 2 * DEFAULT_REGION_SIZE + 4096);
        assert_eq!(map.region_extent(10), Extent::new(10 * DEFAULT_REGION_SIZE, 4096));
        let bytes = map.encode();
        let path = Path::new("/x/m.dirty");
        assert_eq!(DirtyMap::decode(&bytes, path, size).unwrap(), map);
        assert_eq!(DirtyMap::full(size, DEFAULT_REGION_SIZE, 0).dirty_regions(), 11);
    }

    #[test]
    fn runs_of_consecutive_regions_are_bounded() {
        assert_eq!(run_length([].into_iter(), 8), 0);
        assert_eq!(run_length([5].into_iter(), 8), 1);
        assert_eq!(run_length([5, 6, 7, 9, 10].into_iter(), 8), 3);
        assert_eq!(run_length([5, 6, 7, 8].into_iter(), 2), 2);
        assert_eq!(run_length([5, 7].into_iter(), 8), 1);
        let size = 10 * DEFAULT_REGION_SIZE + 4096;
        let map = DirtyMap::new(size, DEFAULT_REGION_SIZE, 0);
        assert_eq!(map.run_extent(9, 2), Extent::new(9 * DEFAULT_REGION_SIZE, DEFAULT_REGION_SIZE + 4096), "the short last region");
        let region = DEFAULT_REGION_SIZE as usize;
        assert_eq!(map.run_regions(9, 2).collect::<Vec<_>>(), vec![(9, 0..region), (10, region..region + 4096)]);
        assert_eq!(map.regions_in(4 << 20), 64);
        assert_eq!(map.regions_in(100), 1);
    }

    #[test]
    fn damage_of_any_kind_is_an_error_naming_the_file() {
        let size = 100 * DEFAULT_REGION_SIZE;
        let mut map = DirtyMap::new(size, DEFAULT_REGION_SIZE, 3);
        map.mark(Extent::new(0, 5 * DEFAULT_REGION_SIZE));
        let bytes = map.encode();
        let path = Path::new("/v/mirrors/m.dirty");
        for cut in 0..bytes.len() {
            let error = DirtyMap::decode(&bytes[..cut], path, size).unwrap_err();
            assert!(error.to_string().contains("/v/mirrors/m.dirty"), "{error}");
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert!(DirtyMap::decode(&flipped, path, size).is_err(), "a flipped bit at {at} went unnoticed");
        }
        assert!(DirtyMap::decode(&bytes, path, size + 4096).is_err(), "a map of another size");
    }
}

/// Decoding maps of arbitrary bytes (issue 20 item 4; see `src/proptests/mod.rs`).
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// What every map, decoded or built, must satisfy.
    fn assert_in_range(map: &DirtyMap) {
        assert!(map.dirty_regions() <= map.regions());
        assert!(map.iter().all(|region| region < map.regions()), "a region past the last one is dirty");
        assert_eq!(map.iter().count() as u64, map.dirty_regions());
        assert!(map.dirty_bytes() <= map.device_size());
        assert!(map.tracked_from() <= map.covered_lsn());
        for region in map.iter() {
            assert!(map.region_extent(region).fits(map.device_size()));
        }
    }

    /// A header with arbitrary fields and a correct checksum, so decoding checks the fields.
    fn plausible() -> impl Strategy<Value = (Vec<u8>, u64)> {
        let region_size = prop_oneof![Just(DEFAULT_REGION_SIZE as u32), Just(4096), any::<u32>(), (0u32..32).prop_map(|n| 1 << n)];
        let size = prop_oneof![0u64..1 << 24, Just(0), any::<u64>()];
        (region_size, size, any::<u64>(), any::<u64>(), proptest::option::of(any::<u64>()), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(
            |(region_size, size, covered, tracked, regions, bits)| {
                let regions = regions.unwrap_or_else(|| size.div_ceil((region_size as u64).max(1)));
                let mut out = vec![0u8; HEADER_SIZE];
                out[0..8].copy_from_slice(&MAGIC);
                out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                out[12..16].copy_from_slice(&region_size.to_le_bytes());
                out[16..24].copy_from_slice(&size.to_le_bytes());
                out[24..32].copy_from_slice(&covered.to_le_bytes());
                out[32..40].copy_from_slice(&regions.to_le_bytes());
                out[44..52].copy_from_slice(&tracked.to_le_bytes());
                out.extend_from_slice(&bits);
                let crc = checksum(&out);
                out[40..44].copy_from_slice(&crc.to_le_bytes());
                (out, size)
            },
        )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_decode_to_a_map_in_range_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..200), size in any::<u64>()) {
            if let Ok(map) = DirtyMap::decode(&bytes, Path::new("/m.dirty"), size) {
                assert_in_range(&map);
            }
        }

        #[test]
        fn plausible_headers_decode_to_a_map_in_range_or_an_error((bytes, size) in plausible()) {
            if let Ok(map) = DirtyMap::decode(&bytes, Path::new("/m.dirty"), size) {
                assert_in_range(&map);
                // The same bytes again, but for a tracked-from LSN past the covered one, which
                // decodes as the covered one.
                let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
                if u64_at(44) <= u64_at(24) {
                    prop_assert_eq!(map.encode(), bytes);
                }
            }
        }

        #[test]
        fn marked_maps_stay_in_range_and_round_trip(size in 0u64..1 << 24, shift in 12u32..20, extents in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..6), near in proptest::collection::vec((0u64..1 << 24, 0u64..1 << 22), 0..6)) {
            let mut map = DirtyMap::new(size, 1 << shift, 5);
            for (offset, length) in extents.into_iter().chain(near) {
                map.mark(Extent::new(offset, length));
            }
            assert_in_range(&map);
            prop_assert_eq!(DirtyMap::decode(&map.encode(), Path::new("/m.dirty"), size).unwrap(), map);
        }
    }
}
