//! Retention: the one place that decides how far a journal may be trimmed, and what happens
//! to a mirror that holds it too long.
//!
//! A record may go once the store holds it durably (the local checkpoint) and every holder
//! of a **hold** is done with it. A volume's mirrors each have a named hold: the LSN through
//! which that mirror's applier has `received` (journaled durably at its end). The volume's
//! caller gives the holds at open (from the mirrors' saved checkpoints and dirty maps), so the
//! volume never reads mirror files itself; senders move their hold through a [`Hold`] handle.
//! A replica's journal has no holds: its checkpoint alone decides.
//!
//! When the journal would fill because holds keep it ([`OnFull::Track`], the default), the
//! holds keeping it are **released**: their mirrors switch to tracking. From then on every
//! record trimmed is first folded into the mirror's dirty map (the regions it touched), and
//! the map is made durable before the segment holding those records is recycled, so the
//! journal plus the map always cover every write such a mirror lacks. Writes never wait for
//! a mirror. A resync takes the hold again at its base and clears the map once the applier
//! has committed it; while it runs the map keeps folding what is trimmed, so a resync that
//! fails loses nothing. With [`OnFull::Block`] holds are never released: writes wait for
//! the mirror (back-pressure).
//!
//! Trimming recycles whole segments (`Journal::trim_through`); it happens at checkpoints
//! and, when the journal is full and writers wait, as soon as a hold moves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Journal, JournalError};
use crate::dirty_map::{DirtyMap, DirtyMapError, DEFAULT_REGION_SIZE};

/// What a volume does when its journal would fill because mirrors hold it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Release the holds: the mirrors keeping the journal switch to tracking (dirty maps),
    /// writes go on at local speed. The default.
    #[default]
    Track,
    /// Keep the holds: writes wait until the mirrors received enough for a trim.
    Block,
}

impl OnFull {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::Track => "track",
            OnFull::Block => "block",
        }
    }
}

impl std::str::FromStr for OnFull {
    type Err = String;
    fn from_str(text: &str) -> Result<OnFull, String> {
        match text {
            "track" => Ok(OnFull::Track),
            "block" => Ok(OnFull::Block),
            other => Err(format!("{other:?} is not an on-full policy (track or block)")),
        }
    }
}

/// The hold of a promoted volume's branch map: it keeps nothing and folds every record
/// trimmed into `VDIR/branch.dirty`, so the regions written since the branch are always
/// known (a failback resyncs them). Not a mirror name (those cannot contain `@`).
pub const BRANCH_HOLD: &str = "@branch";

/// Past this fill, under `Track`, the holds that keep the journal this full are released...
const HIGH_WATER: (u64, u64) = (3, 4);
/// ...so that trimming can bring it back to this.
const LOW_WATER: (u64, u64) = (1, 2);

/// One hold as the volume's caller knows it at open.
#[derive(Debug, Clone)]
pub struct HoldSpec {
    pub name: String,
    /// The holder's `received` checkpoint.
    pub lsn: u64,
    /// Where the holder's dirty map lives.
    pub map_path: PathBuf,
    /// The holder's dirty map, if it is tracking (then it holds nothing).
    pub map: Option<DirtyMap>,
}

/// Where a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// Keeps every record after `lsn`; no dirty map.
    Streaming { lsn: u64 },
    /// Released: keeps nothing; its dirty map covers what it lacks through `covered_lsn`.
    Tracking { covered_lsn: u64, dirty_bytes: u64 },
    /// A resync: keeps every record after `lsn`, and its dirty map still folds what is
    /// trimmed until the resync is committed.
    Resyncing { lsn: u64, dirty_bytes: u64 },
}

#[derive(Debug)]
struct Entry {
    /// Records after it are kept; `None`: released.
    lsn: Option<u64>,
    map: Option<DirtyMap>,
    map_path: PathBuf,
}

impl Entry {
    fn state(&self) -> HoldState {
        let dirty_bytes = self.map.as_ref().map_or(0, DirtyMap::dirty_bytes);
        match (self.lsn, &self.map) {
            (Some(lsn), None) => HoldState::Streaming { lsn },
            (Some(lsn), Some(_)) => HoldState::Resyncing { lsn, dirty_bytes },
            (None, map) => HoldState::Tracking { covered_lsn: map.as_ref().map_or(0, DirtyMap::covered_lsn), dirty_bytes },
        }
    }
}

/// Why a hold was released (for the holder's log and status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub name: String,
    pub lsn: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

/// What may be trimmed from one journal, and the trimming itself.
#[derive(Debug)]
pub struct Retention {
    journal: Arc<Journal>,
    device_size: u64,
    /// Every record through this LSN is durable in the store.
    checkpoint_lsn: AtomicU64,
    policy: AtomicU8,
    holds: Mutex<BTreeMap<String, Entry>>,
}

impl Retention {
    /// Retention for `journal` whose store (`device_size` bytes) is durable through
    /// `checkpoint_lsn`, with the given holds.
    pub fn new(journal: Arc<Journal>, checkpoint_lsn: u64, device_size: u64, policy: OnFull, holds: impl IntoIterator<Item = HoldSpec>) -> Arc<Retention> {
        let holds = holds
            .into_iter()
            .map(|spec| {
                let lsn = if spec.map.is_some() { None } else { Some(spec.lsn) };
                (spec.name, Entry { lsn, map: spec.map, map_path: spec.map_path })
            })
            .collect();
        Arc::new(Retention {
            journal,
            device_size,
            checkpoint_lsn: AtomicU64::new(checkpoint_lsn),
            policy: AtomicU8::new(policy as u8),
            holds: Mutex::new(holds),
        })
    }

    /// Retention with no holds (a replica's journal).
    pub fn unheld(journal: Arc<Journal>, checkpoint_lsn: u64) -> Arc<Retention> {
        Retention::new(journal, checkpoint_lsn, 0, OnFull::Block, [])
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn policy(&self) -> OnFull {
        if self.policy.load(Ordering::Acquire) == OnFull::Block as u8 {
            OnFull::Block
        } else {
            OnFull::Track
        }
    }

    /// Changes the policy at once; under `Track` a journal already full is relieved now.
    pub fn set_policy(&self, policy: OnFull) -> Result<(), JournalError> {
        self.policy.store(policy as u8, Ordering::Release);
        if policy == OnFull::Track && self.journal.is_full() {
            self.trim()?;
        }
        Ok(())
    }

    /// The LSN through which the journal may be trimmed now.
    pub fn trim_floor(&self) -> u64 {
        Self::floor(self.checkpoint_lsn(), &crate::lock(&self.holds))
    }

    fn floor(checkpoint: u64, holds: &BTreeMap<String, Entry>) -> u64 {
        holds.values().filter_map(|entry| entry.lsn).fold(checkpoint, u64::min)
    }

    pub fn checkpoint_lsn(&self) -> u64 {
        self.checkpoint_lsn.load(Ordering::Acquire)
    }

    /// The hold named `name`, if it exists.
    pub fn hold(self: &Arc<Self>, name: &str) -> Option<Hold> {
        crate::lock(&self.holds).contains_key(name).then(|| Hold { retention: self.clone(), name: name.to_string() })
    }

    /// The hold named `spec.name`, made from `spec` if it does not exist yet.
    pub fn add_hold(self: &Arc<Self>, spec: HoldSpec) -> Hold {
        let name = spec.name.clone();
        crate::lock(&self.holds).entry(spec.name).or_insert(Entry {
            lsn: if spec.map.is_some() { None } else { Some(spec.lsn) },
            map: spec.map,
            map_path: spec.map_path,
        });
        Hold { retention: self.clone(), name }
    }

    /// Drops the hold named `name` (a mirror removed from a running volume): the journal
    /// keeps nothing for it from now on and is trimmed at once as far as the others allow.
    /// Its dirty map file is the caller's to delete. Returns whether the hold existed.
    pub fn remove_hold(&self, name: &str) -> Result<bool, JournalError> {
        let existed = crate::lock(&self.holds).remove(name).is_some();
        if existed {
            self.trim()?;
        }
        Ok(existed)
    }

    /// The holds by name with their states (for status and tests).
    pub fn holds(&self) -> Vec<(String, HoldState)> {
        crate::lock(&self.holds).iter().map(|(name, entry)| (name.clone(), entry.state())).collect()
    }

    /// The store is durable through `lsn`: trims what no hold keeps.
    pub fn checkpointed(&self, lsn: u64) -> Result<Vec<Released>, JournalError> {
        self.checkpoint_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.trim()
    }

    /// Trims the journal as far as the checkpoint and the holds allow. Under `Track`, when
    /// the journal is fuller than the high-water mark (or full), first releases the holds
    /// that keep it so: returns them. Dirty maps are folded and made durable before any
    /// segment is recycled.
    pub fn trim(&self) -> Result<Vec<Released>, JournalError> {
        let mut holds = crate::lock(&self.holds);
        let checkpoint = self.checkpoint_lsn();
        let mut released = Vec::new();
        if self.policy() == OnFull::Track {
            let usage = self.journal.usage();
            if self.journal.is_full() || usage.used_bytes * HIGH_WATER.1 > usage.capacity_bytes * HIGH_WATER.0 {
                let target = self.journal.trim_point_keeping(usage.capacity_bytes * LOW_WATER.0 / LOW_WATER.1).min(checkpoint);
                for (name, entry) in holds.iter_mut() {
                    let Some(lsn) = entry.lsn.filter(|&lsn| lsn < target) else { continue };
                    entry.lsn = None;
                    // A resync that loses its hold goes back to tracking with the map it has.
                    entry.map.get_or_insert_with(|| DirtyMap::new(self.device_size, DEFAULT_REGION_SIZE, lsn));
                    tracing::warn!(
                        mirror = %name,
                        hold_lsn = lsn,
                        used_bytes = usage.used_bytes,
                        capacity_bytes = usage.capacity_bytes,
                        "the journal would fill: mirror switches to tracking (its writes go to its dirty map; the volume does not wait)"
                    );
                    released.push(Released { name: name.clone(), lsn, used_bytes: usage.used_bytes, capacity_bytes: usage.capacity_bytes });
                }
            }
        }
        let floor = Self::floor(checkpoint, &holds);
        for (name, entry) in holds.iter_mut() {
            let Some(map) = entry.map.as_mut() else { continue };
            if floor <= map.covered_lsn() {
                continue;
            }
            if !self.journal.fold_into(map, floor) {
                // Records this map lacks are gone (they cannot be, by the order here; but if
                // they were, only a whole-device resync is safe).
                tracing::error!(mirror = %name, covered = map.covered_lsn(), "dirty map lost track of trimmed records; marking the whole device dirty");
                let from = map.tracked_from();
                *map = DirtyMap::full(self.device_size, map.region_size(), floor);
                map.set_tracked_from(from);
            }
            save_map(map, &entry.map_path).map_err(|error| JournalError::Invalid(format!("dirty map of mirror {name}: {error}")))?;
        }
        if crate::failpoint::enabled("journal-no-trim") {
            return Ok(released);
        }
        self.journal.trim_through(floor)?;
        Ok(released)
    }

    fn with_entry<T>(&self, name: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        crate::lock(&self.holds).get_mut(name).map(f)
    }
}

fn save_map(map: &DirtyMap, path: &std::path::Path) -> Result<(), DirtyMapError> {
    if crate::failpoint::hit("dirty-map-save-fails") {
        return Err(DirtyMapError::Io { context: format!("write {}", path.display()), source: std::io::Error::other("failpoint") });
    }
    map.save(path)
}

/// One holder's claim on a journal.
#[derive(Debug, Clone)]
pub struct Hold {
    retention: Arc<Retention>,
    name: String,
}

impl Hold {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> HoldState {
        self.retention.with_entry(&self.name, |entry| entry.state()).unwrap_or(HoldState::Tracking { covered_lsn: 0, dirty_bytes: 0 })
    }

    /// The LSN after which records are kept (u64::MAX when released: nothing is kept).
    pub fn lsn(&self) -> u64 {
        self.retention.with_entry(&self.name, |entry| entry.lsn).flatten().unwrap_or(u64::MAX)
    }

    /// Keeps every record after `lsn` from now on (it may move back: a synchronisation
    /// re-bases a mirror on an older LSN while it chooses its base). False, and nothing
    /// changes, when the hold was released: records after it may be gone, so only a resync
    /// (`begin_resync`) takes it again.
    pub fn set(&self, lsn: u64) -> bool {
        let moved = self.retention.with_entry(&self.name, |entry| match entry.lsn.as_mut() {
            Some(held) => {
                let forward = lsn > *held;
                *held = lsn;
                Some(forward)
            }
            None => None,
        });
        let Some(Some(forward)) = moved else { return false };
        // A full journal held by a lagging mirror: writers wait for a trim, and the volume's
        // writeback (idle, everything applied) has no reason to checkpoint. Trim now, through
        // what is already durable in the store, so the mirror's progress frees space at once.
        if forward && self.retention.journal.is_full() {
            if let Err(error) = self.retention.trim() {
                tracing::warn!(error = %error, "journal trim failed; will retry at the next checkpoint");
            }
        }
        true
    }

    /// A synchronisation that resends the whole device takes the hold again at `lsn`: any
    /// dirty map is dropped (the synchronisation covers everything it marks).
    pub fn restart_at(&self, lsn: u64) {
        self.retention.with_entry(&self.name, |entry| {
            entry.lsn = Some(lsn);
            if entry.map.take().is_some() {
                let _ = std::fs::remove_file(&entry.map_path);
            }
        });
    }

    /// Starts a resync at `base` (records after it will be streamed): folds what the journal
    /// holds through `base` into the dirty map, takes the hold at `base` again, and returns
    /// the map (the regions to resend). `whole_device`: the map is lost or the replica is too
    /// far behind for the journal, so every region is resent (the applier compares hashes).
    /// An error when the journal no longer reaches back to the map's covered LSN (then only
    /// `whole_device` is safe).
    pub fn begin_resync(&self, base: u64, whole_device: bool) -> Result<DirtyMap, String> {
        let retention = &self.retention;
        let mut holds = crate::lock(&retention.holds);
        let entry = holds.get_mut(&self.name).ok_or_else(|| format!("no hold named {}", self.name))?;
        if whole_device {
            // What the replica had received in order stays known across the replacement.
            let from = entry.map.as_ref().map_or(base, DirtyMap::tracked_from);
            let mut map = DirtyMap::full(retention.device_size, DEFAULT_REGION_SIZE, base);
            map.set_tracked_from(from);
            entry.map = Some(map);
        }
        let map = match entry.map.as_mut() {
            Some(map) => map,
            None => return Err(format!("{} holds the journal and has no dirty map to resync from", self.name)),
        };
        if !retention.journal.fold_into(map, base) {
            return Err(format!("the journal no longer holds the records after LSN {} that the dirty map of {} lacks", map.covered_lsn(), self.name));
        }
        let snapshot = map.clone();
        entry.lsn = Some(base);
        Ok(snapshot)
    }

    /// Starts a failback resync at `base`: the regions to resend are the replica's
    /// `local_changes` and every region this volume wrote since its branch (the hold `branch`'s
    /// map and the records the journal holds after it, through `base`), under one lock so no
    /// trim falls between them. Without a branch map (or when the journal lost records the map
    /// lacks) every region is resent; the applier compares hashes.
    pub fn begin_failback(&self, base: u64, branch: &str, local_changes: &DirtyMap) -> Result<DirtyMap, String> {
        let retention = &self.retention;
        let mut holds = crate::lock(&retention.holds);
        let size = retention.device_size;
        let mut union = match holds.get(branch).and_then(|entry| entry.map.clone()) {
            Some(map) if map.region_size() == local_changes.region_size() => map,
            _ => DirtyMap::full(size, local_changes.region_size(), base),
        };
        union.merge(local_changes);
        if !retention.journal.fold_into(&mut union, base) {
            union = DirtyMap::full(size, local_changes.region_size(), base);
        }
        union.set_covered_lsn(base);
        union.set_tracked_from(local_changes.tracked_from());
        let entry = holds.get_mut(&self.name).ok_or_else(|| format!("no hold named {}", self.name))?;
        entry.map = Some(union.clone());
        entry.lsn = Some(base);
        Ok(union)
    }

    /// Regions where the replica was found to differ (`mirror verify --repair`) join the
    /// hold's dirty map; a hold without one gets one that covers nothing else (tracked from
    /// and covering its LSN, so the journal's records after it are still folded at the
    /// resync's start). The hold keeps its LSN: the sender's next connection resyncs the
    /// regions, staged, so the replica is never torn. The map is saved at once.
    pub fn add_dirty_regions(&self, regions: &DirtyMap) {
        self.retention.with_entry(&self.name, |entry| {
            match (entry.map.as_mut(), entry.lsn) {
                (Some(map), _) => map.merge(regions),
                (None, lsn) => {
                    let lsn = lsn.unwrap_or(0);
                    let mut map = regions.clone();
                    map.set_covered_lsn(lsn);
                    map.set_tracked_from(lsn);
                    entry.map = Some(map);
                }
            }
            if let Some(map) = entry.map.as_ref() {
                if let Err(error) = save_map(map, &entry.map_path) {
                    tracing::warn!(hold = %self.name, %error, "could not save the dirty map with the regions to repair");
                }
            }
        });
    }

    /// The applier committed the resync: the map is no longer needed (every record folded
    /// into it is in the replica now) and its file goes. Returns the LSNs the replica got as
    /// regions rather than records: `(tracked_from, base]`.
    pub fn finish_resync(&self) -> Option<(u64, u64)> {
        self.retention
            .with_entry(&self.name, |entry| {
                let gap = entry.map.as_ref().map(|map| (map.tracked_from(), map.covered_lsn()));
                entry.map = None;
                let _ = std::fs::remove_file(&entry.map_path);
                gap
            })
            .flatten()
    }

    /// While tracking or resyncing: the LSNs the replica gets as regions rather than records,
    /// `(tracked_from, covered]` (the resync's base once it began).
    pub fn regions_gap(&self) -> Option<(u64, u64)> {
        self.retention.with_entry(&self.name, |entry| entry.map.as_ref().map(|map| (map.tracked_from(), map.covered_lsn()))).flatten()
    }

    /// The resync was abandoned (the link failed): back to tracking with the map it has.
    pub fn abandon_resync(&self) {
        self.retention.with_entry(&self.name, |entry| {
            if entry.map.is_some() {
                entry.lsn = None;
            }
        });
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.retention.with_entry(&self.name, |entry| entry.map.as_ref().map_or(0, DirtyMap::dirty_bytes)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use crate::journal::{JournalOptions, RecordKind};

    fn spec(name: &str, lsn: u64, dir: &std::path::Path) -> HoldSpec {
        HoldSpec { name: name.into(), lsn, map_path: dir.join(format!("{name}.dirty")), map: None }
    }

    #[test]
    fn the_floor_is_the_checkpoint_and_every_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let options = JournalOptions { segment_size: 1 << 20, capacity: 8 << 20, journal_id: [3; 16] };
        Journal::create(tmp.path(), options).unwrap();
        let (journal, mut writer, _) = Journal::open(tmp.path(), options).unwrap();
        // Three segments' worth of records.
        for i in 0..48u64 {
            writer.append(RecordKind::Write, Extent::new(0, 65536), &vec![i as u8; 65536], 0).unwrap();
        }
        writer.commit(true).unwrap();
        let retention = Retention::new(journal.clone(), 0, 1 << 30, OnFull::Block, [spec("a", 10, tmp.path()), spec("b", 40, tmp.path())]);
        assert_eq!(retention.trim_floor(), 0);
        retention.checkpointed(48).unwrap();
        assert_eq!(retention.trim_floor(), 10, "hold a keeps the journal");
        assert!(journal.first_lsn() <= 11);
        let a = retention.hold("a").unwrap();
        assert!(a.set(45));
        assert_eq!(retention.trim_floor(), 40);
        retention.trim().unwrap();
        assert!(journal.first_lsn() > 11 && journal.first_lsn() <= 41, "first LSN {}", journal.first_lsn());
        assert!(retention.hold("c").is_none());
        assert_eq!(retention.add_hold(spec("a", 1, tmp.path())).lsn(), 45, "an existing hold is not moved by add_hold");
        assert_eq!(retention.holds(), vec![("a".to_string(), HoldState::Streaming { lsn: 45 }), ("b".to_string(), HoldState::Streaming { lsn: 40 })]);
    }

    #[test]
    fn a_full_journal_releases_the_holds_into_durable_dirty_maps() {
        let tmp = tempfile::tempdir().unwrap();
        let options = JournalOptions { segment_size: 1 << 20, capacity: 4 << 20, journal_id: [3; 16] };
        Journal::create(&tmp.path().join("j"), options).unwrap();
        let (journal, mut writer, _) = Journal::open(&tmp.path().join("j"), options).unwrap();
        let size = 64u64 << 20;
        let retention = Retention::new(journal.clone(), 0, size, OnFull::Track, [spec("slow", 0, tmp.path()), spec("fast", 0, tmp.path())]);
        let (slow, fast) = (retention.hold("slow").unwrap(), retention.hold("fast").unwrap());
        // 60 KiB writes, each in a 64 KiB region of its own; "fast" keeps up, "slow"
        // receives nothing. Sixty of them are more than three quarters of the journal.
        let mut lsn = 0;
        for i in 0..60u64 {
            lsn = writer.append(RecordKind::Write, Extent::new(i * 65536, 61440), &[7u8; 61440], 0).unwrap();
            writer.commit(true).unwrap();
            fast.set(lsn);
            retention.checkpointed(lsn).unwrap();
        }
        assert!(!journal.is_full(), "released before it filled");
        match slow.state() {
            HoldState::Tracking { covered_lsn, dirty_bytes } => {
                assert!(covered_lsn >= journal.first_lsn() - 1, "the map covers everything trimmed");
                assert_eq!(dirty_bytes, covered_lsn * 65536, "one region per record folded");
            }
            other => panic!("slow should track, is {other:?}"),
        }
        assert_eq!(fast.state(), HoldState::Streaming { lsn }, "a mirror that keeps up goes on streaming");
        assert!(!slow.set(lsn), "a released hold is not silently taken again");
        // The map on disk matches (it was saved before the trim).
        let on_disk = DirtyMap::load(&tmp.path().join("slow.dirty"), size).unwrap().unwrap();
        assert!(on_disk.covered_lsn() >= journal.first_lsn() - 1);
        // A resync folds the rest through its base and holds the journal there again.
        let map = slow.begin_resync(lsn, false).unwrap();
        assert_eq!(map.dirty_regions(), 60);
        assert!(matches!(slow.state(), HoldState::Resyncing { lsn: held, .. } if held == lsn));
        slow.finish_resync();
        assert_eq!(slow.state(), HoldState::Streaming { lsn });
        assert!(!tmp.path().join("slow.dirty").exists());
    }
}
