//! The human forms of the status contract: the text of `status` and `applier status`, and
//! the one-line summaries systemd shows under each unit (STATUS=).

use std::path::Path;

use super::{ApplierStatus, MirrorState, MirrorStatus, Status};

/// The human form of a status.
pub fn render_text(status: &Status) -> String {
    use crate::size::format_size;
    let v = &status.volume;
    let n = &v.numbers;
    let j = &status.journal;
    let mode = n.mode.as_str();
    let mut out = String::new();
    out.push_str(&format!("volume {} ({}), {} bytes ({}), mode {mode}", v.name, v.uuid, v.size, format_size(v.size)));
    if v.running {
        out.push_str(&format!(", served by pid {}", v.pid.unwrap_or_default()));
    } else {
        out.push_str(&format!(", not running (last shutdown {})", if v.clean_shutdown == Some(true) { "clean" } else { "unclean: the next run recovers" }));
    }
    out.push('\n');
    if v.generations.len() > 1 {
        let parent = &v.generations[v.generations.len() - 2];
        out.push_str(&format!(
            "  role     {}, generation {} (branched from {} at LSN {})\n",
            v.role,
            v.generation,
            parent.id,
            v.generations[v.generations.len() - 1].branch_lsn
        ));
    }
    for export in &v.exports {
        out.push_str(&format!("  export   {export}\n"));
    }
    out.push_str(&format!("  lsn      last {} synced {} applied {} checkpoint {}\n", n.last_lsn, n.synced_lsn, n.applied_lsn, n.checkpoint_lsn));
    let fill = j.fill() * 100.0;
    out.push_str(&format!(
        "  journal  {} of {} used ({fill:.1}%), {} segment(s), LSN {}..={}\n",
        j.used_bytes, j.capacity_bytes, j.segments, j.first_lsn, j.last_lsn
    ));
    if v.running && j.memory_bytes > 0 {
        out.push_str(&format!("  journal  {} bytes of recent records kept in memory for mirrors\n", j.memory_bytes));
    }
    if !j.dir.is_empty() {
        out.push_str(&format!("  journal  in {}{}\n", j.dir, if j.separate_filesystem { " (separate filesystem)" } else { "" }));
    }
    if v.running {
        out.push_str(&format!(
            "  io       {} writes ({} bytes), {} flushes, {} reads ({} bytes), {} bytes pending apply\n",
            n.writes, n.written_bytes, n.flushes, n.reads, n.read_bytes, n.pending_bytes
        ));
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
    let mode = n.mode.as_str();
    let mut line = format!("{} {mode}, last LSN {}", status.volume.name, n.last_lsn);
    if let Some(failure) = &n.failure {
        // systemctl status shows why the volume takes no writes.
        line.push_str(&format!(" ({failure})"));
    }
    for mirror in &status.mirrors {
        line.push_str(&format!(
            "; mirror {} {} lag {} records / {}B / {:.1}s",
            mirror.name,
            mirror.state(),
            mirror.lag_records,
            format_size(mirror.lag_bytes),
            mirror.lag_seconds
        ));
    }
    line
}

/// The setting (with `auto`'s current level while it compresses) and, once data went out, the
/// ratio of payload to wire bytes (`auto 3.10x`, `auto:3 2.09x`).
fn compression_cell(m: &MirrorStatus) -> String {
    let setting = if m.compression.is_empty() { "auto" } else { m.compression.as_str() };
    let setting = match m.compression_level {
        Some(level) if setting == "auto" => format!("auto:{level}"),
        _ => setting.to_string(),
    };
    match m.sent_bytes {
        0 => setting,
        sent => format!("{setting} {:.2}x", m.payload_bytes as f64 / sent as f64),
    }
}

/// One line per mirror, columns aligned (like `drbdadm status`).
fn mirror_table(mirrors: &[MirrorStatus]) -> String {
    use crate::size::human_size;
    let header = ["MIRROR", "TO", "STATE", "CONSISTENT", "LAG", "LAG-BYTES", "LAG-AGE", "RATE", "SENT", "COMPRESSION", "LIMIT", "RECONNECTS", "MARKERS"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let mut errors = Vec::new();
    for m in mirrors {
        let mut state = m.state().to_string();
        if m.state() == MirrorState::Syncing && m.sync_chunks_total > 0 {
            state = format!("syncing {}%", m.sync_chunks_compared * 100 / m.sync_chunks_total);
        }
        if m.state() == MirrorState::Tracking {
            state = format!("tracking {} dirty", human_size(m.dirty_bytes));
        }
        if m.state() == MirrorState::Resyncing {
            let percent = (m.resync_done_bytes * 100).checked_div(m.resync_total_bytes).unwrap_or(0);
            let eta = m.resync_eta_seconds.map_or("?".to_string(), |eta| format!("{eta:.0}s"));
            state = format!("resyncing {percent}% of {} ETA {eta}", human_size(m.resync_total_bytes));
        }
        rows.push(vec![
            m.name.clone(),
            m.address.clone(),
            state,
            if m.consistent() { "yes" } else { "no" }.to_string(),
            format!("{} rec", m.lag_records),
            human_size(m.lag_bytes),
            format!("{:.1}s", m.lag_seconds),
            format!("{}/s", human_size(m.throughput_bytes_per_second as u64)),
            human_size(m.sent_bytes),
            compression_cell(m),
            m.max_rate.map_or("-".to_string(), |r| format!("{}/s", human_size(r))),
            m.reconnects.to_string(),
            match (&m.last_marker_applied, m.markers_pending) {
                (None, 0) => "-".to_string(),
                (last, pending) => format!("{} pending, last {}", pending, last.as_deref().unwrap_or("-")),
            },
        ]);
        if let Some(error) = m.last_error.as_deref().filter(|_| !m.connected()) {
            errors.push(format!("  {}: last error: {error}\n", m.name));
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

/// The text of `applier status`.
pub fn applier_text(dir: &Path, status: &ApplierStatus) -> String {
    let listening = if status.running { format!("listening on {}", status.listen.as_deref().unwrap_or_default()) } else { "not running".into() };
    let mut out = format!("applier {} ({}), {listening}\n", dir.display(), status.fingerprint);
    for r in &status.replicas {
        let invalid = if r.snapshots_invalid > 0 { format!(", {} invalid", r.snapshots_invalid) } else { String::new() };
        let snapshots =
            if r.snapshots > 0 { format!(" {} snapshots ({}{invalid})", r.snapshots, crate::size::human_size(r.snapshot_bytes)) } else { String::new() };
        out.push_str(&format!(
            "  {:<20} source {:<16} received {:>10} applied {:>10} {} {}{snapshots}  {}\n",
            r.volume,
            r.source.as_deref().unwrap_or(crate::layout::UNBOUND),
            r.received_lsn,
            r.applied_lsn,
            match &r.promoted_to {
                Some(_) => "PROMOTED",
                None if r.consistent => "consistent",
                None => "INCONSISTENT",
            },
            if r.connected { "connected" } else { "disconnected" },
            match &r.promoted_to {
                Some(to) => format!("{}  (now the volume in {to})", r.image),
                None => r.image.clone(),
            }
        ));
        if let Some(error) = &r.disk_error {
            out.push_str(&format!("  {:<20} DISK ERROR {error}\n", ""));
        }
    }
    out
}

/// One line for systemd's STATUS=: each replica's LSNs and state.
pub fn applier_one_line(status: &ApplierStatus) -> String {
    if status.replicas.is_empty() {
        return "no replicas yet".into();
    }
    let parts: Vec<String> = status
        .replicas
        .iter()
        .map(|r| {
            format!(
                "{} ({}) applied {} {} {}",
                r.volume,
                r.source.as_deref().unwrap_or(crate::layout::UNBOUND),
                r.applied_lsn,
                if r.consistent { "consistent" } else { "INCONSISTENT" },
                if r.disk_error.is_some() {
                    "DISK ERROR"
                } else if r.connected {
                    "connected"
                } else {
                    "disconnected"
                }
            )
        })
        .collect();
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compression_cell_shows_autos_level_and_the_ratio() {
        let mirror = |setting: &str, level: Option<i32>, sent: u64| {
            let mut status = MirrorStatus::default();
            (status.compression, status.compression_level) = (setting.into(), level);
            (status.sent_bytes, status.payload_bytes) = (sent, 2 * sent);
            status
        };
        assert_eq!(compression_cell(&mirror("auto", None, 0)), "auto");
        assert_eq!(compression_cell(&mirror("auto", Some(3), 100)), "auto:3 2.00x");
        assert_eq!(compression_cell(&mirror("auto", None, 100)), "auto 2.00x", "the last batch went raw");
        assert_eq!(compression_cell(&mirror("zstd:5", Some(5), 100)), "zstd:5 2.00x");
        assert_eq!(compression_cell(&mirror("", Some(1), 100)), "auto:1 2.00x", "an old status file: auto");
    }
}
