//! A volume's life: `create` makes its directory, `open` locks it, recovers the journal,
//! redoes what the backing store may lack and starts the volume's threads. (Stopping is
//! `Volume::shutdown`.)

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use super::config::{BackingWrites, JournalConfig, VolumeConfig, CONFIG_FORMAT, LOGICAL_BLOCK_SIZE};
use super::markers::MarkerHistory;
use super::shared::Shared;
use super::state::VolumeState;
use super::writer::WriterLoop;
use super::{io_context, syncer, writeback, Volume, VolumeError};
use crate::generation::History;
use crate::journal::placement::{self, Located, Owner, Role};
use crate::journal::{HoldSpec, Journal, JournalError, JournalReader, OnFull, Retention};
use crate::layout::{DirLock, LockError, VolumeDir};
use crate::store::{Cache, Store};

/// Requests queued to the writer before submitters block.
const REQUEST_QUEUE: usize = 1024;

pub const DEFAULT_JOURNAL_SIZE: u64 = 1 << 30;
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
pub const DEFAULT_PENDING_WINDOW: u64 = 64 << 20;

/// Options of `volume create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub name: String,
    pub size: u64,
    pub backing: Option<PathBuf>,
    pub journal_size: Option<u64>,
    pub segment_size: Option<u64>,
    pub pending_window: Option<u64>,
    pub on_full: Option<OnFull>,
    /// How writeback writes the backing store (default buffered).
    pub backing_writes: Option<BackingWrites>,
    /// Keep the journal's segments in this directory (absolute; absent or empty) instead of
    /// `VDIR/journal`, which becomes a symlink to it (see `journal::placement`).
    pub journal_dir: Option<PathBuf>,
    /// Write every journal segment at create time (`Journal::preallocate`).
    pub preallocate_journal: bool,
    /// A volume that continues another's history (a promoted replica): its identity, and
    /// its generation history ending with the new generation (whose branch LSN is the last
    /// record the backing store already holds).
    pub origin: Option<Origin>,
}

/// The history a promoted volume continues (see [`CreateOptions::origin`]).
#[derive(Debug, Clone)]
pub struct Origin {
    pub uuid: uuid::Uuid,
    pub history: History,
}

/// What `volume create` made.
#[derive(Debug, Clone)]
pub struct Created {
    pub config: VolumeConfig,
    pub fingerprint: String,
}

impl Volume {
    /// Creates a volume's state directory: config, journal, state and identity.
    pub fn create(dir: &Path, options: &CreateOptions) -> Result<Created, VolumeError> {
        crate::name::validate(&options.name).map_err(|e| VolumeError::Invalid(format!("volume name {e}")))?;
        if options.size == 0 || !options.size.is_multiple_of(LOGICAL_BLOCK_SIZE) {
            return Err(VolumeError::Invalid(format!("volume size {} must be a positive multiple of {LOGICAL_BLOCK_SIZE} bytes", options.size)));
        }
        let journal_size = options.journal_size.unwrap_or(DEFAULT_JOURNAL_SIZE);
        let segment_size =
            options.segment_size.unwrap_or_else(|| DEFAULT_SEGMENT_SIZE.min(journal_size / 4 / 4096 * 4096).max(crate::journal::MIN_SEGMENT_SIZE));
        let layout = VolumeDir::new(std::path::absolute(dir).map_err(io_context(format!("resolve {}", dir.display())))?);
        let backing = match &options.backing {
            Some(path) => std::path::absolute(path).map_err(io_context(format!("resolve {}", path.display())))?,
            None => layout.default_backing(),
        };
        let mut config = VolumeConfig {
            format_version: CONFIG_FORMAT,
            name: options.name.clone(),
            uuid: options.origin.as_ref().map_or_else(uuid::Uuid::new_v4, |origin| origin.uuid),
            size: options.size,
            backing: backing.clone(),
            journal: JournalConfig { capacity: journal_size, segment_size, pending_window: 0, on_full: options.on_full.unwrap_or_default() },
            run: Default::default(),
            markers: Default::default(),
            backing_writes: options.backing_writes.unwrap_or_default(),
        };
        config.journal.pending_window = options.pending_window.unwrap_or(DEFAULT_PENDING_WINDOW.min(journal_size / 2));
        config.validate().map_err(|message| VolumeError::Invalid(format!("invalid volume settings: {message}")))?;

        // Check the backing store and the journal's directory before touching the disk.
        if let Some(path) = &options.backing {
            Store::open_sized(path, "backing store", options.size)?;
        }
        if let Some(target) = &options.journal_dir {
            placement::check_new(target).map_err(JournalError::from)?;
            if target.starts_with(layout.root()) {
                return Err(VolumeError::Invalid(format!(
                    "journal directory {} is inside the volume directory: give a directory on another filesystem",
                    target.display()
                )));
            }
        }
        let created_dir = match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(VolumeError::AlreadyExists { dir: dir.to_path_buf() });
                }
                false
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                crate::permissions::create_dir_all(dir).map_err(io_context(format!("create {}", dir.display())))?;
                true
            }
            Err(error) => return Err(io_context(format!("read {}", dir.display()))(error)),
        };
        // An empty directory given to us (a mount point, mkdir's 0755) becomes private too.
        crate::permissions::tighten_tree(dir)?;
        let mut placed = None;
        let result = (|| {
            if let Some(target) = &options.journal_dir {
                let owner = Owner::new(Role::Volume, &config.name, config.uuid, layout.root());
                placed = Some((target, placement::place(&layout.journal(), target, &owner).map_err(JournalError::from)?));
            }
            if options.backing.is_none() {
                Store::create_sparse(&backing, options.size)?;
            }
            let history = options.origin.as_ref().map_or_else(|| History::first(uuid::Uuid::new_v4()), |origin| origin.history.clone());
            // A promoted volume's backing store holds its history through the branch LSN:
            // the journal continues the numbering after it.
            let applied_lsn = history.current().branch_lsn;
            Journal::create_at(&layout.journal(), config.journal_options(), applied_lsn + 1)?;
            if options.preallocate_journal {
                Journal::preallocate(&layout.journal(), &config.journal_options())?;
            }
            let fingerprint = crate::identity::create(&layout.identity(), &options.name)?;
            if options.origin.is_some() {
                history.save(&layout.generations()).map_err(|error| VolumeError::Invalid(error.to_string()))?;
            }
            VolumeState { format_version: CONFIG_FORMAT, applied_lsn, generation: history.current().id, clean_shutdown: true }.save(&layout)?;
            // The config file is written last: its presence marks a complete volume.
            config.save(&layout)?;
            crate::fsutil::sync_dir(dir).map_err(io_context(format!("sync {}", dir.display())))?;
            Ok(fingerprint)
        })();
        match result {
            Ok(fingerprint) => Ok(Created { config, fingerprint }),
            Err(error) => {
                // Leave nothing half-made behind.
                if let Some((target, made)) = placed {
                    placement::unplace(&layout.journal(), target, made);
                }
                if created_dir {
                    let _ = std::fs::remove_dir_all(dir);
                } else {
                    for path in layout.created_entries() {
                        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                }
                Err(error)
            }
        }
    }

    /// Opens the volume in `dir` for serving: locks it, recovers the journal, redoes records
    /// past the last checkpoint, and starts the writer, syncer and writeback threads.
    ///
    /// `holds`: the journal keeps every record after each named LSN (a mirror's `received`
    /// checkpoint), so each mirror can resume from the journal, or, for a mirror that tracks,
    /// folds what it trims into the mirror's dirty map; the caller reads them from the
    /// mirrors' files and moves them later through [`Volume::retention`].
    pub fn open(dir: &Path, holds: impl IntoIterator<Item = HoldSpec>) -> Result<Volume, VolumeError> {
        let layout = VolumeDir::new(dir);
        let config = VolumeConfig::load(&layout)?;
        if let Some(demoted) = super::Demoted::load(&layout)? {
            return Err(demoted.refusal(dir));
        }
        if layout.restoring().exists() {
            return Err(VolumeError::Invalid(format!(
                "a `volume restore` of {} is not finished ({} exists): run it again",
                dir.display(),
                layout.restoring().display()
            )));
        }
        // Before the lock file or anything else is touched: a placed journal must be there.
        let located = check_journal(&layout, &config, true)?;
        // Before serving: the directory holds the disk's contents (docs/security.md).
        crate::permissions::tighten_tree(layout.root())?;
        if located.placed {
            crate::permissions::tighten_tree(&located.segments)?;
        }
        let lock = DirLock::acquire(&layout.lock()).map_err(|error| match error {
            LockError::Held { holder } => VolumeError::InUse { dir: dir.to_path_buf(), holder },
            LockError::Io { path, source } => VolumeError::Io { context: format!("open {}", path.display()), source },
        })?;
        let backing = Store::open_sized_with(&config.backing, "backing store", config.size, Cache::Bypass)?;
        warn_if_world_accessible(&config.backing, layout.root());
        let mut state = VolumeState::load(&layout)?;
        let (journal, writer, report) = Journal::open(&layout.journal(), config.journal_options())?;
        if let Some(tail) = &report.torn_tail {
            tracing::warn!(%tail, "journal had a torn tail (writes never acknowledged as durable)");
        }
        if state.applied_lsn > report.last_lsn {
            return Err(VolumeError::Journal(JournalError::Corrupt(format!(
                "state.json says records through LSN {} were applied, but the journal ends at LSN {}",
                state.applied_lsn, report.last_lsn
            ))));
        }
        if state.applied_lsn + 1 < report.first_lsn {
            return Err(VolumeError::Journal(JournalError::Corrupt(format!(
                "the journal starts at LSN {} but the backing store is only known to hold records through LSN {}",
                report.first_lsn, state.applied_lsn
            ))));
        }
        let history = History::load_or_first(&layout.generations(), state.generation).map_err(|error| VolumeError::Invalid(error.to_string()))?;
        let mut markers = MarkerHistory::load(&layout.markers())?;
        markers.prune_beyond(report.last_lsn, &layout.markers())?;
        let redone = redo(&journal, state.applied_lsn, &backing)?;
        if redone > 0 {
            tracing::info!(records = redone, from = state.applied_lsn + 1, to = report.last_lsn, "redid journal records into the backing store");
        }
        state.applied_lsn = report.last_lsn;
        state.clean_shutdown = false;
        state.save(&layout)?;

        let retention = Retention::new(journal.clone(), report.last_lsn, config.size, config.journal.on_full, holds);
        // Trim what the checkpoint already covers (and every mirror has received).
        retention.trim()?;
        let shared = Arc::new(Shared::new(layout.clone(), backing, retention, report.last_lsn, config.journal.pending_window, state));
        let (request_tx, request_rx) = mpsc::sync_channel(REQUEST_QUEUE);
        let (apply_tx, apply_rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let syncer_shared = shared.clone();
        let writeback_shared = shared.clone();
        let direct_writes = config.backing_writes == BackingWrites::Direct;
        let threads = vec![
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || WriterLoop::new(writer_shared, writer, apply_tx, sync_tx).run(request_rx))
                .map_err(io_context("start journal writer thread"))?,
            std::thread::Builder::new()
                .name("journal-syncer".into())
                .spawn(move || syncer::run(syncer_shared, sync_rx))
                .map_err(io_context("start journal syncer thread"))?,
            std::thread::Builder::new()
                .name("writeback".into())
                .spawn(move || writeback::run(writeback_shared, apply_rx, direct_writes))
                .map_err(io_context("start writeback thread"))?,
        ];
        Ok(Volume {
            dir: layout,
            config,
            shared,
            submit: Mutex::new(Some(request_tx)),
            threads: Mutex::new(threads),
            markers: Mutex::new(markers),
            history,
            _lock: lock,
        })
    }
}

/// Where the volume's journal keeps its segments; a journal placed on another filesystem
/// (`volume create --journal-dir`) is checked first: there, a directory, writable (when
/// `write`), and this volume's. Every command that opens the journal calls this first.
pub fn check_journal(dir: &VolumeDir, config: &VolumeConfig, write: bool) -> Result<Located, VolumeError> {
    let owner = Owner::new(Role::Volume, &config.name, config.uuid, dir.root());
    Ok(placement::check(&dir.journal(), &owner, write).map_err(JournalError::from)?)
}

/// A backing store named by `volume create --backing` keeps the mode its administrator gave
/// it (a block device's is udev's), but one every local user can read is worth a word.
fn warn_if_world_accessible(backing: &Path, root: &Path) {
    if backing.starts_with(root) {
        return;
    }
    if let Ok(mode) = crate::permissions::mode_of(backing) {
        if mode & 0o007 != 0 {
            tracing::warn!(path = %backing.display(), mode = %format!("{mode:04o}"), "the backing store is accessible by every local user (its mode is left as it is: chmod o-rwx it)");
        }
    }
}

/// Re-applies records after `applied_lsn` to the backing store and makes them durable.
fn redo(journal: &Arc<Journal>, applied_lsn: u64, backing: &Store) -> Result<u64, VolumeError> {
    let mut reader = JournalReader::new(journal.clone(), applied_lsn + 1)?;
    let mut count = 0;
    while let Some(record) = reader.next_record()? {
        let header = record.header;
        backing.apply(header.kind, header.extent(), &[&record.payload]).map_err(io_context(format!("redo LSN {} into the backing store", header.lsn)))?;
        count += 1;
    }
    if count > 0 {
        backing.sync_data().map_err(io_context("sync backing store"))?;
    }
    Ok(count)
}
