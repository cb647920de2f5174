//! Freezing mounted filesystems around a marker (the `fsfreeze` ioctls FIFREEZE/FITHAW), so
//! the marker is application-consistent: the filesystem writes out its dirty data and
//! journal, blocks new changes until thawed, and its image at the marker needs no recovery.
//!
//! [`Frozen`] thaws in `Drop`, so every return path thaws; callers also block the termination
//! signals while frozen ([`TerminationDeferred`]) so a signal cannot end the process between
//! freeze and thaw (the signal takes effect right after the thaw).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("freeze {path}: {reason}")]
    Freeze { path: PathBuf, reason: String },
}

/// Filesystems frozen, in order; thawed in reverse order when dropped.
#[derive(Debug, Default)]
pub struct Frozen {
    filesystems: Vec<(PathBuf, File)>,
}

impl Frozen {
    /// Freezes each mount point in turn; on an error the ones frozen so far are thawed.
    pub fn freeze(mount_points: &[PathBuf]) -> Result<Frozen, FreezeError> {
        let mut frozen = Frozen::default();
        for path in mount_points {
            let file = File::open(path).map_err(|source| FreezeError::Open { path: path.clone(), source })?;
            ioctl(&file, FIFREEZE).map_err(|error| FreezeError::Freeze {
                path: path.clone(),
                reason: match error.raw_os_error() {
                    Some(libc::EBUSY) => "it is already frozen".into(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => {
                        format!("the filesystem cannot be frozen ({error}); is it a mount point?")
                    }
                    Some(libc::EPERM) => "freezing needs CAP_SYS_ADMIN (run as root)".into(),
                    _ => error.to_string(),
                },
            })?;
            tracing::info!(path = %path.display(), "filesystem frozen");
            frozen.filesystems.push((path.clone(), file));
        }
        Ok(frozen)
    }

    pub fn thaw(mut self) {
        self.thaw_all();
    }

    fn thaw_all(&mut self) {
        while let Some((path, file)) = self.filesystems.pop() {
            match ioctl(&file, FITHAW) {
                Ok(()) => tracing::info!(path = %path.display(), "filesystem thawed"),
                Err(error) => tracing::error!(path = %path.display(), %error, "thawing failed: run `fsfreeze --unfreeze` on it"),
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw_all();
    }
}

fn ioctl(file: &File, request: libc::c_ulong) -> io::Result<()> {
    let mut argument: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take a pointer to an int they do not keep; the descriptor
    // is open for the call's duration.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut argument) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT held back on this thread (and threads it starts) while
/// the value lives; one that arrived meanwhile is delivered when it is dropped.
pub struct TerminationDeferred {
    previous: libc::sigset_t,
}

impl TerminationDeferred {
    pub fn new() -> TerminationDeferred {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
        // pthread_sigmask only reads `set` and writes `previous`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
            TerminationDeferred { previous }
        }
    }
}

impl Default for TerminationDeferred {
    fn default() -> Self {
        TerminationDeferred::new()
    }
}

impl Drop for TerminationDeferred {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}

/// True if `path` is the root of a mounted filesystem (freezing anything else freezes the
/// filesystem around it, which a user rarely means).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Some(parent)) = (std::fs::metadata(path), path.parent()) else { return false };
    let Ok(parent_meta) = std::fs::metadata(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) else { return false };
    meta.dev() != parent_meta.dev() || meta.ino() == parent_meta.ino()
}
