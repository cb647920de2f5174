//! Prometheus metrics for `run --metrics ADDR` and `applier run --metrics ADDR`: the
//! rendering of a volume's and an applier's status (`exposition.rs` builds the text,
//! `server.rs` answers `GET /metrics`). Every number is taken from the same typed status
//! `status --json` prints, so the two always agree.

mod exposition;
mod server;

pub use exposition::Exposition;
pub use server::{MetricsServer, Render};

use crate::latency::RequestLatency;
use crate::status::{ApplierStatus, MirrorState, MirrorStatus, Status};
use crate::volume::Mode;

/// The metrics page of a running volume.
pub fn render_volume(status: &Status, latency: &RequestLatency) -> String {
    let mut out = Exposition::default();
    let v = &status.volume;
    let n = &v.numbers;
    let volume = v.name.as_str();
    let labels = [("volume", volume)];
    let uuid = v.uuid.to_string();
    let generation = v.generation.to_string();
    out.gauge("ublk_mirror_volume_info", "Always 1; the labels identify the volume.", &[("volume", volume), ("uuid", &uuid), ("generation", &generation)], 1.0);
    for candidate in Mode::ALL {
        out.gauge(
            "ublk_mirror_volume_mode",
            "1 for the volume's current mode (journaling, full, failed, stopped), else 0.",
            &[("volume", volume), ("mode", candidate.as_str())],
            (candidate == n.mode) as u8 as f64,
        );
    }
    if let Some(failure) = &n.failure {
        out.gauge(
            "ublk_mirror_volume_failure_info",
            "1 while the volume is failed; the reason label says why (the first I/O error).",
            &[("volume", volume), ("reason", failure.as_str())],
            1.0,
        );
    }
    out.gauge("ublk_mirror_volume_size_bytes", "Size of the volume.", &labels, v.size as f64);
    out.gauge("ublk_mirror_volume_last_lsn", "Newest LSN assigned to a write.", &labels, n.last_lsn as f64);
    out.gauge("ublk_mirror_volume_synced_lsn", "Newest LSN durable in the journal.", &labels, n.synced_lsn as f64);
    out.gauge("ublk_mirror_volume_applied_lsn", "Newest LSN applied to the backing store.", &labels, n.applied_lsn as f64);
    out.gauge("ublk_mirror_volume_checkpoint_lsn", "Newest LSN durable in the backing store (checkpointed).", &labels, n.checkpoint_lsn as f64);
    out.gauge("ublk_mirror_volume_pending_bytes", "Journaled bytes not yet applied to the backing store.", &labels, n.pending_bytes as f64);
    out.counter("ublk_mirror_volume_writes_total", "Write requests completed.", &labels, n.writes as f64);
    out.counter("ublk_mirror_volume_written_bytes_total", "Bytes written.", &labels, n.written_bytes as f64);
    out.counter("ublk_mirror_volume_flushes_total", "Flush requests completed.", &labels, n.flushes as f64);
    out.counter("ublk_mirror_volume_reads_total", "Read requests completed.", &labels, n.reads as f64);
    out.counter("ublk_mirror_volume_read_bytes_total", "Bytes read.", &labels, n.read_bytes as f64);
    let j = &status.journal;
    out.gauge("ublk_mirror_journal_used_bytes", "Bytes of records the journal holds.", &labels, j.used_bytes as f64);
    out.gauge("ublk_mirror_journal_capacity_bytes", "Most bytes of records the journal can hold.", &labels, j.capacity_bytes as f64);
    out.gauge(
        "ublk_mirror_journal_memory_bytes",
        "Recent records kept in memory for the mirrors' senders (payloads plus 128 bytes a record).",
        &labels,
        j.memory_bytes as f64,
    );
    out.gauge("ublk_mirror_journal_fill_ratio", "used_bytes / capacity_bytes (writes wait at 1).", &labels, j.fill());
    out.gauge("ublk_mirror_journal_first_lsn", "Oldest LSN the journal retains.", &labels, j.first_lsn as f64);
    out.gauge("ublk_mirror_journal_segments", "Segment files in use.", &labels, j.segments as f64);
    for (op, histogram) in [("write", &latency.write), ("flush", &latency.flush), ("discard", &latency.discard)] {
        out.histogram(
            "ublk_mirror_request_latency_seconds",
            "Time from a request's submission to its completion (write includes write-zeroes).",
            &[("volume", volume), ("op", op)],
            &histogram.snapshot(),
        );
    }
    for mirror in &status.mirrors {
        render_mirror(&mut out, volume, mirror);
    }
    out.finish()
}

fn render_mirror(out: &mut Exposition, volume: &str, m: &MirrorStatus) {
    let labels = [("volume", volume), ("mirror", m.name.as_str())];
    for state in MirrorState::ALL {
        out.gauge(
            "ublk_mirror_mirror_state",
            "1 for the mirror's current state (syncing, replicating, disconnected, tracking, resyncing), else 0.",
            &[("volume", volume), ("mirror", &m.name), ("state", state.as_str())],
            (m.state() == state) as u8 as f64,
        );
    }
    out.gauge("ublk_mirror_mirror_connected", "1 while connected to the applier.", &labels, m.connected() as u8 as f64);
    out.gauge("ublk_mirror_mirror_consistent", "1 when the replica is a consistent past state of the volume.", &labels, m.consistent() as u8 as f64);
    out.gauge("ublk_mirror_mirror_received_lsn", "Newest LSN durable in the applier's journal.", &labels, m.received_lsn as f64);
    out.gauge("ublk_mirror_mirror_applied_lsn", "Newest LSN applied to the replica.", &labels, m.applied_lsn as f64);
    out.gauge("ublk_mirror_mirror_lag_bytes", "Payload bytes of records the replica has not applied.", &labels, m.lag_bytes as f64);
    out.gauge("ublk_mirror_mirror_lag_records", "Records the replica has not applied.", &labels, m.lag_records as f64);
    out.gauge("ublk_mirror_mirror_lag_seconds", "Age of the oldest record the replica has not applied.", &labels, m.lag_seconds);
    out.gauge(
        "ublk_mirror_mirror_throughput_bytes_per_second",
        "Payload bytes the replica applied per second, over about the last second.",
        &labels,
        m.throughput_bytes_per_second,
    );
    if let Some(rate) = m.max_rate {
        out.gauge("ublk_mirror_mirror_max_rate_bytes_per_second", "The mirror's bandwidth limit.", &labels, rate as f64);
    }
    out.counter(
        "ublk_mirror_mirror_sent_bytes_total",
        "Bytes sent on the wire for the mirror's data (record batch frames, compressed or raw, and synchronisation chunks).",
        &labels,
        m.sent_bytes as f64,
    );
    out.counter(
        "ublk_mirror_mirror_payload_bytes_total",
        "The same data uncompressed (payload_bytes / sent_bytes is the compression ratio).",
        &labels,
        m.payload_bytes as f64,
    );
    out.counter("ublk_mirror_mirror_compressed_batches_total", "Record batches sent compressed (the others went raw).", &labels, m.compressed_batches as f64);
    out.counter(
        "ublk_mirror_mirror_coalesced_ranges_total",
        "Coalesced ranges sent (newest version of each block of a run of records).",
        &labels,
        m.coalesced_ranges as f64,
    );
    out.counter("ublk_mirror_mirror_coalesced_records_total", "Records sent inside coalesced ranges.", &labels, m.coalesced_records as f64);
    out.counter(
        "ublk_mirror_mirror_coalesced_skipped_bytes_total",
        "Payload bytes not sent because a later record of the same coalesced range overwrote them.",
        &labels,
        m.coalesced_skipped_bytes as f64,
    );
    let setting = if m.compression.is_empty() { "auto" } else { m.compression.as_str() };
    out.gauge(
        "ublk_mirror_mirror_compression",
        "1, labelled with the mirror's compression setting (off, zstd:LEVEL or auto).",
        &[("volume", volume), ("mirror", &m.name), ("setting", setting)],
        1.0,
    );
    out.counter("ublk_mirror_mirror_sent_records_total", "Journal records sent.", &labels, m.sent_records as f64);
    out.counter("ublk_mirror_mirror_reconnects_total", "Connections lost or refused (each followed by a retry).", &labels, m.reconnects as f64);
    out.gauge("ublk_mirror_mirror_sync_chunks", "Chunks of the current or last initial synchronisation.", &labels, m.sync_chunks_total as f64);
    out.gauge("ublk_mirror_mirror_sync_chunks_compared", "Chunks compared so far.", &labels, m.sync_chunks_compared as f64);
    out.gauge("ublk_mirror_mirror_sync_chunks_sent", "Chunks sent so far (as data or as zeros).", &labels, m.sync_chunks_sent as f64);
    out.gauge("ublk_mirror_mirror_dirty_bytes", "Bytes the mirror's dirty map marks (tracking or resyncing).", &labels, m.dirty_bytes as f64);
    out.gauge("ublk_mirror_mirror_resync_total_bytes", "Bytes of regions the current or last resync compares and sends.", &labels, m.resync_total_bytes as f64);
    out.gauge("ublk_mirror_mirror_resync_done_bytes", "Bytes of those regions done (compared equal, or sent).", &labels, m.resync_done_bytes as f64);
    out.gauge("ublk_mirror_mirror_resync_sent_bytes", "Bytes of region data the current or last resync sent.", &labels, m.resync_sent_bytes as f64);
    out.gauge("ublk_mirror_mirror_markers_pending", "Markers in the journal the replica has not applied yet.", &labels, m.markers_pending as f64);
    if let Some(eta) = m.resync_eta_seconds {
        out.gauge("ublk_mirror_mirror_resync_eta_seconds", "Seconds the running resync still needs at its pace so far.", &labels, eta);
    }
    // Absent until a verify ran: a 0 would claim a clean verify that never happened.
    if let Some(verify) = &m.last_verify {
        out.gauge(
            "ublk_mirror_mirror_verify_last_timestamp_seconds",
            "When the last verify of the replica finished (Unix time).",
            &labels,
            verify.timestamp_seconds,
        );
        out.gauge("ublk_mirror_mirror_verify_last_duration_seconds", "How long the last verify took.", &labels, verify.duration_seconds);
        out.gauge(
            "ublk_mirror_mirror_verify_differing_regions",
            "Regions the last verify found different between the volume and the replica.",
            &labels,
            verify.differing_regions as f64,
        );
        out.gauge("ublk_mirror_mirror_verify_differing_bytes", "Bytes of those regions.", &labels, verify.differing_bytes as f64);
    }
}

/// The metrics page of a running applier.
pub fn render_applier(status: &ApplierStatus) -> String {
    let mut out = Exposition::default();
    out.gauge("ublk_mirror_applier_replicas", "Replicas this applier keeps.", &[], status.replicas.len() as f64);
    for r in &status.replicas {
        let labels = [("volume", r.volume.as_str()), ("source", r.source.as_deref().unwrap_or(crate::layout::UNBOUND))];
        out.gauge("ublk_mirror_replica_received_lsn", "Newest LSN durable in the replica's journal.", &labels, r.received_lsn as f64);
        out.gauge("ublk_mirror_replica_applied_lsn", "Newest LSN applied to the replica image.", &labels, r.applied_lsn as f64);
        out.gauge("ublk_mirror_replica_consistent", "1 when the image is a consistent past state of the source.", &labels, r.consistent as u8 as f64);
        out.gauge("ublk_mirror_replica_connected", "1 while the source is connected.", &labels, r.connected as u8 as f64);
        out.gauge(
            "ublk_mirror_replica_disk_failed",
            "1 while the replica's disk fails (it acknowledges nothing until it stores records again).",
            &labels,
            r.disk_error.is_some() as u8 as f64,
        );
        if let Some(error) = &r.disk_error {
            out.gauge(
                "ublk_mirror_replica_disk_error_info",
                "1 while the replica's disk fails; the error label is the last disk error.",
                &[labels[0], labels[1], ("error", error.as_str())],
                1.0,
            );
        }
        if let Some(lsn) = r.consistent_lsn {
            out.gauge("ublk_mirror_replica_consistent_lsn", "The source LSN the replica image equals.", &labels, lsn as f64);
        }
        out.gauge(
            "ublk_mirror_replica_resyncing",
            "1 while a resync is staged (the image stays at its consistent LSN).",
            &labels,
            r.resync.is_some() as u8 as f64,
        );
        out.gauge(
            "ublk_mirror_replica_resync_staged_bytes",
            "Bytes the running resync has staged.",
            &labels,
            r.resync.as_ref().map_or(0, |p| p.staged_bytes) as f64,
        );
        out.counter("ublk_mirror_replica_records_received_total", "Records received and made durable.", &labels, r.records_received as f64);
        out.counter(
            "ublk_mirror_replica_records_duplicated_total",
            "Records received again after a reconnect (skipped).",
            &labels,
            r.records_duplicated as f64,
        );
        out.counter(
            "ublk_mirror_replica_received_bytes_total",
            "Payload bytes received (records and synchronisation chunks).",
            &labels,
            r.bytes_received as f64,
        );
        out.counter("ublk_mirror_replica_connections_total", "Connections accepted from the source.", &labels, r.connections as f64);
        out.gauge("ublk_mirror_replica_snapshots", "Snapshots of the replica kept (taken at markers).", &labels, r.snapshots as f64);
        out.gauge("ublk_mirror_replica_snapshot_bytes", "Space the replica's snapshots hold.", &labels, r.snapshot_bytes as f64);
        out.gauge(
            "ublk_mirror_replica_snapshots_invalid",
            "Snapshots kept that are invalid (taken while the replica was not consistent, or a chunk could not be preserved).",
            &labels,
            r.snapshots_invalid as f64,
        );
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ApplierStatus, ReplicaStatus, VerifyResult};

    #[test]
    fn verify_metrics_are_absent_until_a_verify_ran() {
        let mut mirror = MirrorStatus::new("m1", "addr", None, 0, 0);
        let mut out = Exposition::default();
        render_mirror(&mut out, "vol0", &mirror);
        assert!(!out.finish().contains("verify"));
        mirror.last_verify = Some(VerifyResult { timestamp_seconds: 1.5e9, duration_seconds: 2.5, differing_regions: 3, differing_bytes: 12288 });
        let mut out = Exposition::default();
        render_mirror(&mut out, "vol0", &mirror);
        let text = out.finish();
        for line in [
            r#"ublk_mirror_mirror_verify_last_timestamp_seconds{volume="vol0",mirror="m1"} 1500000000"#,
            r#"ublk_mirror_mirror_verify_last_duration_seconds{volume="vol0",mirror="m1"} 2.5"#,
            r#"ublk_mirror_mirror_verify_differing_regions{volume="vol0",mirror="m1"} 3"#,
            r#"ublk_mirror_mirror_verify_differing_bytes{volume="vol0",mirror="m1"} 12288"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn wire_and_payload_bytes_and_the_compression_setting_are_exported() {
        let mut mirror = MirrorStatus::new("m1", "addr", None, 0, 0);
        (mirror.sent_bytes, mirror.payload_bytes, mirror.compressed_batches) = (1000, 4000, 3);
        mirror.compression = "zstd:3".into();
        let mut out = Exposition::default();
        render_mirror(&mut out, "vol0", &mirror);
        let text = out.finish();
        for line in [
            r#"ublk_mirror_mirror_sent_bytes_total{volume="vol0",mirror="m1"} 1000"#,
            r#"ublk_mirror_mirror_payload_bytes_total{volume="vol0",mirror="m1"} 4000"#,
            r#"ublk_mirror_mirror_compressed_batches_total{volume="vol0",mirror="m1"} 3"#,
            r#"ublk_mirror_mirror_compression{volume="vol0",mirror="m1",setting="zstd:3"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn invalid_snapshots_of_a_replica_are_counted() {
        let replica = ReplicaStatus { volume: "vol0".into(), snapshots: 3, snapshots_invalid: 2, ..ReplicaStatus::default() };
        let text = render_applier(&ApplierStatus { replicas: vec![replica], ..ApplierStatus::default() });
        assert!(text.lines().any(|l| l == r#"ublk_mirror_replica_snapshots_invalid{volume="vol0",source="unbound"} 2"#), "{text}");
        assert!(text.contains("# TYPE ublk_mirror_replica_snapshots_invalid gauge"), "{text}");
    }

    #[test]
    fn replicas_of_one_name_are_told_apart_by_their_source() {
        let replica = |source: Option<&str>, applied_lsn| ReplicaStatus {
            volume: "vol0".into(),
            source: source.map(String::from),
            applied_lsn,
            ..ReplicaStatus::default()
        };
        let status = ApplierStatus { replicas: vec![replica(Some("0123456789abcdef"), 5), replica(None, 7)], ..ApplierStatus::default() };
        let page = super::render_applier(&status);
        assert!(page.contains(r#"ublk_mirror_replica_applied_lsn{volume="vol0",source="0123456789abcdef"} 5"#), "{page}");
        assert!(page.contains(r#"ublk_mirror_replica_applied_lsn{volume="vol0",source="unbound"} 7"#), "{page}");
    }
}
