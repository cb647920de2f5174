//! A replica's own journal: its sizing, where it lives, and its replacement by an empty one
//! (after an initial sync or a resync, or a coalesced range cut by a crash), which keeps the
//! old journal's files as spares.

use std::sync::Arc;

use super::{io, ReplicaError, JOURNAL_FAULTS};
use crate::applier::config::{JournalSetup, ReplicaJournal};
use crate::journal::placement::{self, Owner, PlacementError, Role};
use crate::journal::{Adopt, Journal, JournalError, JournalOptions, JournalWriter};
use crate::layout::ReplicaDir;

/// Journal sizing for replicas: room for bursts while the image catches up.
pub(super) fn journal_options(uuid: uuid::Uuid) -> JournalOptions {
    JournalOptions { segment_size: 64 << 20, capacity: 1 << 30, journal_id: *uuid.as_bytes() }
}

/// The directories a journal replacement makes beside the segments' (see `restart_journal`).
pub(super) const NEW: &str = crate::layout::JOURNAL_NEW_SUFFIX;
pub(super) const RESETTING: &str = crate::layout::JOURNAL_RESETTING_SUFFIX;

/// Whose journal a replica's is, for the owner file of a journal placed elsewhere.
pub(super) fn owner(dir: &ReplicaDir, volume_name: &str, volume_uuid: uuid::Uuid) -> Owner {
    Owner::new(Role::Replica, volume_name, volume_uuid, dir.root())
}

/// Makes a new replica's journal as `setup` says: placed elsewhere or not, every segment
/// written now or as it grows (`applier.toml` `preallocate_journals`). The initial sync
/// replaces the journal at once, and the replacement keeps these files.
pub(super) fn create_journal(dir: &ReplicaDir, owner: &Owner, setup: &JournalSetup) -> Result<(), ReplicaError> {
    new_journal(dir, owner, setup.placed.as_ref(), 1)?;
    if setup.preallocate {
        let segments = placement::locate(&dir.journal()).map_err(JournalError::from)?.segments;
        Journal::preallocate(&segments, &journal_options(owner.uuid))?;
    }
    Ok(())
}

/// Replaces a replica's journal by an empty one whose first record will be `first_lsn`. The
/// new journal is made whole beside the old one (`journal.new`), then the old one is moved
/// aside and the new one into place, so a crash leaves the old journal, or none (which `open`
/// replaces by an empty one at the saved state's LSN), never a half-made one. Callers save
/// the replica's state first. A journal placed on another filesystem is replaced beside its
/// directory there (rename(2) does not cross filesystems, and the link must stay a link), and
/// whenever that directory is missing the old one is still aside, so `open` tells an
/// interrupted replacement from an unmounted filesystem. The old journal's files become the
/// new one's spares (`Journal::adopt_segments`).
pub(super) fn restart_journal(dir: &ReplicaDir, volume_uuid: uuid::Uuid, first_lsn: u64) -> Result<(Arc<Journal>, JournalWriter), ReplicaError> {
    let located = placement::locate(&dir.journal()).map_err(JournalError::from)?;
    let (live, fresh, aside) = (located.segments.clone(), located.beside(NEW), located.beside(RESETTING));
    let options = journal_options(volume_uuid);
    // Whichever holds the journal being replaced: the live one, or the one a crash left aside.
    let old = if live.exists() { &live } else { &aside };
    let _ = std::fs::remove_dir_all(&fresh);
    crate::permissions::create_dir_all(&fresh).map_err(io(format!("create {}", fresh.display())))?;
    // The old journal's spares are no part of it: they go first, and one of them becomes the
    // new journal's first segment instead of a zero-filled file.
    if old.exists() {
        adopt(&fresh, old, Adopt::Spares, &options);
    }
    Journal::create_at(&fresh, options, first_lsn)?;
    if located.placed {
        placement::carry_owner(old, &fresh).map_err(JournalError::from)?;
    }
    if live.exists() {
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&live, &aside).map_err(io(format!("move aside {}", live.display())))?;
    }
    if crate::failpoint::hit("replica-journal-swap") {
        std::process::abort();
    }
    std::fs::rename(&fresh, &live).map_err(io(format!("move {} into place", fresh.display())))?;
    crate::fsutil::sync_dir(located.parent()).map_err(io(format!("sync {}", located.parent().display())))?;
    // The old journal's segments are spares of the new one now: a replica in service keeps
    // the files it made, whatever number of syncs and resyncs replace its journal. A crash
    // from here on leaves the new journal whole; `open` removes what is still aside.
    if aside.exists() {
        adopt(&live, &aside, Adopt::Everything, &options);
    }
    let (journal, mut writer, _) = Journal::open(&dir.journal(), options)?;
    writer.set_fault_op(JOURNAL_FAULTS);
    let _ = std::fs::remove_dir_all(&aside);
    Ok((journal, writer))
}

/// Takes files of the journal in `old` as spares of the one in `dir`, as far as it can: a
/// file that cannot be taken over costs a zero-filled one later, never the replacement.
fn adopt(dir: &std::path::Path, old: &std::path::Path, what: Adopt, options: &JournalOptions) {
    if let Err(error) = Journal::adopt_segments(dir, old, what, options) {
        tracing::warn!(%error, from = %old.display(), to = %dir.display(), "could not keep the replaced journal's files; new ones will be made");
    }
}

/// Gives the replica in `dir` an empty journal whose first record will be `first_lsn`: in
/// place of the one it has (a create a crash interrupted, a demoted volume's replica made
/// where a promoted one was), kept where that one lives; else a new one, placed in `journal`
/// when the applier keeps replicas' journals elsewhere.
pub(super) fn new_journal(dir: &ReplicaDir, owner: &Owner, journal: Option<&ReplicaJournal>, first_lsn: u64) -> Result<(), ReplicaError> {
    let link = dir.journal();
    if std::fs::symlink_metadata(&link).is_ok() {
        placement::check_or_interrupted(&link, owner, RESETTING).map_err(JournalError::from)?;
        restart_journal(dir, owner.uuid, first_lsn)?;
        return Ok(());
    }
    if let Some(journal) = journal {
        journal_home(journal)?;
        if let Some(parent) = journal.target.parent() {
            crate::permissions::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        placement::place(&link, &journal.target, owner).map_err(JournalError::from)?;
    }
    Journal::create_at(&link, journal_options(owner.uuid), first_lsn)?;
    Ok(())
}

/// `journal_dir` itself must exist (the levels below it are made): a directory that is not
/// there is a filesystem not mounted, not one to make.
pub(super) fn journal_home(journal: &ReplicaJournal) -> Result<(), ReplicaError> {
    if journal.journal_dir.is_dir() {
        return Ok(());
    }
    let owner = "the applier's replica journals (applier.toml journal_dir)".to_string();
    Err(JournalError::from(PlacementError::Missing { path: journal.journal_dir.clone(), owner }).into())
}
