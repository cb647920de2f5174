//! The senders of a running volume: one thread per mirror, started with the volume and
//! stopped before it; their statuses for `status`, and live rate changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::session::{Sender, SenderControls};
use super::verify_source::{VerifyControl, VerifyRequest};
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
            status.compression = m.compression().to_string();
            status.coalesce = m.coalesce().to_string();
            if let Some(report) = checkpoints::load_verify(dir, &m.name) {
                status.show_verify(report);
            }
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

/// One running mirror.
struct Running {
    name: String,
    status: Arc<Mutex<MirrorStatus>>,
    /// Its journal hold.
    hold: Hold,
    /// Its rate limit, shared with its sender.
    rate: Arc<AtomicU64>,
    /// Set when the mirror is removed: its sender leaves at once.
    removed: Arc<AtomicBool>,
    /// Verifies asked for, and the schedule, shared with its sender.
    verify: Arc<Mutex<VerifyControl>>,
    /// Its compression setting, shared with its sender.
    compression: Arc<Mutex<crate::protocol::compression::Compression>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What [`Senders::reload`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reloaded {
    /// Mirrors whose sender started now (added since the volume started).
    pub started: Vec<String>,
    /// Running mirrors whose settings were re-read.
    pub updated: Vec<String>,
}

/// The senders of a volume: one per mirror, started with the volume, added and removed
/// while it runs (`mirror add` / `mirror remove` through the control socket).
pub struct Senders {
    dir: VolumeDir,
    volume: Arc<Volume>,
    running: Mutex<Vec<Running>>,
    stop: Arc<AtomicBool>,
}

impl Senders {
    /// Starts one sender thread per configured mirror of `volume`. Each moves the journal
    /// hold the volume was opened with under the mirror's name.
    pub fn start(volume: Arc<Volume>) -> Result<Senders, MirrorError> {
        let dir = volume.dir().clone();
        let senders = Senders { dir: dir.clone(), volume, running: Mutex::new(Vec::new()), stop: Arc::new(AtomicBool::new(false)) };
        for config in config::list(&dir)? {
            let running = senders.launch(config)?;
            lock(&senders.running).push(running);
        }
        Ok(senders)
    }

    /// Starts the sender of one mirror.
    fn launch(&self, config: config::MirrorConfig) -> Result<Running, MirrorError> {
        let dir = &self.dir;
        let saved = checkpoints::load(dir, &config.name);
        let status = Arc::new(Mutex::new(MirrorStatus::new(&config.name, &config.address, config.max_rate, saved.received_lsn, saved.applied_lsn)));
        // Normally the hold the volume was opened with; a mirror added since gets one now.
        let (map, problem) = checkpoints::load_dirty_map(dir, &config.name, self.volume.size());
        let hold = self.volume.retention().add_hold(HoldSpec {
            name: config.name.clone(),
            lsn: saved.received_lsn,
            map_path: dir.mirror_dirty_map(&config.name),
            map,
        });
        {
            let mut status = lock(&status);
            status.last_error = problem;
            status.compression = config.compression().to_string();
            status.coalesce = config.coalesce().to_string();
            status.resynced_lsn_ranges = checkpoints::load_gaps(dir, &config.name);
            if let Some(report) = checkpoints::load_verify(dir, &config.name) {
                status.show_verify(report);
            }
        }
        let verify = Arc::new(Mutex::new(VerifyControl { requested: None, every: config.verify_interval() }));
        let rate = Arc::new(AtomicU64::new(config.max_rate.unwrap_or(0)));
        let removed = Arc::new(AtomicBool::new(false));
        let compression = Arc::new(Mutex::new(config.compression()));
        let name = config.name.clone();
        let sender = Sender::new(
            dir.clone(),
            config,
            self.volume.clone(),
            status.clone(),
            hold.clone(),
            SenderControls { stop: self.stop.clone(), removed: removed.clone(), rate: rate.clone(), verify: verify.clone(), compression: compression.clone() },
        );
        let thread = std::thread::Builder::new()
            .name(format!("sender-{name}"))
            .spawn(move || sender.run())
            .map_err(|source| MirrorError::Io { context: "start sender thread".into(), source })?;
        Ok(Running { name, status, hold, rate, removed, verify, compression, thread: Some(thread) })
    }

    /// How many mirrors the volume streams to.
    pub fn count(&self) -> usize {
        lock(&self.running).len()
    }

    /// Every mirror's status, its lag measured now against the journal.
    pub fn statuses(&self) -> Vec<MirrorStatus> {
        let journal = self.volume.journal();
        lock(&self.running)
            .iter()
            .map(|running| {
                let (shared, hold) = (&running.status, &running.hold);
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

    /// Re-reads the mirrors' files (after `mirror add` or `mirror set`): a mirror added since
    /// the volume started gets its sender now (its initial synchronisation runs while the
    /// volume serves); a running one takes its new rate limit and compression at once (the
    /// next batch), its idle timeout at the next connection.
    pub fn reload(&self) -> Result<Reloaded, MirrorError> {
        let mut reloaded = Reloaded::default();
        let mut running = lock(&self.running);
        for config in config::list(&self.dir)? {
            match running.iter().find(|r| r.name == config.name) {
                Some(mirror) => {
                    mirror.rate.store(config.max_rate.unwrap_or(0), Ordering::Relaxed);
                    *lock(&mirror.compression) = config.compression();
                    {
                        let mut status = lock(&mirror.status);
                        status.max_rate = config.max_rate;
                        status.compression = config.compression().to_string();
                        status.coalesce = config.coalesce().to_string();
                    }
                    lock(&mirror.verify).every = config.verify_interval();
                    reloaded.updated.push(config.name);
                }
                None => {
                    tracing::info!(mirror = %config.name, address = %config.address, "mirror added: starting its sender");
                    reloaded.started.push(config.name.clone());
                    running.push(self.launch(config)?);
                }
            }
        }
        // Listed by name, as the files list them when the volume is not running.
        running.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(reloaded)
    }

    /// Removes the mirror `name` from the running volume: its sender stops (mid-connection
    /// or mid-synchronisation too), its journal hold is released (the journal trims as far
    /// as the others allow) and its files go: settings, checkpoints, dirty map. The
    /// replica on the applier is left as it is.
    pub fn remove(&self, name: &str) -> Result<(), MirrorError> {
        let mut mirror = {
            let mut running = lock(&self.running);
            let Some(index) = running.iter().position(|r| r.name == name) else {
                return Err(MirrorError::Invalid(format!("no mirror named {name:?} runs on volume {}", self.dir.root().display())));
            };
            running.remove(index)
        };
        mirror.removed.store(true, Ordering::SeqCst);
        if let Some(thread) = mirror.thread.take() {
            // The sender saves nothing once it sees the flag; joining also waits for a
            // checkpoint save already under way, so no file comes back after the removal.
            let _ = thread.join();
        }
        self.volume.retention().remove_hold(name).map_err(|error| MirrorError::Invalid(format!("release the journal hold of mirror {name}: {error}")))?;
        config::remove(&self.dir, name)?;
        tracing::info!(mirror = %name, "mirror removed: sender stopped, journal hold and dirty map released");
        Ok(())
    }

    /// Asks the sender of mirror `name` for an online verify (`repair`: resync what differs);
    /// returns its id, which `status` shows in `mirrors[].verify` as it runs and once done.
    /// Refused unless the replica is consistent and replicating, or while a verify runs.
    pub fn verify(&self, name: &str, repair: bool) -> Result<u64, MirrorError> {
        let running = lock(&self.running);
        let Some(mirror) = running.iter().find(|r| r.name == name) else {
            return Err(MirrorError::Invalid(format!("no mirror named {name:?} runs on volume {}", self.dir.root().display())));
        };
        let mut status = lock(&mirror.status);
        if status.state() != MirrorState::Replicating || !status.consistent() {
            return Err(MirrorError::Invalid(format!(
                "mirror {name} is {}: an online verify needs a connected, consistent replica that replicates (wait for it, e.g. `mirror wait`)",
                status.state()
            )));
        }
        if status.verify.as_ref().is_some_and(|report| report.is_running()) {
            return Err(MirrorError::Invalid(format!("a verify of mirror {name} is already running")));
        }
        let mut control = lock(&mirror.verify);
        if control.requested.is_some() {
            return Err(MirrorError::Invalid(format!("a verify of mirror {name} is already requested")));
        }
        let id = crate::clock::now_micros();
        control.requested = Some(VerifyRequest { id, repair, scheduled: false });
        // Shown as running at once, so a caller that polls never sees the previous report.
        status.show_verify(crate::status::VerifyReport::start(id, false, repair, super::verify_source::VERIFY_CHUNK, self.volume.size()));
        Ok(id)
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        for mirror in lock(&self.running).iter_mut() {
            if let Some(thread) = mirror.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
