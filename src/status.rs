//! What `ublk-mirror status` reports, live from a running `run` (through the control socket)
//! or from the state files when nothing serves the volume. JSON field names are a contract.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::journal::Journal;
use crate::volume::config::{VolumeConfig, VolumeState, JOURNAL_DIR};
use crate::volume::{Mode, Volume, VolumeError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub volume: VolumeStatus,
    pub journal: JournalStatus,
    /// Filled in by replication; empty until a mirror is configured.
    pub mirrors: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub size: u64,
    pub backing: String,
    pub generation: uuid::Uuid,
    pub mode: Mode,
    pub running: bool,
    pub pid: Option<u32>,
    pub exports: Vec<String>,
    pub last_lsn: u64,
    pub synced_lsn: u64,
    pub applied_lsn: u64,
    pub checkpoint_lsn: u64,
    pub pending_bytes: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub clean_shutdown: Option<bool>,
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalStatus {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub segments: usize,
    pub segment_size: u64,
}

/// Status of a volume served by this process.
pub fn live(volume: &Volume, exports: &[String]) -> Status {
    let config = volume.config();
    let numbers = volume.numbers();
    let usage = volume.journal().usage();
    Status {
        volume: VolumeStatus {
            name: config.name.clone(),
            uuid: config.uuid,
            size: config.size,
            backing: config.backing.display().to_string(),
            generation: volume.generation(),
            mode: numbers.mode,
            running: true,
            pid: Some(std::process::id()),
            exports: exports.to_vec(),
            last_lsn: numbers.last_lsn,
            synced_lsn: numbers.synced_lsn,
            applied_lsn: numbers.applied_lsn,
            checkpoint_lsn: numbers.checkpoint_lsn,
            pending_bytes: numbers.pending_bytes,
            writes: numbers.writes,
            written_bytes: numbers.written_bytes,
            flushes: numbers.flushes,
            reads: numbers.reads,
            read_bytes: numbers.read_bytes,
            clean_shutdown: None,
            failure: numbers.failure,
        },
        journal: JournalStatus {
            first_lsn: usage.first_lsn,
            last_lsn: usage.last_lsn,
            used_bytes: usage.used_bytes,
            capacity_bytes: usage.capacity_bytes,
            segments: usage.segments,
            segment_size: config.journal.segment_size,
        },
        mirrors: Vec::new(),
    }
}

/// Status read from the files of a volume nobody serves. Changes nothing.
pub fn offline(dir: &Path) -> Result<Status, VolumeError> {
    let config = VolumeConfig::load(dir)?;
    let state = VolumeState::load(dir)?;
    let report = Journal::inspect(&dir.join(JOURNAL_DIR))?;
    let options = config.journal_options();
    Ok(Status {
        volume: VolumeStatus {
            name: config.name.clone(),
            uuid: config.uuid,
            size: config.size,
            backing: config.backing.display().to_string(),
            generation: state.generation,
            mode: Mode::Stopped,
            running: false,
            pid: None,
            exports: Vec::new(),
            last_lsn: report.last_lsn,
            synced_lsn: report.last_lsn,
            applied_lsn: state.applied_lsn,
            checkpoint_lsn: state.applied_lsn,
            pending_bytes: 0,
            writes: 0,
            written_bytes: 0,
            flushes: 0,
            reads: 0,
            read_bytes: 0,
            clean_shutdown: Some(state.clean_shutdown),
            failure: None,
        },
        journal: JournalStatus {
            first_lsn: report.first_lsn,
            last_lsn: report.last_lsn,
            used_bytes: report.used_bytes,
            capacity_bytes: options.max_segments() as u64 * (options.segment_size - crate::journal::SEGMENT_HEADER_SIZE),
            segments: report.segments,
            segment_size: options.segment_size,
        },
        mirrors: Vec::new(),
    })
}

/// The human form of a status.
pub fn render_text(status: &Status) -> String {
    use crate::size::format_size;
    let v = &status.volume;
    let j = &status.journal;
    let mode = serde_json::to_value(v.mode).ok().and_then(|m| m.as_str().map(String::from)).unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!("volume {} ({}), {} bytes ({}), mode {mode}", v.name, v.uuid, v.size, format_size(v.size)));
    if v.running {
        out.push_str(&format!(", served by pid {}", v.pid.unwrap_or_default()));
    } else {
        out.push_str(&format!(", not running (last shutdown {})", if v.clean_shutdown == Some(true) { "clean" } else { "unclean: the next run recovers" }));
    }
    out.push('\n');
    for export in &v.exports {
        out.push_str(&format!("  export   {export}\n"));
    }
    out.push_str(&format!("  lsn      last {} synced {} applied {} checkpoint {}\n", v.last_lsn, v.synced_lsn, v.applied_lsn, v.checkpoint_lsn));
    let fill = if j.capacity_bytes > 0 { j.used_bytes as f64 * 100.0 / j.capacity_bytes as f64 } else { 0.0 };
    out.push_str(&format!(
        "  journal  {} of {} used ({fill:.1}%), {} segment(s), LSN {}..={}\n",
        j.used_bytes, j.capacity_bytes, j.segments, j.first_lsn, j.last_lsn
    ));
    if v.running {
        out.push_str(&format!("  io       {} writes ({} bytes), {} flushes, {} reads ({} bytes), {} bytes pending apply\n", v.writes, v.written_bytes, v.flushes, v.reads, v.read_bytes, v.pending_bytes));
    }
    if let Some(failure) = &v.failure {
        out.push_str(&format!("  FAILED   {failure}\n"));
    }
    out
}
