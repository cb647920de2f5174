//! A replica's own journal: its sizing, where it lives, and its replacement by an empty one
//! (after an initial sync or a resync, or a coalesced range cut by a crash), which keeps the
//! old journal's files as spares.

use std::sync::Arc;

use super::{io, ReplicaError, JOURNAL_FAULTS};
use crate::applier::config::ReplicaJournal;
use crate::journal::placement::{self, Owner, PlacementError, Role};
use crate::journal::{Journal, JournalError, JournalOptions, JournalWriter};
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

/// Writes every segment file the replica's journal in `dir` may have, beside the open
/// journal (`applier.toml` `preallocate_journals`, see `Replica::preallocate_journal`): the
/// open journal does not count them, the initial sync's replacement takes them over.
pub(super) fn preallocate(dir: &ReplicaDir, volume_uuid: uuid::Uuid) -> Result<usize, ReplicaError> {
    let segments = placement::locate(&dir.journal()).map_err(JournalError::from)?.segments;
    Ok(Journal::preallocate(&segments, &journal_options(volume_uuid))?)
}

/// Replaces a replica's journal by an empty one whose first record will be `first_lsn`. The
/// new journal is made whole beside the old one (`journal.new`), then the old one is moved
/// aside and the new one into place, so a crash leaves the old journal, or none (which `open`
/// replaces by an empty one at the saved state's LSN), never a half-made one. Callers save
/// the replica's state first. A journal placed on another filesystem is replaced beside its
/// directory there (rename(2) does not cross filesystems, and the link must stay a link), and
/// whenever that directory is missing the old one is still aside, so `open` tells an
/// interrupted replacement from an unmounted filesystem.
///
/// Once the new journal is in place, the old one's files become its spares
/// (`Journal::adopt_segments`), so a replica in service keeps the files it made, however
/// many syncs and resyncs replace its journal. Only when `old_last_lsn` (the last LSN the old
/// journal holds, if known) is below `first_lsn`: every stale record in a kept file then has
/// a lower LSN than any record the new journal can hold, which recovery rejects whatever
/// its checksum says, as it does in a journal's own recycled segments. A replacement that
/// goes back in LSNs (a coalesced range or a resync abandoned) lets the old files go.
pub(super) fn restart_journal(
    dir: &ReplicaDir,
    volume_uuid: uuid::Uuid,
    first_lsn: u64,
    old_last_lsn: Option<u64>,
) -> Result<(Arc<Journal>, JournalWriter), ReplicaError> {
    let located = placement::locate(&dir.journal()).map_err(JournalError::from)?;
    let (live, fresh, aside) = (located.segments.clone(), located.beside(NEW), located.beside(RESETTING));
    let options = journal_options(volume_uuid);
    let _ = std::fs::remove_dir_all(&fresh);
    Journal::create_at(&fresh, options, first_lsn)?;
    if located.placed {
        placement::carry_owner(if live.exists() { &live } else { &aside }, &fresh).map_err(JournalError::from)?;
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
    // A crash from here on leaves the new journal whole; `open` removes what is still aside.
    if aside.exists() && old_last_lsn.is_some_and(|last| last < first_lsn) {
        if let Err(error) = Journal::adopt_segments(&live, &aside, &options) {
            // A file not taken over costs a zero-filled one later, never the replacement.
            tracing::warn!(%error, from = %aside.display(), "could not keep the replaced journal's files; new ones will be made");
        }
    }
    let (journal, mut writer, _) = Journal::open(&dir.journal(), options)?;
    writer.set_fault_op(JOURNAL_FAULTS);
    let _ = std::fs::remove_dir_all(&aside);
    Ok((journal, writer))
}

/// Gives the replica in `dir` an empty journal whose first record will be `first_lsn`: in
/// place of the one it has (a create a crash interrupted, a demoted volume's replica made
/// where a promoted one was), kept where that one lives; else a new one, placed in `journal`
/// when the applier keeps replicas' journals elsewhere.
pub(super) fn new_journal(dir: &ReplicaDir, owner: &Owner, journal: Option<&ReplicaJournal>, first_lsn: u64) -> Result<(), ReplicaError> {
    let link = dir.journal();
    if std::fs::symlink_metadata(&link).is_ok() {
        placement::check_or_interrupted(&link, owner, RESETTING).map_err(JournalError::from)?;
        // What that journal held is not known: its files go.
        restart_journal(dir, owner.uuid, first_lsn, None)?;
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
