//! `ublk-mirror install-units` / `uninstall-units`: put the binary, the systemd units, the
//! udev rules, the module-load snippet and the default environment file in the standard
//! paths (under `--root` for a staged install, like DESTDIR), and take them away again.
//! The files are compiled into the binary, so an installed binary can always reinstall them.

use std::path::{Path, PathBuf};

const VOLUME_UNIT: &str = include_str!("../systemd/ublk-mirror@.service");
const APPLIER_UNIT: &str = include_str!("../systemd/ublk-mirror-applier.service");
const DEFAULT_ENVIRONMENT: &str = include_str!("../systemd/ublk-mirror.default");
const UDEV_RULES: &str = include_str!("../ublk/udev/90-ublk-mirror.rules");
const MODULES_LOAD: &str = include_str!("../ublk/modules-load.d/ublk-mirror.conf");
const CONFIGURATION_DOC: &str = include_str!("../docs/configuration.md");

/// Where the units expect the binary (they name it literally in ExecStart).
pub const BINARY_PATH: &str = "usr/local/bin/ublk-mirror";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// One file an install puts in place.
struct Item {
    /// Relative to the root.
    path: &'static str,
    contents: &'static str,
    mode: u32,
    /// Configuration an administrator may have edited: installed only when absent, removed
    /// only when unchanged.
    config: bool,
}

const ITEMS: &[Item] = &[
    Item { path: "etc/systemd/system/ublk-mirror@.service", contents: VOLUME_UNIT, mode: 0o644, config: false },
    Item { path: "etc/systemd/system/ublk-mirror-applier.service", contents: APPLIER_UNIT, mode: 0o644, config: false },
    Item { path: "etc/udev/rules.d/90-ublk-mirror.rules", contents: UDEV_RULES, mode: 0o644, config: false },
    Item { path: "etc/modules-load.d/ublk-mirror.conf", contents: MODULES_LOAD, mode: 0o644, config: false },
    Item { path: "usr/local/share/doc/ublk-mirror/configuration.md", contents: CONFIGURATION_DOC, mode: 0o644, config: false },
    Item { path: "etc/default/ublk-mirror", contents: DEFAULT_ENVIRONMENT, mode: 0o644, config: true },
];

/// State directories made by an install and never removed by an uninstall.
const STATE_DIRS: &[&str] = &["var/lib/ublk-mirror", "var/lib/ublk-mirror-applier"];

fn io(context: String) -> impl FnOnce(std::io::Error) -> InstallError {
    move |source| InstallError::Io { context, source }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        create_public_dirs(parent)?;
    }
    crate::fsutil::write_atomic(path, contents).map_err(io(format!("write {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", path.display())))
}

/// Creates `dir` and its missing parents 0755 whatever the umask (the binary runs under 0077):
/// systemd, udev and users read what is installed there.
fn create_public_dirs(dir: &Path) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_public_dirs(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io(format!("chmod {}", dir.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(io(format!("create {}", dir.display()))(error)),
    }
}

/// Installs under `root` ("/" for the running system); returns one line per action.
pub fn install(root: &Path, binary: &Path) -> Result<Vec<String>, InstallError> {
    let mut done = Vec::new();
    let target = root.join(BINARY_PATH);
    let same_file = std::fs::canonicalize(binary).ok().zip(std::fs::canonicalize(&target).ok()).is_some_and(|(a, b)| a == b);
    if !same_file {
        let bytes = std::fs::read(binary).map_err(io(format!("read {}", binary.display())))?;
        write_file(&target, &bytes, 0o755)?;
        done.push(format!("installed {}", target.display()));
    }
    for item in ITEMS {
        let path = root.join(item.path);
        if item.config && path.exists() {
            done.push(format!("kept {} (already there)", path.display()));
            continue;
        }
        write_file(&path, item.contents.as_bytes(), item.mode)?;
        done.push(format!("installed {}", path.display()));
    }
    for dir in STATE_DIRS {
        use std::os::unix::fs::DirBuilderExt;
        let path = root.join(dir);
        if !path.exists() {
            if let Some(parent) = path.parent() {
                create_public_dirs(parent)?;
            }
            std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(io(format!("create {}", path.display())))?;
            done.push(format!("created {}", path.display()));
        }
    }
    Ok(done)
}

/// Removes what [`install`] put under `root`, except state directories and an edited
/// default environment file.
pub fn uninstall(root: &Path) -> Result<Vec<String>, InstallError> {
    let mut done = Vec::new();
    let mut remove = |path: PathBuf| -> Result<(), InstallError> {
        match std::fs::remove_file(&path) {
            Ok(()) => done.push(format!("removed {}", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(format!("remove {}", path.display()))(error)),
        }
        Ok(())
    };
    for item in ITEMS {
        let path = root.join(item.path);
        if item.config && std::fs::read_to_string(&path).is_ok_and(|text| text != item.contents) {
            continue;
        }
        remove(path)?;
    }
    remove(root.join(BINARY_PATH))?;
    for item in ITEMS.iter().filter(|item| item.config) {
        let path = root.join(item.path);
        if path.exists() {
            done.push(format!("kept {} (edited)", path.display()));
        }
    }
    for dir in STATE_DIRS {
        if root.join(dir).exists() {
            done.push(format!("kept {} (state: volumes, journals, replicas)", root.join(dir).display()));
        }
    }
    Ok(done)
}

/// Tells a running systemd and udev about changed files (only for the live root).
pub fn reload_managers() -> Vec<String> {
    let mut done = Vec::new();
    if Path::new("/run/systemd/system").exists() {
        let ok = std::process::Command::new("systemctl").arg("daemon-reload").status().is_ok_and(|s| s.success());
        done.push(format!("systemctl daemon-reload: {}", if ok { "done" } else { "FAILED" }));
    }
    if Path::new("/run/udev/control").exists() {
        let ok = std::process::Command::new("udevadm").args(["control", "--reload"]).status().is_ok_and(|s| s.success());
        done.push(format!("udevadm control --reload: {}", if ok { "done" } else { "FAILED" }));
    }
    done
}
