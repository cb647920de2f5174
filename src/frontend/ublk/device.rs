//! ublk devices as the kernel sees them: what `--recover` may re-attach to (checked before
//! anything is sent to the kernel), the record a server leaves in the volume directory, and
//! the administrator's `ublk list` / `ublk delete`.

use std::path::{Path, PathBuf};

use libublk::ctrl::UblkCtrl;
use libublk::sys;
use serde::{Deserialize, Serialize};

use super::FrontendError;
use crate::volume::Volume;

pub const CONTROL_DEVICE: &str = "/dev/ublk-control";
/// Hardware queues a device may have (each one a thread and an io_uring).
pub const MAX_QUEUES: u16 = 64;
/// Requests in flight per queue at most.
pub const MAX_DEPTH: u16 = 4096;

/// The device a server is attached to, as recorded in the volume directory
/// (`ublk-device.json`): what `--recover` re-attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: u32,
    pub device: String,
    pub queues: u16,
    pub depth: u16,
    /// The server's pid; the kernel keeps it as the device's server until one re-attaches,
    /// which tells this device apart from a later one that got the same id.
    pub pid: u32,
    /// The volume the device serves (absent in records written before it was added).
    #[serde(default)]
    pub volume_uuid: Option<uuid::Uuid>,
}

impl DeviceRecord {
    pub fn load(path: &Path) -> Option<DeviceRecord> {
        std::fs::read(path).ok().and_then(|text| serde_json::from_slice(&text).ok())
    }
}

/// A device's state in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// A server serves it.
    Live,
    /// Its server is gone: the kernel holds every request until a server re-attaches
    /// (`run --recover`) or the device is deleted.
    Quiesced,
    /// Its server is gone and requests fail with EIO until one re-attaches.
    FailIo,
    /// Stopped (being deleted).
    Dead,
}

impl DeviceState {
    fn from_kernel(state: u16) -> DeviceState {
        match state as u32 {
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Dead,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Live => "live",
            DeviceState::Quiesced => "quiesced",
            DeviceState::FailIo => "fail-io",
            DeviceState::Dead => "dead",
        }
    }
}

/// What the kernel knows about one device (`ublk list`).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub id: u32,
    pub device: String,
    pub state: DeviceState,
    pub queues: u16,
    pub depth: u16,
    pub max_io_buf_bytes: u32,
    pub size: u64,
    /// The pid of the server that attached last (it may be gone).
    pub server_pid: i32,
    /// That process still exists.
    pub server_alive: bool,
    pub user_recovery: bool,
    #[serde(skip)]
    pub flags: u64,
}

pub fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn driver(context: &str) -> impl FnOnce(libublk::UblkError) -> FrontendError + '_ {
    move |error| FrontendError::Driver { context: context.to_string(), message: error.to_string() }
}

/// Reads a device's info and parameters from the kernel.
pub fn inspect(id: u32) -> Result<DeviceInfo, FrontendError> {
    if !device_exists(id) {
        return Err(FrontendError::NoSuchDevice(id));
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(driver("open device"))?;
    let info = ctrl.dev_info();
    let mut params = sys::ublk_params::default();
    let size = match ctrl.get_params(&mut params) {
        Ok(_) => params.basic.dev_sectors << 9,
        Err(_) => 0,
    };
    Ok(DeviceInfo {
        id,
        device: ctrl.get_bdev_path(),
        state: DeviceState::from_kernel(info.state),
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        max_io_buf_bytes: info.max_io_buf_bytes,
        size,
        server_pid: info.ublksrv_pid,
        server_alive: process_alive(info.ublksrv_pid),
        user_recovery: info.flags & sys::UBLK_F_USER_RECOVERY as u64 != 0,
        flags: info.flags,
    })
}

/// Every ublk device of this host.
pub fn list() -> Result<Vec<DeviceInfo>, FrontendError> {
    let mut ids: Vec<u32> = match std::fs::read_dir("/sys/class/ublk-char") {
        Ok(entries) => entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok()).collect(),
        Err(_) if !Path::new(CONTROL_DEVICE).exists() => return Err(FrontendError::NoControlDevice),
        Err(_) => Vec::new(),
    };
    ids.sort_unstable();
    ids.into_iter().map(inspect).collect()
}

/// What a server that cannot re-attach tells the administrator about the device: its state
/// and the ways out.
pub fn guidance(id: u32, dir: &Path) -> String {
    let retry = format!("retry `ublk-mirror run --dir {} --ublk --recover`", dir.display());
    let delete = format!("`ublk-mirror ublk delete --id {id}` gives the device up: I/O waiting for it fails with EIO (unmount its filesystem afterwards)");
    match inspect(id) {
        Ok(info) if info.state == DeviceState::Quiesced => {
            format!("ublk device {id} is quiesced: I/O to {} waits (a mounted filesystem hangs) until a server re-attaches; {retry}, or {delete}", info.device)
        }
        Ok(info) if info.state == DeviceState::Live => {
            format!("ublk device {id} is live, served by pid {}{}", info.server_pid, if info.server_alive { "" } else { " (gone)" })
        }
        Ok(info) => format!("ublk device {id} is {}; {delete}", info.state.as_str()),
        Err(_) => format!("ublk device {id} no longer exists"),
    }
}

/// The device `run --recover` re-attaches to, checked before the kernel is asked to begin a
/// recovery (once begun, a recovery that fails can leave the device refusing another):
/// the volume's record names it, it is the same device (the kernel still names the recorded
/// server), its server is gone, it supports user recovery, it has the volume's size, and
/// `--ublk-id`, `--queues` and `--depth`, where given, agree with it.
pub fn recoverable(volume: &Volume, id: Option<u32>, queues: Option<u16>, depth: Option<u16>) -> Result<DeviceInfo, FrontendError> {
    let record_path = volume.dir().ublk_device();
    let nothing = |why: String| FrontendError::NothingToRecover(why);
    let record = match DeviceRecord::load(&record_path) {
        Some(record) => record,
        None if record_path.exists() => {
            return Err(nothing(format!(
                "{} is unreadable; if a ublk device of this volume is left, give it up with `ublk-mirror ublk delete --id N`",
                record_path.display()
            )))
        }
        None => {
            return Err(nothing(format!(
                "{} does not exist (no device was left behind by a killed server of this volume){}",
                record_path.display(),
                id.map(|id| format!("; device {id} is not this volume's")).unwrap_or_default()
            )))
        }
    };
    if let Some(id) = id.filter(|&id| id != record.id) {
        return Err(FrontendError::Invalid(format!("--ublk-id {id}: this volume's server left device {} ({}), not {id}", record.id, record_path.display())));
    }
    if record.volume_uuid.is_some_and(|uuid| uuid != volume.config().uuid) {
        return Err(nothing(format!("{} belongs to another volume (a copied directory?)", record_path.display())));
    }
    let info = match inspect(record.id) {
        Ok(info) => info,
        Err(FrontendError::NoSuchDevice(id)) => {
            return Err(nothing(format!("ublk device {id} recorded in {} does not exist (a reboot?)", record_path.display())))
        }
        Err(error) => return Err(error),
    };
    if info.server_pid != record.pid as i32 {
        return Err(nothing(format!(
            "ublk device {} was last served by pid {}, not by this volume's server (pid {} in {}): it is another device that got the same id",
            info.id,
            info.server_pid,
            record.pid,
            record_path.display()
        )));
    }
    match info.state {
        DeviceState::Quiesced | DeviceState::FailIo => {}
        DeviceState::Live if info.server_alive => {
            return Err(FrontendError::Invalid(format!("ublk device {} is live: pid {} still serves it; stop that server first", info.id, info.server_pid)))
        }
        state => return Err(nothing(format!("ublk device {} is {} and cannot be re-attached", info.id, state.as_str()))),
    }
    if !info.user_recovery {
        return Err(nothing(format!("ublk device {} was created without user recovery", info.id)));
    }
    if info.size != volume.size() {
        return Err(FrontendError::Invalid(format!("ublk device {} is {} bytes but the volume is {} bytes", info.id, info.size, volume.size())));
    }
    if let Some(queues) = queues.filter(|&q| q != info.queues) {
        return Err(FrontendError::Invalid(format!(
            "--queues {queues} contradicts ublk device {}, which has {} queues: a recovery keeps the device's queues; omit --queues",
            info.id, info.queues
        )));
    }
    if let Some(depth) = depth.filter(|&d| d != info.depth) {
        return Err(FrontendError::Invalid(format!(
            "--depth {depth} contradicts ublk device {}, whose queues are {} deep: a recovery keeps the device's depth; omit --depth",
            info.id, info.depth
        )));
    }
    if info.queues == 0 || info.queues > MAX_QUEUES || info.depth == 0 || info.depth > MAX_DEPTH {
        return Err(FrontendError::Invalid(format!(
            "ublk device {} has {} queues of depth {}, more than this server supports",
            info.id, info.queues, info.depth
        )));
    }
    Ok(info)
}

/// A device left by a killed server still holds the volume's queued I/O (and maybe a mounted
/// filesystem): creating a second device beside it would split the volume's users, so the
/// administrator is sent to `--recover`. A record whose device is gone (a reboot) is stale.
pub fn refuse_abandoned(record_path: &Path) -> Result<(), FrontendError> {
    match DeviceRecord::load(record_path) {
        Some(record) if inspect(record.id).is_ok_and(|info| info.server_pid == record.pid as i32) => {
            Err(FrontendError::Abandoned { id: record.id, pid: record.pid, record: record_path.to_path_buf() })
        }
        _ => {
            let _ = std::fs::remove_file(record_path);
            Ok(())
        }
    }
}

/// `ublk delete`: stops and deletes device `id`. The kernel fails every request that waited
/// for a server (and every later one) with EIO; a mounted filesystem sees errors and can be
/// unmounted. A device whose server still runs is refused unless `force`.
pub fn delete(id: u32, force: bool) -> Result<DeviceInfo, FrontendError> {
    let info = inspect(id)?;
    if info.state == DeviceState::Live && info.server_alive && !force {
        return Err(FrontendError::Invalid(format!(
            "ublk device {id} is served by pid {}: stop that server (SIGTERM drains and removes the device) or give --force",
            info.server_pid
        )));
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(driver("open device"))?;
    // STOP first: it fails the held requests. The synchronous DELETE would then wait for the
    // last opener (a mounted filesystem) to let go; the asynchronous one does not.
    ctrl.kill_dev().map_err(driver("stop device"))?;
    ctrl.del_dev_async().map_err(driver("delete device"))?;
    Ok(info)
}

/// Removes `VDIR/ublk-device.json` if it names device `id`.
pub fn forget(record_path: &PathBuf, id: u32) {
    if DeviceRecord::load(record_path).is_some_and(|record| record.id == id) {
        let _ = std::fs::remove_file(record_path);
    }
}
