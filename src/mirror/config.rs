//! A mirror's configuration file `VDIR/mirrors/NAME.toml` (where to, which applier
//! certificate, rate, timeouts), written by `mirror add` and `mirror set`, validated on load
//! with errors that name the file and the key.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::checkpoints::{self, Checkpoints};
use super::coalesce::Coalesce;
use super::MirrorError;
use crate::layout::VolumeDir;
use crate::protocol::compression::Compression;
use crate::protocol::transport::{Congestion, DEFAULT_IDLE_TIMEOUT_SECONDS};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub name: String,
    /// HOST:PORT of the applier.
    pub address: String,
    /// Pinned certificate fingerprint of the applier.
    pub fingerprint: String,
    /// Most bytes per second this mirror sends (journal records and sync chunks); absent:
    /// unlimited. In the file a number of bytes or a size such as "50M" (powers of 1024).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::size::serde_optional_size")]
    pub max_rate: Option<u64>,
    /// Seconds without any packet from the applier after which the connection is declared
    /// dead and re-established (keep-alives are sent at a third of it). Default 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    /// Congestion control of this mirror's connection: "bbr" (default) or "cubic".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congestion: Option<Congestion>,
    /// Interval of the online verifies the running volume starts by itself (e.g. "7d");
    /// absent: none. At least a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_every: Option<String>,
    /// Compression of record batches on the wire: "off", "zstd:LEVEL" or "auto" (the
    /// default: compress only while the link is the bottleneck). Parsed, so a bad value is
    /// an error naming this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Coalescing of a backlog (docs/coalescing.md): "off", "on" or "auto" (the default:
    /// while the mirror is 64 MiB or more behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<Coalesce>,
}

impl MirrorConfig {
    /// The coalescing setting in force (absent: `auto`).
    pub fn coalesce(&self) -> Coalesce {
        self.coalesce.unwrap_or_default()
    }

    /// The compression setting in force (absent: `auto`).
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or_default()
    }

    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS))
    }

    /// Checks every key; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        crate::name::validate(&self.name).map_err(|e| format!("name: {e}"))?;
        crate::identity::parse_fingerprint(&self.fingerprint).map_err(|e| format!("fingerprint: {e}"))?;
        crate::address::check_host_port(&self.address).map_err(|e| format!("address: {e}"))?;
        if self.max_rate == Some(0) {
            return Err("max_rate: 0 is not a rate; leave the key out for no limit".into());
        }
        if let Some(rate) = self.max_rate.filter(|&r| r < MIN_RATE) {
            return Err(format!("max_rate: {rate} bytes/s is below the smallest limit, {MIN_RATE} (64K)"));
        }
        if let Some(seconds) = self.idle_timeout.filter(|s| !(1..=600).contains(s)) {
            return Err(format!("idle_timeout: {seconds} must be between 1 and 600 seconds"));
        }
        if let Some(every) = &self.verify_every {
            let interval = humantime::parse_duration(every).map_err(|e| format!("verify_every: {every:?}: {e} (e.g. \"12h\", \"7d\")"))?;
            if interval < MIN_VERIFY_INTERVAL {
                return Err(format!("verify_every: {every:?} is shorter than a minute"));
            }
            // Longer ones wrapped when counted in microseconds (a verify every few seconds).
            if interval > crate::marker::MAX_INTERVAL {
                return Err(format!("verify_every: {every:?} is longer than a century"));
            }
        }
        Ok(())
    }

    /// The interval of scheduled verifies, if any (validated on load).
    pub fn verify_interval(&self) -> Option<std::time::Duration> {
        self.verify_every.as_deref().and_then(|every| humantime::parse_duration(every).ok())
    }
}

const MIN_VERIFY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Below this a single largest record would take seconds to pass the limiter.
pub const MIN_RATE: u64 = 64 << 10;

/// `mirror add`: writes a new mirror's file (and its empty checkpoints first: from the next
/// `run` on, the journal keeps everything this mirror still needs).
pub fn add(dir: &VolumeDir, config: &MirrorConfig) -> Result<(), MirrorError> {
    config.validate().map_err(|e| MirrorError::Invalid(format!("mirror {e}")))?;
    if !dir.holds_volume() {
        return Err(MirrorError::Invalid(format!("{} holds no volume", dir.root().display())));
    }
    let path = dir.mirror_config(&config.name);
    if path.exists() {
        return Err(MirrorError::Invalid(format!("mirror {} already exists (remove it first)", config.name)));
    }
    let io = |context: String| move |source| MirrorError::Io { context, source };
    crate::permissions::create_dir_all(dir.mirrors()).map_err(io(format!("create {}", dir.mirrors().display())))?;
    checkpoints::save(dir, &config.name, Checkpoints::default())?;
    save(dir, config)
}

/// Writes a mirror's file (documented; see docs/configuration.md).
fn save(dir: &VolumeDir, config: &MirrorConfig) -> Result<(), MirrorError> {
    let path = dir.mirror_config(&config.name);
    let text = format!(
        "# ublk-mirror mirror of this volume; written by `ublk-mirror mirror add`/`mirror set`.\n\
         # Keys: name, address (HOST:PORT), fingerprint (sha256:...), max_rate (bytes/s, e.g. \"50M\"),\n\
         # idle_timeout (seconds), congestion (\"bbr\" or \"cubic\"), verify_every (e.g. \"7d\"),\n\
         # compression (\"off\", \"zstd:LEVEL\" or \"auto\", the default), coalesce (\"off\", \"on\" or \"auto\", the\n\
         # default). See docs/configuration.md.\n{}",
        toml::to_string_pretty(config).expect("mirror config serialises")
    );
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|source| MirrorError::Io { context: format!("write {}", path.display()), source })
}

/// Changes a mirror's rate limit, idle timeout, verify schedule or compression (`None`: leave
/// as is). A running volume picks the rate and the compression up at once (see `reload`),
/// the idle timeout at the next connection.
pub fn set(dir: &VolumeDir, name: &str, changes: &MirrorChanges) -> Result<MirrorConfig, MirrorError> {
    let mut config = load(dir, name)?;
    if let Some(rate) = changes.max_rate {
        config.max_rate = rate;
    }
    if let Some(seconds) = changes.idle_timeout {
        config.idle_timeout = Some(seconds);
    }
    if let Some(every) = &changes.verify_every {
        config.verify_every = every.clone();
    }
    if let Some(compression) = changes.compression {
        config.compression = Some(compression);
    }
    if let Some(coalesce) = changes.coalesce {
        config.coalesce = Some(coalesce);
    }
    config.validate().map_err(|e| MirrorError::Invalid(format!("mirror {e}")))?;
    save(dir, &config)?;
    Ok(config)
}

/// What `mirror set` changes (`None`: left as it is; `Some(None)`: removed).
#[derive(Debug, Default, Clone)]
pub struct MirrorChanges {
    pub max_rate: Option<Option<u64>>,
    pub idle_timeout: Option<u64>,
    pub verify_every: Option<Option<String>>,
    pub compression: Option<Compression>,
    pub coalesce: Option<Coalesce>,
}

impl MirrorChanges {
    pub fn is_empty(&self) -> bool {
        self.max_rate.is_none() && self.idle_timeout.is_none() && self.verify_every.is_none() && self.compression.is_none() && self.coalesce.is_none()
    }
}

/// Reads and validates one mirror's file; errors name the file and the key.
pub fn load(dir: &VolumeDir, name: &str) -> Result<MirrorConfig, MirrorError> {
    let path = dir.mirror_config(name);
    if !path.exists() {
        return Err(MirrorError::Invalid(format!("no mirror named {name:?} in {}", dir.root().display())));
    }
    load_file(&path)
}

fn load_file(path: &Path) -> Result<MirrorConfig, MirrorError> {
    let text = std::fs::read_to_string(path).map_err(|source| MirrorError::Io { context: format!("read {}", path.display()), source })?;
    let config: MirrorConfig = toml::from_str(&text).map_err(|e| MirrorError::Invalid(format!("{}: {}", path.display(), e.to_string().trim_end())))?;
    config.validate().map_err(|e| MirrorError::Invalid(format!("{}: {e}", path.display())))?;
    if path.file_stem().is_some_and(|stem| stem != config.name.as_str()) {
        return Err(MirrorError::Invalid(format!("{}: name: {:?} differs from the file's name", path.display(), config.name)));
    }
    Ok(config)
}

/// `mirror remove`: deletes the mirror's file and checkpoints (its journal hold goes with
/// them at the next `run`).
pub fn remove(dir: &VolumeDir, name: &str) -> Result<(), MirrorError> {
    let path = dir.mirror_config(name);
    if !path.exists() {
        return Err(MirrorError::Invalid(format!("no mirror named {name:?} in {}", dir.root().display())));
    }
    std::fs::remove_file(&path).map_err(|source| MirrorError::Io { context: format!("remove {}", path.display()), source })?;
    checkpoints::remove(dir, name);
    crate::fsutil::sync_dir(&dir.mirrors()).map_err(|source| MirrorError::Io { context: "sync mirrors directory".into(), source })
}

/// Every mirror of the volume, by name; a bad file is an error that names it.
pub fn list(dir: &VolumeDir) -> Result<Vec<MirrorConfig>, MirrorError> {
    let mut mirrors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.mirrors()) else { return Ok(mirrors) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            mirrors.push(load_file(&path)?);
        }
    }
    mirrors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(mirrors)
}
