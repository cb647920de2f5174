//! The volume's configuration file `VDIR/volume.toml`, written by `volume create`, with its
//! optional `[run]` table (what `run` serves when no flag says otherwise). Validated on load;
//! errors name the file and the key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::VolumeError;
use crate::address::{parse_listen_address, NbdAddress};
use crate::journal::{JournalOptions, OnFull, MIN_SEGMENT_SIZE};
use crate::layout::VolumeDir;

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
    /// What `run` serves when started without export flags (e.g. by systemd).
    #[serde(default, skip_serializing_if = "RunConfig::is_default")]
    pub run: RunConfig,
    /// Markers `run` takes by itself (`[markers]`: every, prefix, freeze).
    #[serde(default, skip_serializing_if = "crate::marker::Schedule::is_default")]
    pub markers: crate::marker::Schedule,
    /// How writeback writes the backing store (reads bypass the page cache either way).
    #[serde(default, skip_serializing_if = "BackingWrites::is_default")]
    pub backing_writes: BackingWrites,
}

/// How writeback writes journaled records into the backing store (`backing_writes`). Reads of
/// the backing store use O_DIRECT in both modes (where the file system allows it), so the
/// volume never fills the page cache with the large folios of readahead, which made later
/// 4 KiB buffered writes into them four times slower.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingWrites {
    /// Through the page cache; the kernel writes them out, and checkpoints fdatasync
    /// (the default: the page cache absorbs overwrites and sorts random writes for the disk).
    #[default]
    Buffered,
    /// O_DIRECT, aligned writes submitted in batches through io_uring (QEMU's
    /// `cache=none`): no page cache in between, so no memory used for dirty pages and no
    /// write-out bursts at checkpoints; every write is a disk write.
    Direct,
}

impl BackingWrites {
    fn is_default(&self) -> bool {
        *self == BackingWrites::default()
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            BackingWrites::Buffered => "buffered",
            BackingWrites::Direct => "direct",
        }
    }
}

/// The `[run]` table: defaults for `ublk-mirror run`; command-line flags override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// NBD exports, `unix:PATH` or `tcp:HOST:PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd: Vec<String>,
    /// Serve the volume as /dev/ublkbN.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ublk: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ublk_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u16>,
    /// Directory of the NBD TLS credentials (QEMU's tls-creds-x509 layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tls_creds: Option<PathBuf>,
    /// `require` (the default with creds) or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tls: Option<String>,
    /// Allow a TCP export on a non-loopback address without TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nbd_insecure: bool,
    /// Address of the Prometheus metrics endpoint, HOST:PORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl RunConfig {
    fn is_default(&self) -> bool {
        self == &RunConfig::default()
    }

    /// Checks every key of the `[run]` table; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        for (index, address) in self.nbd.iter().enumerate() {
            address.parse::<NbdAddress>().map_err(|e| format!("run.nbd[{index}]: {e}"))?;
        }
        if let Some(mode) = &self.nbd_tls {
            if mode != "require" && mode != "off" {
                return Err(format!("run.nbd_tls: {mode:?} is not an NBD TLS mode: use require or off"));
            }
        }
        // The ublk frontend's limits (frontend::ublk::MAX_QUEUES, MAX_DEPTH).
        if let Some(queues) = self.queues.filter(|q| !(1..=64).contains(q)) {
            return Err(format!("run.queues: {queues} must be between 1 and 64"));
        }
        if let Some(depth) = self.depth.filter(|d| !(1..=4096).contains(d)) {
            return Err(format!("run.depth: {depth} must be between 1 and 4096"));
        }
        if (self.ublk_id.is_some() || self.queues.is_some() || self.depth.is_some()) && !self.ublk {
            return Err("run.ublk_id, run.queues and run.depth apply to the ublk device: set run.ublk = true as well".into());
        }
        if let Some(metrics) = &self.metrics {
            parse_listen_address(metrics).map_err(|e| format!("run.metrics: {e}"))?;
        }
        Ok(())
    }
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
    /// When mirrors would fill the journal: `track` (they switch to dirty-region tracking,
    /// writes never wait; the default) or `block` (writes wait for them).
    #[serde(default)]
    pub on_full: OnFull,
}

impl VolumeConfig {
    pub fn journal_options(&self) -> JournalOptions {
        JournalOptions { segment_size: self.journal.segment_size, capacity: self.journal.capacity, journal_id: *self.uuid.as_bytes() }
    }

    /// The largest read or write the frontends accept.
    pub fn max_io(&self) -> u64 {
        MAX_IO_SIZE.min(self.journal_options().max_payload() / 2 / 4096 * 4096).max(4096)
    }

    pub fn load(dir: &VolumeDir) -> Result<Self, VolumeError> {
        let path = dir.config();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotAVolume { dir: dir.root().to_path_buf() });
            }
            Err(source) => return Err(VolumeError::Io { context: format!("read {}", path.display()), source }),
        };
        let config: VolumeConfig = toml::from_str(&text).map_err(|error| VolumeError::Config { path: path.clone(), message: error.to_string() })?;
        config.validate().map_err(|message| VolumeError::Config { path, message })?;
        Ok(config)
    }

    pub fn save(&self, dir: &VolumeDir) -> Result<(), VolumeError> {
        let path = dir.config();
        let body = toml::to_string_pretty(self).expect("config serialises");
        let run_example = if self.run.is_default() { RUN_TABLE_EXAMPLE } else { "" };
        let text = format!(
            "# ublk-mirror volume configuration (format {CONFIG_FORMAT}); written by `ublk-mirror volume create`.\n\
             # Sizes are in bytes. Every key is described in docs/configuration.md.\n{body}{run_example}"
        );
        crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|source| VolumeError::Io { context: format!("write {}", path.display()), source })
    }

    /// Checks every field; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != CONFIG_FORMAT {
            return Err(format!("format_version: {} is not supported (this build reads {CONFIG_FORMAT})", self.format_version));
        }
        crate::name::validate(&self.name).map_err(|e| format!("name: {e}"))?;
        if self.size == 0 || !self.size.is_multiple_of(LOGICAL_BLOCK_SIZE) {
            return Err(format!("size: {} must be a positive multiple of {LOGICAL_BLOCK_SIZE} bytes", self.size));
        }
        if self.journal.segment_size < MIN_SEGMENT_SIZE || !self.journal.segment_size.is_multiple_of(4096) {
            return Err(format!("journal.segment_size: {} must be a multiple of 4096 and at least {MIN_SEGMENT_SIZE}", self.journal.segment_size));
        }
        if self.journal.capacity / self.journal.segment_size < 2 {
            return Err(format!("journal.capacity: {} must hold at least two segments of {} bytes", self.journal.capacity, self.journal.segment_size));
        }
        if self.journal.pending_window < self.max_io() || self.journal.pending_window > self.journal.capacity / 2 {
            return Err(format!(
                "journal.pending_window: {} must be between the largest I/O ({}) and half the journal capacity ({})",
                self.journal.pending_window,
                self.max_io(),
                self.journal.capacity / 2
            ));
        }
        self.run.validate()?;
        self.markers.validate("markers")
    }
}

/// Appended to a new volume.toml: the `[run]` keys, commented out, so the file documents them.
const RUN_TABLE_EXAMPLE: &str = "
# What `ublk-mirror run --dir DIR` serves when no --nbd/--ublk flag is given (systemd's
# ublk-mirror@NAME.service runs it that way). Flags given on the command line replace these.
# [run]
# nbd = [\"unix:/run/ublk-mirror/NAME.sock\"]   # NBD exports: unix:PATH or tcp:HOST:PORT
# ublk = true                                  # serve /dev/ublkbN
# ublk_id = 0                                  # N of /dev/ublkbN (default: lowest free)
# queues = 1                                   # ublk hardware queues (1..64)
# depth = 128                                  # requests in flight per queue (1..4096)
# metrics = \"127.0.0.1:9420\"                 # Prometheus text format at http://ADDR/metrics

# Markers `run` appends by itself (see docs/markers.md).
# [markers]
# every = \"15m\"                               # interval (at least 10s)
# prefix = \"auto\"                             # names are PREFIX-YYYYMMDDTHHMMSSZ
# freeze = [\"/srv/data\"]                      # mounted filesystems frozen around each marker
";
