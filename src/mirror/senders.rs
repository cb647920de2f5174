//! The senders of a running volume: one thread per mirror, started with the volume and
//! stopped before it; their statuses for `status`, and live rate changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::session::Sender;
use super::{checkpoints, config, MirrorError};
use crate::dirty_map::{DirtyMap, DEFAULT_REGION_SIZE};
use crate::journal::{Hold, HoldSpec, HoldState, Journal, BRANCH_HOLD};
use crate::layout::VolumeDir;
use crate::lock;
use crate::status::{MirrorState, MirrorStatus};
use crate::volume::Volume;

/// The journal holds a volume of `device_size` bytes opens with: each mirror's saved
/// `received` checkpoint, and for a mirror that tracks, its dirty map.
/// A promoted volume also keeps its branch map ([`BRANCH_HOLD`]): the regions written since
/// the branch, for a failback.
pub fn holds(dir: &VolumeDir, device_size: u64) -> Result<Vec<HoldSpec>, MirrorError> {
    let mut holds: Vec<HoldSpec> = config::list(dir)?
        .into_iter()
        .map(|m| HoldSpec {
            lsn: checkpoints::load(dir, &m.name).received_lsn,
            map_path: dir.mirror_dirty_map(&m.name),
            map: checkpoints::load_dirty_map(dir, &m.name, device_size).0,
            name: m.name,
        })
        .collect();
    let path = dir.branch_map();
    if path.exists() {
        let map = DirtyMap::load(&path, device_size).ok().flatten().unwrap_or_else(|| {
            tracing::error!(path = %path.display(), "the branch map is damaged: a failback will compare every region");
            DirtyMap::full(device_size, DEFAULT_REGION_SIZE, 0)
        });
        holds.push(HoldSpec { name: BRANCH_HOLD.into(), lsn: 0, map_path: path, map: Some(map) });
    }
    Ok(holds)
}

/// The mirrors of a volume nobody serves, from their files, with the lag the journal shows.
pub fn offline_statuses(dir: &VolumeDir, journal: &Journal, device_size: u64) -> Vec<MirrorStatus> {
    config::list(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let saved = checkpoints::load(dir, &m.name);
            let mut status = MirrorStatus::new(&m.name, &m.address, m.max_rate, saved.received_lsn, saved.applied_lsn);
            let (map, problem) = checkpoints::load_dirty_map(dir, &m.name, device_size);
            status.resynced_lsn_ranges = checkpoints::load_gaps(dir, &m.name);
            if let Some(map) = map {
                status.dirty_bytes = map.dirty_bytes();
                if map.covered_lsn() > map.tracked_from() {
                    status.resynced_lsn_ranges.push([map.tracked_from(), map.covered_lsn()]);
                }
                status.track();
            }
            status.last_error = problem;
            measure_lag(&mut status, journal);
            status
        })
        .collect()
}

/// What the replica lacks is every record after its `applied` checkpoint, sent or not.
fn measure_lag(status: &mut MirrorStatus, journal: &Journal) {
    let backlog = journal.backlog_after(status.applied_lsn);
    status.lag_bytes = backlog.payload_bytes;
    status.lag_records = backlog.records;
    status.lag_seconds = backlog.oldest_timestamp_us.map_or(0.0, |oldest| crate::clock::now_micros().saturating_sub(oldest) as f64 / 1e6);
}

/// The senders of a volume.
pub struct Senders {
    dir: VolumeDir,
    volume: Arc<Volume>,
    statuses: Vec<Arc<Mutex<MirrorStatus>>>,
    /// Each mirror's journal hold, in the order of `statuses`.
    holds: Vec<Hold>,
    /// Each mirror's rate limit, by name, shared with its sender.
    rates: Vec<(String, Arc<AtomicU64>)>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Senders {
    /// Starts one sender thread per configured mirror of `volume`. Each moves the journal
    /// hold the volume was opened with under the mirror's name.
    pub fn start(volume: Arc<Volume>) -> Result<Senders, MirrorError> {
        let dir = volume.dir().clone();
        let configs = config::list(&dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut statuses = Vec::new();
        let mut threads = Vec::new();
        let mut rates = Vec::new();
        let mut holds = Vec::new();
        for config in configs {
            let saved = checkpoints::load(&dir, &config.name);
            let status = Arc::new(Mutex::new(MirrorStatus::new(&config.name, &config.address, config.max_rate, saved.received_lsn, saved.applied_lsn)));
            // Normally the hold the volume was opened with; a mirror added since gets one now.
            let hold = volume.retention().add_hold(HoldSpec {
                name: config.name.clone(),
                lsn: saved.received_lsn,
                map_path: dir.mirror_dirty_map(&config.name),
                map: checkpoints::load_dirty_map(&dir, &config.name, volume.size()).0,
            });
            if let (_, Some(problem)) = checkpoints::load_dirty_map(&dir, &config.name, volume.size()) {
                lock(&status).last_error = Some(problem);
            }
            lock(&status).resynced_lsn_ranges = checkpoints::load_gaps(&dir, &config.name);
            holds.push(hold.clone());
            let rate = Arc::new(AtomicU64::new(config.max_rate.unwrap_or(0)));
            rates.push((config.name.clone(), rate.clone()));
            statuses.push(status.clone());
            let name = format!("sender-{}", config.name);
            let sender = Sender::new(dir.clone(), config, volume.clone(), status, hold, stop.clone(), rate);
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || sender.run())
                    .map_err(|source| MirrorError::Io { context: "start sender thread".into(), source })?,
            );
        }
        Ok(Senders { dir, volume, statuses, holds, rates, stop, threads })
    }

    /// How many mirrors the volume streams to.
    pub fn count(&self) -> usize {
        self.statuses.len()
    }

    /// Every mirror's status, its lag measured now against the journal.
    pub fn statuses(&self) -> Vec<MirrorStatus> {
        let journal = self.volume.journal();
        self.statuses
            .iter()
            .zip(&self.holds)
            .map(|(shared, hold)| {
                let mut status = lock(shared);
                // The journal may have let go of a mirror whose sender is not looking (it
                // waits to reconnect): the status follows the hold.
                if matches!(hold.state(), HoldState::Tracking { .. }) && !matches!(status.state(), MirrorState::Tracking | MirrorState::Resyncing) {
                    status.track();
                }
                status.dirty_bytes = hold.dirty_bytes();
                let mut status = status.clone();
                if let Some((after, through)) = hold.regions_gap().filter(|(after, through)| through > after) {
                    status.resynced_lsn_ranges.push([after, through]);
                }
                measure_lag(&mut status, journal);
                status
            })
            .collect()
    }

    /// Re-reads the mirrors' files and applies their rate limits to the running senders
    /// (after `mirror set`). Mirrors added or removed take effect at the next `run`.
    pub fn reload(&self) -> Result<(), MirrorError> {
        for config in config::list(&self.dir)? {
            if let Some((_, rate)) = self.rates.iter().find(|(name, _)| *name == config.name) {
                rate.store(config.max_rate.unwrap_or(0), Ordering::Relaxed);
                if let Some(status) = self.statuses.iter().find(|s| lock(s).name == config.name) {
                    lock(status).max_rate = config.max_rate;
                }
            }
        }
        Ok(())
    }

    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
