//! The applier's configuration file `ADIR/applier.toml` (written by `applier init`): where
//! `applier run` listens and serves metrics when no flag says otherwise, and the idle timeout.
//! Validated on load; errors name the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::address::parse_listen_address;
use crate::layout::{ApplierDir, ReplicaDir};
use crate::protocol::transport::DEFAULT_IDLE_TIMEOUT_SECONDS;

pub const CONFIG_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplierConfig {
    pub format_version: u32,
    /// UDP address for QUIC, IP:PORT.
    #[serde(default)]
    pub listen: Option<String>,
    /// Prometheus text format at http://ADDR/metrics.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Seconds of silence after which a source's connection is dropped (QUIC uses the smaller
    /// of this and the source's own value).
    #[serde(default)]
    pub idle_timeout: Option<u64>,
    /// `[snapshots]`: how many marker snapshots each replica keeps.
    #[serde(default, skip_serializing_if = "SnapshotSettings::is_default")]
    pub snapshots: SnapshotSettings,
    /// Keep the journals of replicas made from now on in `journal_dir/<replica>/` (another
    /// filesystem) instead of inside their replica directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_dir: Option<PathBuf>,
    /// Write every segment of a new replica's journal when the replica is made, rather than
    /// as the journal first grows (see `Journal::preallocate`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preallocate_journals: bool,
}

/// Where a new replica's journal goes when `journal_dir` is set: `target`, below `journal_dir`
/// by the replica directory's path below `ADIR/replicas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaJournal {
    pub journal_dir: PathBuf,
    pub target: PathBuf,
}

/// `[snapshots]` with `keep` for every volume and `[snapshots.volumes.NAME]` for one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSettings {
    #[serde(default)]
    pub keep: Option<usize>,
    #[serde(default)]
    pub volumes: std::collections::BTreeMap<String, VolumeSnapshotSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSnapshotSettings {
    #[serde(default)]
    pub keep: Option<usize>,
}

impl SnapshotSettings {
    fn is_default(&self) -> bool {
        self == &SnapshotSettings::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplierConfigError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

const TEMPLATE: &str = "\
# ublk-mirror applier configuration; written by `ublk-mirror applier init`.
# `ublk-mirror applier run --dir DIR` reads it; its flags override it. See docs/configuration.md.
format_version = 1

# UDP address the QUIC listener binds (IP:PORT). --listen overrides.
# listen = \"0.0.0.0:7420\"

# Serve Prometheus metrics at http://ADDR/metrics. --metrics overrides.
# metrics = \"127.0.0.1:9421\"

# Seconds without a packet before a source's connection is declared dead (1..600, default 15).
# idle_timeout = 15

# Keep each new replica's journal in JOURNAL_DIR/<replica>/ (e.g. a dedicated SSD) instead of
# inside its replica directory. An absolute path to an existing directory.
# journal_dir = \"/srv/ublk-mirror-journals\"

# Write all of a new replica's journal (1 GiB) when the replica is made, instead of segment by
# segment as it first grows: reserves the space, and the first backlogs skip the zero-filling.
# Replicas keep their journal's files across syncs and resyncs either way.
# preallocate_journals = false

# Snapshots taken at markers: how many each replica keeps (the oldest beyond are deleted).
# [snapshots]
# keep = 16
# [snapshots.volumes.db]
# keep = 48
";

impl Default for ApplierConfig {
    fn default() -> Self {
        ApplierConfig {
            format_version: CONFIG_FORMAT,
            listen: None,
            metrics: None,
            idle_timeout: None,
            snapshots: SnapshotSettings::default(),
            journal_dir: None,
            preallocate_journals: false,
        }
    }
}

impl ApplierConfig {
    /// Writes the documented default file (nothing set).
    pub fn write_template(dir: &ApplierDir) -> Result<(), ApplierConfigError> {
        let path = dir.config();
        crate::fsutil::write_atomic(&path, TEMPLATE.as_bytes())
            .map_err(|source| ApplierConfigError::Io { context: format!("write {}", path.display()), source })
    }

    /// Loads `DIR/applier.toml`; an applier made before the file existed gets the defaults.
    pub fn load(dir: &ApplierDir) -> Result<ApplierConfig, ApplierConfigError> {
        let path = dir.config();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(ApplierConfig::default()),
            Err(source) => return Err(ApplierConfigError::Io { context: format!("read {}", path.display()), source }),
        };
        let invalid = |message: String| ApplierConfigError::Invalid { path: path.clone(), message };
        let config: ApplierConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != CONFIG_FORMAT {
            return Err(format!("format_version: {} is not supported (this build reads {CONFIG_FORMAT})", self.format_version));
        }
        if let Some(listen) = &self.listen {
            parse_listen_address(listen).map_err(|e| format!("listen: {e}"))?;
        }
        if let Some(metrics) = &self.metrics {
            parse_listen_address(metrics).map_err(|e| format!("metrics: {e}"))?;
        }
        if let Some(seconds) = self.idle_timeout.filter(|s| !(1..=600).contains(s)) {
            return Err(format!("idle_timeout: {seconds} must be between 1 and 600 seconds"));
        }
        if self.snapshots.keep == Some(0) {
            return Err("snapshots.keep: must be at least 1".into());
        }
        if let Some(dir) = self.journal_dir.as_ref().filter(|dir| !dir.is_absolute()) {
            return Err(format!("journal_dir: {} must be an absolute path", dir.display()));
        }
        for (volume, settings) in &self.snapshots.volumes {
            crate::name::validate(volume).map_err(|e| format!("snapshots.volumes: {e}"))?;
            if settings.keep == Some(0) {
                return Err(format!("snapshots.volumes.{volume}.keep: must be at least 1"));
            }
        }
        Ok(())
    }

    /// Snapshots the replica of `volume` keeps.
    pub fn keep_snapshots(&self, volume: &str) -> usize {
        self.snapshots.volumes.get(volume).and_then(|v| v.keep).or(self.snapshots.keep).unwrap_or(crate::applier::snapshot::DEFAULT_KEEP)
    }

    /// Where the journal of a replica made in `replica` goes (`None`: inside it).
    pub fn replica_journal(&self, applier: &ApplierDir, replica: &ReplicaDir) -> Option<ReplicaJournal> {
        let journal_dir = self.journal_dir.clone()?;
        let key = replica.root().strip_prefix(applier.replicas()).ok().filter(|key| !key.as_os_str().is_empty());
        let key = key.map(Path::to_path_buf).or_else(|| replica.root().file_name().map(PathBuf::from))?;
        Some(ReplicaJournal { target: journal_dir.join(key), journal_dir })
    }

    pub fn listen_address(&self) -> Option<SocketAddr> {
        self.listen.as_deref().and_then(|text| parse_listen_address(text).ok())
    }

    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.as_deref().and_then(|text| parse_listen_address(text).ok())
    }

    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_dir_is_absolute_and_places_each_replica_below_it() {
        let config: ApplierConfig = toml::from_str("format_version = 1\njournal_dir = \"journals\"").unwrap();
        assert!(config.validate().unwrap_err().contains("journal_dir: journals must be an absolute path"));
        let config: ApplierConfig = toml::from_str("format_version = 1\njournal_dir = \"/srv/j\"").unwrap();
        let applier = ApplierDir::new("/var/lib/a");
        let key = crate::layout::ReplicaKey::new("0123456789abcdef", "vol0");
        let placed = config.replica_journal(&applier, &applier.replica(&key)).unwrap();
        assert_eq!(placed, ReplicaJournal { journal_dir: "/srv/j".into(), target: "/srv/j/0123456789abcdef/vol0".into() });
        let unbound = config.replica_journal(&applier, &applier.replica(&crate::layout::ReplicaKey::unbound("vol0"))).unwrap();
        assert_eq!(unbound.target, std::path::PathBuf::from("/srv/j/vol0"));
        assert_eq!(ApplierConfig::default().replica_journal(&applier, &applier.replica(&key)), None);
        assert_eq!((config.replica_journal(&applier, &applier.replica(&key)), config.preallocate_journals), (Some(placed), false));
        let config: ApplierConfig = toml::from_str("format_version = 1\npreallocate_journals = true").unwrap();
        assert_eq!((config.replica_journal(&applier, &applier.replica(&key)), config.preallocate_journals), (None, true));
        assert!(toml::from_str::<ApplierConfig>("format_version = 1\npreallocate_journals = 1").is_err(), "a bool, not a number");
    }

    #[test]
    fn template_parses_to_the_defaults() {
        let config: ApplierConfig = toml::from_str(TEMPLATE).unwrap();
        assert_eq!(config, ApplierConfig::default());
    }
}
