//! Mirrors of a volume: `VDIR/mirrors/NAME.toml` (where to, which applier certificate) and
//! `VDIR/mirrors/NAME.state.json` (the last checkpoints the applier acknowledged). The volume
//! never trims its journal past the smallest `received_lsn` of its mirrors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MIRRORS_DIR: &str = "mirrors";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub name: String,
    /// HOST:PORT of the applier.
    pub address: String,
    /// Pinned certificate fingerprint of the applier.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorState {
    pub received_lsn: u64,
    pub applied_lsn: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn config_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(MIRRORS_DIR).join(format!("{name}.toml"))
}

fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(MIRRORS_DIR).join(format!("{name}.state.json"))
}

pub fn add(dir: &Path, config: &MirrorConfig) -> Result<(), MirrorError> {
    crate::volume::config::validate_name(&config.name).map_err(|e| MirrorError::Invalid(format!("mirror name {e}")))?;
    crate::identity::parse_fingerprint(&config.fingerprint).map_err(|e| MirrorError::Invalid(e.to_string()))?;
    if config.address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
        return Err(MirrorError::Invalid(format!("applier address {:?} must be HOST:PORT", config.address)));
    }
    if !dir.join(crate::volume::config::CONFIG_FILE).exists() {
        return Err(MirrorError::Invalid(format!("{} holds no volume", dir.display())));
    }
    let path = config_path(dir, &config.name);
    if path.exists() {
        return Err(MirrorError::Invalid(format!("mirror {} already exists (remove it first)", config.name)));
    }
    let io = |context: String| move |source| MirrorError::Io { context, source };
    std::fs::create_dir_all(dir.join(MIRRORS_DIR)).map_err(io(format!("create {}", dir.join(MIRRORS_DIR).display())))?;
    // The state goes first: from now on the journal keeps everything this mirror still needs.
    save_state(dir, &config.name, MirrorState::default())?;
    let text = toml::to_string_pretty(config).expect("mirror config serialises");
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(io(format!("write {}", path.display())))
}

pub fn remove(dir: &Path, name: &str) -> Result<(), MirrorError> {
    let path = config_path(dir, name);
    if !path.exists() {
        return Err(MirrorError::Invalid(format!("no mirror named {name:?} in {}", dir.display())));
    }
    std::fs::remove_file(&path).map_err(|source| MirrorError::Io { context: format!("remove {}", path.display()), source })?;
    let _ = std::fs::remove_file(state_path(dir, name));
    crate::fsutil::sync_dir(&dir.join(MIRRORS_DIR)).map_err(|source| MirrorError::Io { context: "sync mirrors directory".into(), source })
}

pub fn list(dir: &Path) -> Result<Vec<MirrorConfig>, MirrorError> {
    let mut mirrors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join(MIRRORS_DIR)) else { return Ok(mirrors) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).map_err(|source| MirrorError::Io { context: format!("read {}", path.display()), source })?;
            let config: MirrorConfig = toml::from_str(&text).map_err(|e| MirrorError::Invalid(format!("{}: {e}", path.display())))?;
            mirrors.push(config);
        }
    }
    mirrors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(mirrors)
}

pub fn load_state(dir: &Path, name: &str) -> MirrorState {
    std::fs::read_to_string(state_path(dir, name)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

pub fn save_state(dir: &Path, name: &str, state: MirrorState) -> Result<(), MirrorError> {
    let path = state_path(dir, name);
    crate::fsutil::write_atomic(&path, &serde_json::to_vec(&state).expect("state serialises")).map_err(|source| MirrorError::Io { context: format!("write {}", path.display()), source })
}

/// The LSN through which the journal may be trimmed as far as mirrors are concerned.
pub fn trim_floor(dir: &Path) -> u64 {
    list(dir).unwrap_or_default().iter().map(|m| load_state(dir, &m.name).received_lsn).min().unwrap_or(u64::MAX)
}
