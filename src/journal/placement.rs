//! Where a journal's segments live. By default in the owner's directory (`VDIR/journal`,
//! `REPLICA/journal`); placed elsewhere (`volume create --journal-dir`, the applier's
//! `journal_dir`), that path is a symlink to the directory holding the segments, so every
//! path helper of `layout` keeps working, and the placed directory holds an owner file
//! (`journal-owner.json`) naming whose journal it is.
//!
//! A placed journal lives on a filesystem that can be missing (not mounted), read-only
//! (remounted after errors) or swapped by hand: [`check`] refuses each of those before
//! anything opens the journal, with an error that says which, and changes nothing. The owner
//! file also stops two journals from sharing one directory: [`place`] takes only an absent
//! or empty directory. The caller says whose journal it is ([`Owner`]): this module knows no
//! volumes or replicas beyond a name, a UUID and a directory.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// The owner file in a placed journal directory.
pub const OWNER_FILE: &str = "journal-owner.json";
const OWNER_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("journal directory {0} must be an absolute path")]
    NotAbsolute(PathBuf),
    #[error("journal directory {path} cannot be made: its parent does not exist (is its filesystem mounted?)")]
    NoParent { path: PathBuf },
    #[error("journal directory {path} is not empty{holder}: a journal directory is given to one journal only")]
    NotEmpty { path: PathBuf, holder: String },
    #[error("journal directory {path} of {owner} does not exist: is its filesystem mounted?")]
    Missing { path: PathBuf, owner: String },
    #[error("journal directory {path} of {owner} is not a directory")]
    NotDirectory { path: PathBuf, owner: String },
    #[error("journal directory {path} of {owner} is not writable ({source}): is its filesystem mounted read-only?")]
    NotWritable { path: PathBuf, owner: String, source: io::Error },
    #[error("journal directory {path} of {owner} has no owner file {OWNER_FILE}: it was not made for this journal, so it is not used")]
    NoOwner { path: PathBuf, owner: String },
    #[error("{path} holds the journal of {other} (uuid {uuid}), not of {owner}")]
    Foreign { path: PathBuf, other: String, uuid: uuid::Uuid, owner: String },
    #[error("{path}: unreadable owner file: {message}")]
    BadOwner { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> PlacementError {
    let context = context.into();
    move |source| PlacementError::Io { context, source }
}

/// Whose journal a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A volume's own journal (`VDIR/journal`).
    Volume,
    /// An applier's journal of one replica (`REPLICA/journal`).
    Replica,
}

/// The content of `journal-owner.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub format_version: u32,
    pub role: Role,
    /// The volume's name (a replica's: the volume it follows).
    pub volume: String,
    /// The volume's UUID.
    pub uuid: uuid::Uuid,
    /// The directory whose journal it is (VDIR, or the replica's directory), absolute.
    pub vdir: PathBuf,
}

impl Owner {
    pub fn new(role: Role, volume: &str, uuid: uuid::Uuid, dir: &Path) -> Owner {
        let vdir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Owner { format_version: OWNER_FORMAT, role, volume: volume.to_string(), uuid, vdir }
    }

    fn describe(&self) -> String {
        match self.role {
            Role::Volume => format!("volume {}", self.volume),
            Role::Replica => format!("the replica of {} in {}", self.volume, self.vdir.display()),
        }
    }

    /// Same owner: same role and UUID, and `vdir` is the same directory (compared by device
    /// and inode, so another spelling of the path is the same). A promoted replica's volume
    /// keeps its source's UUID, so the UUID alone does not tell two journals apart.
    fn is(&self, other: &Owner) -> bool {
        use std::os::unix::fs::MetadataExt;
        let same_dir = match (std::fs::metadata(&self.vdir), std::fs::metadata(&other.vdir)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            // The recorded directory is gone: it moved (an applier binds an unbound replica
            // to its source by renaming its directory, see [`follow_move`]); a directory
            // that no longer exists claims no journal.
            (Err(error), Ok(_)) if error.kind() == io::ErrorKind::NotFound && self.role == Role::Replica => true,
            _ => self.vdir == other.vdir,
        };
        self.role == other.role && self.uuid == other.uuid && same_dir
    }

    /// Writes the owner file into `dir` durably (a journal directory being made).
    pub fn claim(&self, dir: &Path) -> Result<(), PlacementError> {
        let path = dir.join(OWNER_FILE);
        let text = serde_json::to_vec_pretty(self).expect("an owner serialises");
        fsutil::write_atomic(&path, &text).map_err(io_error(format!("write {}", path.display())))
    }

    fn load(dir: &Path) -> Result<Option<Owner>, PlacementError> {
        let path = dir.join(OWNER_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let owner: Owner = serde_json::from_slice(&bytes).map_err(|e| PlacementError::BadOwner { path: path.clone(), message: e.to_string() })?;
                if owner.format_version != OWNER_FORMAT {
                    return Err(PlacementError::BadOwner { path, message: format!("format_version {} is not supported", owner.format_version) });
                }
                Ok(Some(owner))
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PlacementError::Io { context: format!("read {}", path.display()), source }),
        }
    }
}

/// Where the segments of the journal at `link` are, as [`check`] found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The directory holding the segments (`link` itself unless placed).
    pub segments: PathBuf,
    /// True when `link` is a symlink to a placed directory.
    pub placed: bool,
}

impl Located {
    /// A path beside the segments' directory, on its filesystem, so a journal made there can
    /// be renamed into place (rename(2) does not cross filesystems, and renaming onto the
    /// symlink would replace the link, not its target): `<segments>.<suffix>`.
    pub fn beside(&self, suffix: &str) -> PathBuf {
        let mut name = self.segments.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".{suffix}"));
        self.segments.with_file_name(name)
    }

    /// The directory to sync after renaming entries beside the segments.
    pub fn parent(&self) -> &Path {
        self.segments.parent().unwrap_or(Path::new("/"))
    }
}

/// Where the journal at `link` keeps its segments, without any check (a journal this
/// process already checked at open, being replaced).
pub fn locate(link: &Path) -> Result<Located, PlacementError> {
    Ok(match target_of(link)? {
        Some(target) => Located { segments: target, placed: true },
        None => Located { segments: link.to_path_buf(), placed: false },
    })
}

/// The directory whose journal is at `link` was renamed to `dir`: a placed journal's owner
/// file names the new directory from now on. Returns whether it changed anything.
pub fn follow_move(link: &Path, dir: &Path) -> Result<bool, PlacementError> {
    let Some(target) = target_of(link)? else { return Ok(false) };
    let Some(mut owner) = Owner::load(&target)? else { return Ok(false) };
    let moved = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if owner.vdir == moved {
        return Ok(false);
    }
    owner.vdir = moved;
    owner.claim(&target)?;
    Ok(true)
}

/// Copies the owner file of the placed directory `from` into `to` (a journal made to replace
/// the one in `from`), durably.
pub fn carry_owner(from: &Path, to: &Path) -> Result<(), PlacementError> {
    match Owner::load(from)? {
        Some(owner) => owner.claim(to),
        None => Err(PlacementError::BadOwner { path: from.join(OWNER_FILE), message: "missing".into() }),
    }
}

/// Checks the absolute path `target` can become a journal's directory, changing nothing: it
/// does not exist (its parent does) or is an empty directory.
pub fn check_new(target: &Path) -> Result<(), PlacementError> {
    if !target.is_absolute() {
        return Err(PlacementError::NotAbsolute(target.to_path_buf()));
    }
    match std::fs::read_dir(target) {
        Ok(mut entries) => match entries.next() {
            None => writable(target, "the new journal"),
            Some(_) => {
                let holder = match Owner::load(target) {
                    Ok(Some(owner)) => format!(" (it holds the journal of {}, uuid {})", owner.describe(), owner.uuid),
                    _ => String::new(),
                };
                Err(PlacementError::NotEmpty { path: target.to_path_buf(), holder })
            }
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => match target.parent() {
            Some(parent) if parent.is_dir() => writable(parent, "the new journal"),
            _ => Err(PlacementError::NoParent { path: target.to_path_buf() }),
        },
        Err(error) if error.kind() == io::ErrorKind::NotADirectory => {
            Err(PlacementError::NotDirectory { path: target.to_path_buf(), owner: "the new journal".into() })
        }
        Err(source) => Err(PlacementError::Io { context: format!("read {}", target.display()), source }),
    }
}

/// Places the journal at `link` in `target` (see [`check_new`]): makes `target` (mode 0700;
/// an existing empty directory is set to 0700), writes the owner file, and makes `link` a
/// symlink to it, each durable. Returns whether `target` was made, for [`unplace`].
pub fn place(link: &Path, target: &Path, owner: &Owner) -> Result<bool, PlacementError> {
    check_new(target)?;
    let made = !target.exists();
    if made {
        std::fs::DirBuilder::new()
            .mode(crate::permissions::DIR_MODE)
            .create(target)
            .map_err(io_error(format!("create journal directory {}", target.display())))?;
    } else {
        // An empty directory given to us (a mount point) holds the disk's writes from now on.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(crate::permissions::DIR_MODE))
            .map_err(io_error(format!("chmod 0700 {}", target.display())))?;
    }
    let result = (|| {
        owner.claim(target)?;
        if let Some(parent) = target.parent() {
            fsutil::sync_dir(parent).map_err(io_error(format!("sync {}", parent.display())))?;
        }
        std::os::unix::fs::symlink(target, link).map_err(io_error(format!("link {} to {}", link.display(), target.display())))?;
        let dir = link.parent().unwrap_or(Path::new("."));
        fsutil::sync_dir(dir).map_err(io_error(format!("sync {}", dir.display())))
    })();
    if result.is_err() {
        unplace(link, target, made);
    }
    result.map(|()| made)
}

/// Undoes [`place`] (and whatever was made in `target` since) for a create that failed:
/// the link goes, and `target` goes if it was made, else is emptied again.
pub fn unplace(link: &Path, target: &Path, made: bool) {
    if std::fs::symlink_metadata(link).is_ok_and(|m| m.is_symlink()) {
        let _ = std::fs::remove_file(link);
    }
    if made {
        let _ = std::fs::remove_dir_all(target);
    } else if let Ok(entries) = std::fs::read_dir(target) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path()).or_else(|_| std::fs::remove_file(entry.path()));
        }
    }
}

/// Finds where the journal at `link` keeps its segments and, when it is placed elsewhere,
/// checks that directory is there, is a directory, is writable (when `write`) and holds
/// `owner`'s journal. Changes nothing. A `link` that is no symlink (or absent) is the
/// default placement, left to the journal's own recovery to judge.
pub fn check(link: &Path, owner: &Owner, write: bool) -> Result<Located, PlacementError> {
    let Some(target) = target_of(link)? else { return Ok(Located { segments: link.to_path_buf(), placed: false }) };
    let who = owner.describe();
    let metadata = match std::fs::metadata(&target) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(PlacementError::Missing { path: target, owner: who }),
        Err(source) => return Err(PlacementError::Io { context: format!("stat journal directory {} of {who}", target.display()), source }),
    };
    if !metadata.is_dir() {
        return Err(PlacementError::NotDirectory { path: target, owner: who });
    }
    if write {
        writable(&target, &who)?;
    }
    match Owner::load(&target)? {
        None => Err(PlacementError::NoOwner { path: target, owner: who }),
        Some(found) if !found.is(owner) => Err(PlacementError::Foreign { path: target, other: found.describe(), uuid: found.uuid, owner: who }),
        Some(_) => Ok(Located { segments: target, placed: true }),
    }
}

/// Like [`check`], but a placed directory that is missing while `<target>.<aside>` exists is
/// a replacement a crash interrupted (the old journal moved aside, the new one not yet in
/// place, see `Located::beside`): returned as located, for the caller to finish it.
pub fn check_or_interrupted(link: &Path, owner: &Owner, aside: &str) -> Result<Located, PlacementError> {
    match check(link, owner, true) {
        Err(PlacementError::Missing { path, owner: who }) => {
            let located = Located { segments: path.clone(), placed: true };
            let moved = located.beside(aside);
            if moved.is_dir() {
                writable(located.parent(), &who)?;
                match Owner::load(&moved)? {
                    Some(found) if !found.is(owner) => Err(PlacementError::Foreign { path: moved, other: found.describe(), uuid: found.uuid, owner: who }),
                    _ => Ok(located),
                }
            } else {
                Err(PlacementError::Missing { path, owner: who })
            }
        }
        other => other,
    }
}

/// Where the segments of the journal at `link` are, resolved to an absolute path (for
/// status), and whether that is another filesystem than `link`'s directory.
pub fn describe(link: &Path) -> (PathBuf, bool) {
    let segments = std::fs::canonicalize(link).unwrap_or_else(|_| std::path::absolute(link).unwrap_or_else(|_| link.to_path_buf()));
    use std::os::unix::fs::MetadataExt;
    let home = link.parent().and_then(|dir| std::fs::metadata(dir).ok());
    let separate = match (home, std::fs::metadata(&segments)) {
        (Some(home), Ok(journal)) => home.dev() != journal.dev(),
        _ => false,
    };
    (segments, separate)
}

/// The target of `link` if it is a symlink (made absolute against its directory).
fn target_of(link: &Path) -> Result<Option<PathBuf>, PlacementError> {
    match std::fs::symlink_metadata(link) {
        Ok(metadata) if metadata.is_symlink() => {
            let target = std::fs::read_link(link).map_err(io_error(format!("read the link {}", link.display())))?;
            Ok(Some(if target.is_absolute() { target } else { link.parent().unwrap_or(Path::new(".")).join(target) }))
        }
        Ok(_) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PlacementError::Io { context: format!("stat {}", link.display()), source }),
    }
}

/// access(2) W_OK: unlike the mode bits, it reports a read-only filesystem for root too.
fn writable(dir: &Path, who: &str) -> Result<(), PlacementError> {
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK).map_err(|errno| PlacementError::NotWritable {
        path: dir.to_path_buf(),
        owner: who.to_string(),
        source: errno.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(dir: &Path) -> Owner {
        Owner::new(Role::Volume, "v", uuid::Uuid::from_u128(7), dir)
    }

    #[test]
    fn a_placed_journal_is_found_through_its_link() {
        let tmp = tempfile::tempdir().unwrap();
        let (vdir, target) = (tmp.path().join("v"), tmp.path().join("elsewhere"));
        std::fs::create_dir(&vdir).unwrap();
        let link = vdir.join("journal");
        assert!(place(&link, &target, &owner(&vdir)).unwrap());
        let located = check(&link, &owner(&vdir), true).unwrap();
        assert_eq!(located, Located { segments: target.clone(), placed: true });
        assert_eq!(located.beside("new"), tmp.path().join("elsewhere.new"));
        // Another spelling of the same directory is the same owner.
        assert!(check(&link, &owner(&vdir.join(".")), true).is_ok());
    }

    /// An applier binds an unbound replica to its source by renaming its directory: the
    /// placed journal follows (and is accepted before its owner file is updated, a crash
    /// between the two); a volume's journal is not accepted for a directory that vanished.
    #[test]
    fn a_replica_directory_that_moved_keeps_its_placed_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new, target) = (tmp.path().join("vol0"), tmp.path().join("src").join("vol0"), tmp.path().join("j"));
        std::fs::create_dir(&old).unwrap();
        let replica = |dir: &Path| Owner::new(Role::Replica, "vol0", uuid::Uuid::from_u128(9), dir);
        place(&old.join("journal"), &target, &replica(&old)).unwrap();
        std::fs::create_dir(new.parent().unwrap()).unwrap();
        std::fs::rename(&old, &new).unwrap();
        assert!(check(&new.join("journal"), &replica(&new), true).is_ok(), "accepted before the owner file follows");
        assert!(follow_move(&new.join("journal"), &new).unwrap());
        assert_eq!(Owner::load(&target).unwrap().unwrap().vdir, new);
        assert!(!follow_move(&new.join("journal"), &new).unwrap(), "nothing more to change");
        // Another replica directory (it exists) is still refused.
        std::fs::create_dir(&old).unwrap();
        assert!(matches!(check(&new.join("journal"), &replica(&old), true), Err(PlacementError::Foreign { .. })));
    }

    #[test]
    fn refusals_name_the_cause() {
        let tmp = tempfile::tempdir().unwrap();
        let (vdir, target) = (tmp.path().join("v"), tmp.path().join("j"));
        std::fs::create_dir(&vdir).unwrap();
        let link = vdir.join("journal");
        assert!(matches!(place(&link, Path::new("rel/j"), &owner(&vdir)), Err(PlacementError::NotAbsolute(_))));
        assert!(matches!(place(&link, &tmp.path().join("no/j"), &owner(&vdir)), Err(PlacementError::NoParent { .. })));
        place(&link, &target, &owner(&vdir)).unwrap();
        // The directory is taken.
        match check_new(&target) {
            Err(PlacementError::NotEmpty { holder, .. }) => assert!(holder.contains("volume v"), "{holder}"),
            other => panic!("{other:?}"),
        }
        let other = Owner::new(Role::Volume, "w", uuid::Uuid::from_u128(8), &vdir);
        match check(&link, &other, true) {
            Err(error @ PlacementError::Foreign { .. }) => assert!(error.to_string().contains("holds the journal of volume v"), "{error}"),
            other => panic!("{other:?}"),
        }
        let replica = Owner { role: Role::Replica, ..owner(&vdir) };
        assert!(matches!(check(&link, &replica, true), Err(PlacementError::Foreign { .. })));
        std::fs::remove_file(target.join(OWNER_FILE)).unwrap();
        assert!(matches!(check(&link, &owner(&vdir), true), Err(PlacementError::NoOwner { .. })));
        std::fs::remove_dir_all(&target).unwrap();
        match check(&link, &owner(&vdir), true) {
            Err(error @ PlacementError::Missing { .. }) => assert!(error.to_string().contains("is its filesystem mounted?"), "{error}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&target, b"").unwrap();
        assert!(matches!(check(&link, &owner(&vdir), true), Err(PlacementError::NotDirectory { .. })));
    }

    #[test]
    fn an_interrupted_replacement_is_told_from_a_missing_filesystem() {
        let tmp = tempfile::tempdir().unwrap();
        let (vdir, target) = (tmp.path().join("v"), tmp.path().join("j"));
        std::fs::create_dir(&vdir).unwrap();
        let link = vdir.join("journal");
        place(&link, &target, &owner(&vdir)).unwrap();
        let located = check(&link, &owner(&vdir), true).unwrap();
        std::fs::rename(&target, located.beside("resetting")).unwrap();
        assert_eq!(check_or_interrupted(&link, &owner(&vdir), "resetting").unwrap(), located);
        std::fs::remove_dir_all(located.beside("resetting")).unwrap();
        assert!(matches!(check_or_interrupted(&link, &owner(&vdir), "resetting"), Err(PlacementError::Missing { .. })));
    }

    #[test]
    fn a_failed_create_is_undone() {
        let tmp = tempfile::tempdir().unwrap();
        let (vdir, target) = (tmp.path().join("v"), tmp.path().join("j"));
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::create_dir(&target).unwrap();
        let link = vdir.join("journal");
        let made = place(&link, &target, &owner(&vdir)).unwrap();
        assert!(!made);
        std::fs::write(target.join("1.seg"), b"x").unwrap();
        unplace(&link, &target, made);
        assert!(!link.exists() && std::fs::read_dir(&target).unwrap().next().is_none());
    }
}
