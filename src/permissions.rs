//! Who may read what on disk: the one place that owns the modes of the directories and files
//! ublk-mirror keeps (docs/security.md). A volume's data, journal and state are the disk's
//! contents, so every directory is private to its owner (0700) and every file too (0600);
//! a directory found looser (made before this rule, or by hand) is tightened when the
//! process serving it opens it, and each change is logged.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories: the owner only.
pub const DIR_MODE: u32 = 0o700;
/// Files (data, journal segments, state, dirty maps, snapshot stores, keys) and sockets.
pub const FILE_MODE: u32 = 0o600;
/// The bits that let anyone but the owner in.
const OTHERS: u32 = 0o077;

#[derive(Debug, thiserror::Error)]
pub enum PermissionsError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The directory lets other users in and could not be tightened (not ours, read-only).
    #[error(
        "{path} is accessible by other users (mode {mode:04o}) and could not be made private ({source}): its files are the disk's contents; fix it with `chown \"$(id -u)\" {path} && chmod 0700 {path}` as its owner or root, then start again"
    )]
    Exposed { path: String, mode: u32, source: io::Error },
}

/// Creates `path` and its missing parents with mode 0700 (an existing directory keeps its
/// mode: [`tighten_tree`] handles those).
pub fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)
}

/// Options that create a file 0600 (an existing file keeps its mode).
pub fn private_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Sets `path` (a file or a socket just made) to 0600.
pub fn make_private(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
}

/// One mode change [`tighten_tree`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    pub path: PathBuf,
    pub old: u32,
    pub new: u32,
}

/// Takes the group and other bits off `root` (a directory), then off every directory,
/// regular file and socket below it, logging each change; symbolic links are not followed
/// (a placed journal's directory is tightened as a tree of its own) and device nodes keep
/// their modes. Refuses ([`PermissionsError::Exposed`]) when `root` itself stays open to
/// others; below a private root a file that cannot be changed is only logged, since nobody
/// else can reach it.
pub fn tighten_tree(root: &Path) -> Result<Vec<Tightened>, PermissionsError> {
    let mut changed = Vec::new();
    let meta = std::fs::symlink_metadata(root).map_err(|source| PermissionsError::Io { context: format!("inspect {}", root.display()), source })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OTHERS != 0 {
        let new = mode & !OTHERS;
        match std::fs::set_permissions(root, std::fs::Permissions::from_mode(new)) {
            Ok(()) => changed.push(logged(root, mode, new)),
            Err(source) => return Err(PermissionsError::Exposed { path: root.display().to_string(), mode, source }),
        }
    }
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(path = %dir.display(), %error, "cannot list directory to check its permissions");
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            let kind = meta.file_type();
            if kind.is_dir() {
                pending.push(path.clone());
            } else if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_socket(&kind) {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & OTHERS == 0 {
                continue;
            }
            let new = mode & !OTHERS;
            match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(new)) {
                Ok(()) => changed.push(logged(&path, mode, new)),
                Err(error) => tracing::warn!(path = %path.display(), mode = %format!("{mode:04o}"), %error, "cannot tighten permissions"),
            }
        }
    }
    Ok(changed)
}

fn logged(path: &Path, old: u32, new: u32) -> Tightened {
    tracing::warn!(path = %path.display(), old = %format!("{old:04o}"), new = %format!("{new:04o}"), "tightened permissions: other users could read it");
    Tightened { path: path.to_path_buf(), old, new }
}

/// Mode bits of `path` (without the file type), for checks and reports.
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn made_directories_are_private_at_every_level() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        for dir in [tmp.path().join("a"), tmp.path().join("a/b"), deep] {
            assert_eq!(mode_of(&dir).unwrap(), DIR_MODE, "{}", dir.display());
        }
    }

    #[test]
    fn files_made_by_the_crate_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state.json");
        // A temporary file a crash left behind, made under a looser rule.
        std::fs::write(state.with_extension("tmp"), b"old").unwrap();
        chmod(&state.with_extension("tmp"), 0o644);
        crate::fsutil::write_atomic(&state, b"{}").unwrap();
        let segment = tmp.path().join("1.seg");
        crate::fsutil::create_zero_filled(&segment, 4096).unwrap();
        let lock = tmp.path().join("lock");
        let _held = crate::layout::DirLock::acquire(&lock).unwrap();
        for path in [state, segment, lock] {
            assert_eq!(mode_of(&path).unwrap(), FILE_MODE, "{}", path.display());
        }
    }

    #[test]
    fn a_root_that_cannot_be_tightened_is_refused_with_the_fix() {
        // procfs refuses every chmod, even root's: a stand-in for a directory of another
        // user or on a read-only filesystem.
        let root = PathBuf::from(format!("/proc/{}", std::process::id()));
        match tighten_tree(&root) {
            Err(error @ PermissionsError::Exposed { .. }) => {
                let message = error.to_string();
                assert!(message.contains("mode 0555") && message.contains(&format!("chmod 0700 {}", root.display())), "{message}");
            }
            other => panic!("expected Exposed, got {other:?}"),
        }
    }

    #[test]
    fn a_loose_tree_is_tightened_and_every_change_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        std::fs::create_dir_all(root.join("journal")).unwrap();
        std::fs::write(root.join("data.img"), b"disk").unwrap();
        std::fs::write(root.join("journal/1.seg"), b"records").unwrap();
        std::fs::write(root.join("state.json"), b"{}").unwrap();
        chmod(&root, 0o755);
        chmod(&root.join("journal"), 0o775);
        chmod(&root.join("data.img"), 0o644);
        chmod(&root.join("journal/1.seg"), 0o666);
        chmod(&root.join("state.json"), 0o600);
        // A link's target is not ours to change through the link.
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        chmod(&outside, 0o644);
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();

        let mut changed = tighten_tree(&root).unwrap();
        changed.sort_by(|a, b| a.path.cmp(&b.path));
        let summary: Vec<(String, u32, u32)> = changed.iter().map(|t| (t.path.strip_prefix(&root).unwrap().display().to_string(), t.old, t.new)).collect();
        assert_eq!(
            summary,
            [("".into(), 0o755, 0o700), ("data.img".into(), 0o644, 0o600), ("journal".into(), 0o775, 0o700), ("journal/1.seg".into(), 0o666, 0o600)]
        );
        assert_eq!(mode_of(&outside).unwrap(), 0o644);
        assert_eq!(mode_of(&root.join("state.json")).unwrap(), 0o600);
        assert!(tighten_tree(&root).unwrap().is_empty(), "a private tree needs no change");
    }
}
