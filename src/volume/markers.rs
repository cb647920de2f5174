//! Markers at the source: a hold on new writes (so that one instant can be marked on several
//! volumes, a consistency group), the marker record appended at that instant, and the
//! volume's marker history `VDIR/markers.json`.
//!
//! A marker is a journal record that follows every write the volume accepted before it and
//! precedes every write after it. For a group the markers must mark one instant on all
//! members: the caller first holds every member (each stops giving new writes an LSN; writes
//! already accepted are written and acknowledged), then appends each member's marker, which
//! ends that member's hold. A write acknowledged on any member before a marker was accepted
//! before every hold began, so it lies before its own volume's marker (the cut is closed under
//! "acknowledged before"). The hold lasts from its grant to its marker's append (both in
//! memory); the marker is made durable after the hold ends.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::writer::{HoldRequest, HoldStep, Request};
use super::{Volume, VolumeError};
use crate::lock;
use crate::marker::Marker;

/// A hold ends by itself after this long without its marker (a caller that died).
pub const MAX_HOLD: Duration = Duration::from_secs(2);
/// How long a hold may wait for the writer (busy with a full journal, say) before it fails;
/// shorter than [`MAX_HOLD`] so that a group's first hold cannot expire while the last waits.
const GRANT_TIMEOUT: Duration = Duration::from_secs(1);
/// Markers the history keeps (older ones are dropped; names must be unique among these).
const HISTORY_LIMIT: usize = 10_000;

/// One marker the volume appended, as `markers.json` and `marker list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerEntry {
    pub name: String,
    pub lsn: u64,
    pub id: uuid::Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub created_us: u64,
}

/// `markers.json`: the markers this volume appended, oldest first.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct MarkerHistory {
    format_version: u32,
    markers: Vec<MarkerEntry>,
    /// Names of markers being made (not yet in `markers`), so two cannot take one name.
    #[serde(skip)]
    reserved: HashSet<String>,
}

impl MarkerHistory {
    /// Loads `path`; a volume without markers has no file. A damaged file is an error naming
    /// it (a marker name could otherwise be given twice).
    pub fn load(path: &std::path::Path) -> Result<MarkerHistory, VolumeError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let history: MarkerHistory = serde_json::from_slice(&bytes)
                    .map_err(|e| VolumeError::Config { path: path.to_path_buf(), message: format!("damaged marker history: {e}") })?;
                if history.format_version != 1 {
                    return Err(VolumeError::Config {
                        path: path.to_path_buf(),
                        message: format!("format_version {} is not supported", history.format_version),
                    });
                }
                Ok(history)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(MarkerHistory { format_version: 1, ..Default::default() }),
            Err(source) => Err(VolumeError::Io { context: format!("read {}", path.display()), source }),
        }
    }

    fn save(&self, path: &std::path::Path) -> Result<(), VolumeError> {
        let bytes = serde_json::to_vec_pretty(self).expect("history serialises");
        crate::fsutil::write_atomic(path, &bytes).map_err(|source| VolumeError::Io { context: format!("write {}", path.display()), source })
    }
}

/// A hold on new writes; dropping it releases it without a marker.
pub struct WriteHold {
    next: Option<mpsc::SyncSender<HoldStep>>,
    granted: Instant,
}

/// What appending a marker did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marked {
    pub lsn: u64,
    /// How long new writes were held, microseconds.
    pub hold_us: u64,
}

/// A marker appended (it has its LSN, the hold is over) on its way to durability.
pub struct Appended {
    pub marked: Marked,
    done: mpsc::Receiver<Result<u64, VolumeError>>,
}

impl Appended {
    /// Waits until the marker is durable in the journal.
    pub fn wait_durable(self) -> Result<Marked, VolumeError> {
        self.done.recv().unwrap_or(Err(VolumeError::ShuttingDown))?;
        Ok(self.marked)
    }
}

impl WriteHold {
    /// Ends the hold with the volume fenced: the writes queued meanwhile and every later one
    /// fail (EIO); reads and flushes go on. For `mirror switchover`, once the replica has
    /// everything: nothing more may be written here.
    pub fn fence(mut self) -> Result<(), VolumeError> {
        let next = self.next.take().expect("a hold is used once");
        let (fenced_tx, fenced) = mpsc::sync_channel(1);
        next.send(HoldStep::Fence { fenced: fenced_tx }).map_err(|_| VolumeError::Busy("the write hold ended before the fence came".into()))?;
        fenced.recv().map_err(|_| VolumeError::ShuttingDown)
    }

    /// Appends the marker, which ends the hold.
    pub fn mark(mut self, payload: Vec<u8>) -> Result<Appended, VolumeError> {
        let next = self.next.take().expect("a hold is used once");
        let (appended_tx, appended) = mpsc::sync_channel(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        if next.send(HoldStep::Mark { payload, appended: appended_tx, done: done_tx }).is_err() {
            return Err(VolumeError::Busy(format!("the write hold ended before its marker came (a hold lasts at most {} s)", MAX_HOLD.as_secs())));
        }
        match appended.recv() {
            Ok(lsn) => Ok(Appended { marked: Marked { lsn, hold_us: self.granted.elapsed().as_micros() as u64 }, done }),
            Err(_) => Err(done
                .recv()
                .ok()
                .and_then(Result::err)
                .unwrap_or(VolumeError::Busy(format!("the write hold ended before its marker came (a hold lasts at most {} s)", MAX_HOLD.as_secs())))),
        }
    }
}

impl Volume {
    fn markers_path(&self) -> PathBuf {
        self.dir.markers()
    }

    /// Stops giving new writes an LSN until the hold's marker is appended or it is dropped
    /// (at the latest after [`MAX_HOLD`]). Returns once every earlier request has its LSN.
    pub fn hold_writes(&self) -> Result<WriteHold, VolumeError> {
        self.hold_writes_for(MAX_HOLD)
    }

    /// Like [`Volume::hold_writes`], for at most `limit` (a switchover's wait for its mirror).
    pub fn hold_writes_for(&self, limit: Duration) -> Result<WriteHold, VolumeError> {
        let (granted_tx, granted) = mpsc::sync_channel(1);
        let (next, next_rx) = mpsc::sync_channel(1);
        let sender = lock(&self.submit).clone().ok_or(VolumeError::ShuttingDown)?;
        sender.send(Request::Hold(HoldRequest { granted: granted_tx, next: next_rx, limit })).map_err(|_| VolumeError::ShuttingDown)?;
        match granted.recv_timeout(GRANT_TIMEOUT) {
            Ok(()) => Ok(WriteHold { next: Some(next), granted: Instant::now() }),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(VolumeError::Busy(format!("the volume took no new request for {} s (a full journal?); try again", GRANT_TIMEOUT.as_secs())))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.shared.failure().map_or(VolumeError::ShuttingDown, VolumeError::Failed)),
        }
    }

    /// Reserves `name` for a marker about to be made: refused if a marker of that name
    /// exists or is being made. Release with [`Volume::unreserve_marker`] unless recorded.
    pub fn reserve_marker(&self, marker: &Marker) -> Result<(), VolumeError> {
        marker.validate().map_err(VolumeError::Invalid)?;
        let mut history = lock(&self.markers);
        if history.markers.iter().any(|m| m.name == marker.name) || !history.reserved.insert(marker.name.clone()) {
            return Err(VolumeError::Invalid(format!("volume {} already has a marker named {:?}", self.config.name, marker.name)));
        }
        Ok(())
    }

    pub fn unreserve_marker(&self, name: &str) {
        lock(&self.markers).reserved.remove(name);
    }

    /// Adds a durable marker to the history (after [`WriteHold::mark`]).
    pub fn record_marker(&self, marker: &Marker, lsn: u64) -> Result<MarkerEntry, VolumeError> {
        let entry = MarkerEntry { name: marker.name.clone(), lsn, id: marker.id, group: marker.group.clone(), created_us: marker.created_us };
        let mut history = lock(&self.markers);
        history.reserved.remove(&marker.name);
        history.markers.push(entry.clone());
        let excess = history.markers.len().saturating_sub(HISTORY_LIMIT);
        history.markers.drain(..excess);
        history.save(&self.markers_path())?;
        tracing::info!(marker = %marker.name, lsn, group = marker.group.as_deref().unwrap_or(""), "marker appended");
        Ok(entry)
    }

    /// Appends a reserved marker in `hold`, records it and waits until it is durable.
    pub fn finish_marker(&self, marker: &Marker, hold: WriteHold) -> Result<(MarkerEntry, Marked), VolumeError> {
        let appended = match hold.mark(marker.encode()) {
            Ok(appended) => appended,
            Err(error) => {
                self.unreserve_marker(&marker.name);
                return Err(error);
            }
        };
        let entry = self.record_marker(marker, appended.marked.lsn)?;
        Ok((entry, appended.wait_durable()?))
    }

    /// A marker on this volume alone: reserve, hold, append, record, durable.
    pub fn create_marker(&self, marker: &Marker) -> Result<(MarkerEntry, Marked), VolumeError> {
        self.reserve_marker(marker)?;
        let hold = self.hold_writes().inspect_err(|_| self.unreserve_marker(&marker.name))?;
        self.finish_marker(marker, hold)
    }

    /// The markers this volume appended (its history), oldest first.
    pub fn markers(&self) -> Vec<MarkerEntry> {
        lock(&self.markers).markers.clone()
    }
}

/// The history of a volume that is not running (for `marker list` and offline status).
pub fn marker_history(dir: &std::path::Path) -> Result<Vec<MarkerEntry>, VolumeError> {
    Ok(MarkerHistory::load(&crate::layout::VolumeDir::new(dir).markers())?.markers)
}

impl MarkerHistory {
    /// Drops entries past the journal's end (at open): their marker was in a torn tail, never
    /// durable, and its LSN will be given to another record. (The entry is written once the
    /// marker has its LSN, before it is durable, so that no crash can leave a durable marker
    /// out of the history.)
    pub fn prune_beyond(&mut self, last_lsn: u64, path: &std::path::Path) -> Result<(), VolumeError> {
        let before = self.markers.len();
        self.markers.retain(|m| m.lsn <= last_lsn);
        if self.markers.len() != before {
            tracing::warn!(dropped = before - self.markers.len(), "markers in the journal's torn tail dropped from the history");
            self.save(path)?;
        }
        Ok(())
    }
}

/// The marker requests of a volume's control socket (`None`: not a marker request):
/// - `marker JSON`: a marker on this volume alone; answers `{"lsn", "hold_us", "name"}`.
/// - `marker-hold JSON`: holds new writes and answers `{"held": true}`; the next line
///   `marker-commit` appends the marker (answer as above); anything else, or nothing within
///   [`MAX_HOLD`], releases the hold (`{"released": true}`).
///
/// JSON is a [`Marker`]. Errors answer `{"error": "..."}` and change nothing.
pub fn control_request(volume: &std::sync::Arc<Volume>, request: &str) -> Option<crate::control::Reply> {
    use crate::control::Reply;
    let (verb, body) = request.split_once(' ').unwrap_or((request, ""));
    if verb != "marker" && verb != "marker-hold" {
        return None;
    }
    let failed = |error: String| Some(Reply::Done(serde_json::json!({ "error": error })));
    let marker: Marker = match serde_json::from_str(body) {
        Ok(marker) => marker,
        Err(error) => return failed(format!("bad marker request: {error}")),
    };
    let done = |entry: &MarkerEntry, marked: &Marked| serde_json::json!({ "name": entry.name, "lsn": marked.lsn, "hold_us": marked.hold_us });
    if verb == "marker" {
        return Some(match volume.create_marker(&marker) {
            Ok((entry, marked)) => Reply::Done(done(&entry, &marked)),
            Err(error) => Reply::Done(serde_json::json!({ "error": error.to_string() })),
        });
    }
    if let Err(error) = volume.reserve_marker(&marker) {
        return failed(error.to_string());
    }
    let hold = match volume.hold_writes() {
        Ok(hold) => hold,
        Err(error) => {
            volume.unreserve_marker(&marker.name);
            return failed(error.to_string());
        }
    };
    let volume = volume.clone();
    Some(Reply::Continue {
        answer: serde_json::json!({ "held": true }),
        deadline: MAX_HOLD,
        then: Box::new(move |line| match line {
            Some("marker-commit") => match volume.finish_marker(&marker, hold) {
                Ok((entry, marked)) => done(&entry, &marked),
                Err(error) => serde_json::json!({ "error": error.to_string() }),
            },
            _ => {
                drop(hold);
                volume.unreserve_marker(&marker.name);
                serde_json::json!({ "released": true })
            }
        }),
    })
}

/// The volume's scheduled markers (`[markers] every` in volume.toml), taken by a thread of
/// `run` until dropped. A marker that fails is logged; the next is taken on time.
pub struct MarkerScheduler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MarkerScheduler {
    /// `None` when the volume has no schedule. `has_mirrors` tells whether a marker would
    /// mark anything now (skipped, with a warning, when not).
    pub fn start(volume: std::sync::Arc<Volume>, has_mirrors: impl Fn() -> bool + Send + 'static) -> Option<MarkerScheduler> {
        let schedule = volume.config().markers.clone();
        let interval = schedule.interval()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("markers".into())
            .spawn(move || {
                let mut next = Instant::now() + interval;
                while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    if Instant::now() < next {
                        std::thread::sleep((next - Instant::now()).min(Duration::from_millis(200)));
                        continue;
                    }
                    next += interval;
                    if !has_mirrors() {
                        tracing::warn!("scheduled marker skipped: the volume has no mirrors");
                        continue;
                    }
                    let marker = Marker::single(&crate::marker::scheduled_name(schedule.prefix(), std::time::SystemTime::now()));
                    let frozen = match crate::freeze::Frozen::freeze(&schedule.freeze) {
                        Ok(frozen) => frozen,
                        Err(error) => {
                            tracing::error!(marker = %marker.name, %error, "scheduled marker not taken");
                            continue;
                        }
                    };
                    let result = volume.create_marker(&marker);
                    frozen.thaw();
                    if let Err(error) = result {
                        tracing::error!(marker = %marker.name, %error, "scheduled marker failed");
                    }
                }
            })
            .ok()?;
        Some(MarkerScheduler { stop, thread: Some(thread) })
    }
}

impl Drop for MarkerScheduler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
