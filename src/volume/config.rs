//! The volume's configuration file `VDIR/volume.toml` (written by `volume create`) and its
//! state file `VDIR/state.json` (replaced atomically at every checkpoint).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VolumeError;
use crate::journal::{JournalOptions, MIN_SEGMENT_SIZE};

pub const CONFIG_FILE: &str = "volume.toml";
pub const STATE_FILE: &str = "state.json";
pub const JOURNAL_DIR: &str = "journal";
pub const IDENTITY_DIR: &str = "identity";
pub const LOCK_FILE: &str = "lock";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const DEFAULT_BACKING: &str = "data.img";
pub const CONFIG_FORMAT: u32 = 1;
/// Every volume size and I/O is in multiples of this for block frontends.
pub const LOGICAL_BLOCK_SIZE: u64 = 512;
/// Largest single read or write a frontend is told it may send.
pub const MAX_IO_SIZE: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format_version: u32,
    pub name: String,
    pub uuid: uuid::Uuid,
    /// Device size in bytes.
    pub size: u64,
    /// The backing file or block device holding the volume's data.
    pub backing: PathBuf,
    pub journal: JournalConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Upper bound on the journal's disk use, in bytes.
    pub capacity: u64,
    pub segment_size: u64,
    /// Journaled bytes not yet applied to the backing store that the volume keeps in memory;
    /// new writes wait past it.
    pub pending_window: u64,
}

impl VolumeConfig {
    pub fn journal_options(&self) -> JournalOptions {
        JournalOptions { segment_size: self.journal.segment_size, capacity: self.journal.capacity, journal_id: *self.uuid.as_bytes() }
    }

    /// The largest read or write the frontends accept.
    pub fn max_io(&self) -> u64 {
        MAX_IO_SIZE.min(self.journal_options().max_payload() / 2 / 4096 * 4096).max(4096)
    }

    pub fn load(dir: &Path) -> Result<Self, VolumeError> {
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotAVolume { dir: dir.to_path_buf() });
            }
            Err(source) => return Err(VolumeError::Io { context: format!("read {}", path.display()), source }),
        };
        let config: VolumeConfig = toml::from_str(&text).map_err(|error| VolumeError::Config { path: path.clone(), message: error.to_string() })?;
        config.validate().map_err(|message| VolumeError::Config { path, message })?;
        Ok(config)
    }

    pub fn save(&self, dir: &Path) -> Result<(), VolumeError> {
        let path = dir.join(CONFIG_FILE);
        let body = toml::to_string_pretty(self).expect("config serialises");
        let text = format!(
            "# ublk-mirror volume configuration (format {CONFIG_FORMAT}); written by `ublk-mirror volume create`.\n\
             # Sizes are in bytes. See docs/configuration.md.\n{body}"
        );
        crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|source| VolumeError::Io { context: format!("write {}", path.display()), source })
    }

    /// Checks every field; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != CONFIG_FORMAT {
            return Err(format!("format_version: {} is not supported (this build reads {CONFIG_FORMAT})", self.format_version));
        }
        validate_name(&self.name).map_err(|e| format!("name: {e}"))?;
        if self.size == 0 || self.size % LOGICAL_BLOCK_SIZE != 0 {
            return Err(format!("size: {} must be a positive multiple of {LOGICAL_BLOCK_SIZE} bytes", self.size));
        }
        if self.journal.segment_size < MIN_SEGMENT_SIZE || self.journal.segment_size % 4096 != 0 {
            return Err(format!("journal.segment_size: {} must be a multiple of 4096 and at least {MIN_SEGMENT_SIZE}", self.journal.segment_size));
        }
        if self.journal.capacity / self.journal.segment_size < 2 {
            return Err(format!(
                "journal.capacity: {} must hold at least two segments of {} bytes",
                self.journal.capacity, self.journal.segment_size
            ));
        }
        if self.journal.pending_window < self.max_io() || self.journal.pending_window > self.journal.capacity / 2 {
            return Err(format!(
                "journal.pending_window: {} must be between the largest I/O ({}) and half the journal capacity ({})",
                self.journal.pending_window,
                self.max_io(),
                self.journal.capacity / 2
            ));
        }
        Ok(())
    }
}

pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must be 1 to 64 characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || name.starts_with('.') {
        return Err(format!("{name:?} may hold only letters, digits, '.', '_' and '-' and must not start with '.'"));
    }
    Ok(())
}

/// What survives restarts besides the journal: how far the backing store is known durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    pub format_version: u32,
    /// Every record up to this LSN is durable in the backing store.
    pub applied_lsn: u64,
    /// Identity of this volume's write history (new on promote or divergence).
    pub generation: uuid::Uuid,
    /// True when the last `run` stopped cleanly (drained, flushed, checkpointed).
    pub clean_shutdown: bool,
}

impl VolumeState {
    pub fn load(dir: &Path) -> Result<Self, VolumeError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| VolumeError::Io { context: format!("read {}", path.display()), source })?;
        serde_json::from_str(&text).map_err(|error| VolumeError::Config { path, message: error.to_string() })
    }

    pub fn save(&self, dir: &Path) -> Result<(), VolumeError> {
        let path = dir.join(STATE_FILE);
        let text = serde_json::to_vec_pretty(self).expect("state serialises");
        crate::fsutil::write_atomic(&path, &text).map_err(|source| VolumeError::Io { context: format!("write {}", path.display()), source })
    }
}
