//! What `ublk-mirror status` reports, live from a running `run` (through the control socket)
//! or from the state files when nothing serves the volume. JSON field names are a contract.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::journal::Journal;
use crate::volume::config::{VolumeConfig, VolumeState, JOURNAL_DIR};
use crate::volume::{Mode, Volume, VolumeError, VolumeNumbers};

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
    pub running: bool,
    pub pid: Option<u32>,
    pub exports: Vec<String>,
    /// The ublk block device (/dev/ublkbN) while `run --ublk` serves the volume.
    #[serde(default)]
    pub device: Option<String>,
    pub clean_shutdown: Option<bool>,
    /// mode, LSNs, pending bytes, counters and failure, as top-level fields of `volume`.
    #[serde(flatten)]
    pub numbers: VolumeNumbers,
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
            running: true,
            pid: Some(std::process::id()),
            exports: exports.to_vec(),
            device: None,
            clean_shutdown: None,
            numbers,
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
            running: false,
            pid: None,
            exports: Vec::new(),
            device: None,
            clean_shutdown: Some(state.clean_shutdown),
            numbers: VolumeNumbers {
                mode: Mode::Stopped,
                last_lsn: report.last_lsn,
                synced_lsn: report.last_lsn,
                applied_lsn: state.applied_lsn,
                checkpoint_lsn: state.applied_lsn,
                ..VolumeNumbers::default()
            },
        },
        journal: JournalStatus {
            first_lsn: report.first_lsn,
            last_lsn: report.last_lsn,
            used_bytes: report.used_bytes,
            capacity_bytes: options.max_segments() as u64 * (options.segment_size - crate::journal::SEGMENT_HEADER_SIZE),
            segments: report.segments,
            segment_size: options.segment_size,
        },
        mirrors: crate::replication::mirror::list(dir)
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let state = crate::replication::mirror::load_state(dir, &m.name);
                serde_json::json!({
                    "name": m.name, "address": m.address, "connected": false, "state": "disconnected",
                    "received_lsn": state.received_lsn, "applied_lsn": state.applied_lsn,
                    "lag_records": report.last_lsn.saturating_sub(state.applied_lsn),
                })
            })
            .collect(),
    })
}

/// The human form of a status.
pub fn render_text(status: &Status) -> String {
    use crate::size::format_size;
    let v = &status.volume;
    let n = &v.numbers;
    let j = &status.journal;
    let mode = serde_json::to_value(n.mode).ok().and_then(|m| m.as_str().map(String::from)).unwrap_or_default();
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
    out.push_str(&format!("  lsn      last {} synced {} applied {} checkpoint {}\n", n.last_lsn, n.synced_lsn, n.applied_lsn, n.checkpoint_lsn));
    let fill = if j.capacity_bytes > 0 { j.used_bytes as f64 * 100.0 / j.capacity_bytes as f64 } else { 0.0 };
    out.push_str(&format!(
        "  journal  {} of {} used ({fill:.1}%), {} segment(s), LSN {}..={}\n",
        j.used_bytes, j.capacity_bytes, j.segments, j.first_lsn, j.last_lsn
    ));
    if v.running {
        out.push_str(&format!("  io       {} writes ({} bytes), {} flushes, {} reads ({} bytes), {} bytes pending apply\n", n.writes, n.written_bytes, n.flushes, n.reads, n.read_bytes, n.pending_bytes));
    }
    if !status.mirrors.is_empty() {
        out.push_str(&mirror_table(&status.mirrors));
    }
    if let Some(failure) = &n.failure {
        out.push_str(&format!("  FAILED   {failure}\n"));
    }
    out
}

/// One line for systemd's STATUS=: mode and each mirror's state and lag.
pub fn one_line(status: &Status) -> String {
    use crate::size::format_size;
    let n = &status.volume.numbers;
    let mode = serde_json::to_value(n.mode).ok().and_then(|m| m.as_str().map(String::from)).unwrap_or_default();
    let mut line = format!("{} {mode}, last LSN {}", status.volume.name, n.last_lsn);
    for mirror in &status.mirrors {
        line.push_str(&format!(
            "; mirror {} {} lag {} records / {}B / {:.1}s",
            mirror["name"].as_str().unwrap_or("?"),
            mirror["state"].as_str().unwrap_or("?"),
            mirror["lag_records"].as_u64().unwrap_or(0),
            format_size(mirror["lag_bytes"].as_u64().unwrap_or(0)),
            mirror["lag_seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    line
}

/// One line per mirror, columns aligned (like `drbdadm status`).
fn mirror_table(mirrors: &[serde_json::Value]) -> String {
    use crate::size::human_size;
    let header = ["MIRROR", "TO", "STATE", "CONSISTENT", "LAG", "LAG-BYTES", "LAG-AGE", "RATE", "SENT", "LIMIT", "RECONNECTS"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let mut errors = Vec::new();
    for m in mirrors {
        let text = |key: &str| m[key].as_str().unwrap_or("?").to_string();
        let number = |key: &str| m[key].as_u64().unwrap_or(0);
        let mut state = text("state");
        if state == "syncing" && number("sync_chunks_total") > 0 {
            state = format!("syncing {}%", number("sync_chunks_compared") * 100 / number("sync_chunks_total"));
        }
        rows.push(vec![
            text("name"),
            text("address"),
            state,
            if m["consistent"] == true { "yes" } else { "no" }.to_string(),
            format!("{} rec", number("lag_records")),
            human_size(number("lag_bytes")),
            format!("{:.1}s", m["lag_seconds"].as_f64().unwrap_or(0.0)),
            format!("{}/s", human_size(m["throughput_bytes_per_second"].as_f64().unwrap_or(0.0) as u64)),
            human_size(number("sent_bytes")),
            m["max_rate"].as_u64().map_or("-".to_string(), |r| format!("{}/s", human_size(r))),
            number("reconnects").to_string(),
        ]);
        if let Some(error) = m["last_error"].as_str().filter(|_| m["connected"] != true) {
            errors.push(format!("  {}: last error: {error}\n", text("name")));
        }
    }
    let widths: Vec<usize> = (0..header.len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(&format!("  {}\n", cells.join("  ").trim_end()));
    }
    for error in errors {
        out.push_str(&error);
    }
    out
}
