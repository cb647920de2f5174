//! One mirror as `status` reports it (`mirrors[]`), and the mirror's state machine: every
//! change of `state` (and of the replica's consistency it implies) goes through a guarded
//! transition, so the sender cannot put a mirror in a state its history does not allow.

use serde::{Deserialize, Serialize};

/// Where a mirror stands, as `mirrors[].state` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorState {
    /// Not connected to its applier (not yet, or the link failed and is being retried).
    #[default]
    Disconnected,
    /// Connected; the replica is being synchronised (chunk comparison, then the journal
    /// replay that completes it) and is not yet a consistent past state of the volume.
    Syncing,
    /// Connected; the replica is consistent and journal records stream to it.
    Replicating,
    /// The mirror fell out of the journal (it would have filled): its missing writes are
    /// kept as a dirty map, connected or not; the replica stays at its last consistent state.
    Tracking,
    /// Connected; the regions of the dirty map (and the writes since) are being sent. The
    /// replica stays at its last consistent state until the resync commits.
    Resyncing,
}

impl MirrorState {
    pub const ALL: [MirrorState; 5] =
        [MirrorState::Syncing, MirrorState::Replicating, MirrorState::Disconnected, MirrorState::Tracking, MirrorState::Resyncing];

    /// The name status and metrics show.
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorState::Disconnected => "disconnected",
            MirrorState::Syncing => "syncing",
            MirrorState::Replicating => "replicating",
            MirrorState::Tracking => "tracking",
            MirrorState::Resyncing => "resyncing",
        }
    }
}

impl std::fmt::Display for MirrorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition the mirror's state does not allow (a bug in the caller, reported rather
/// than obeyed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mirror {mirror}: cannot {event} while {from}")]
pub struct TransitionError {
    pub mirror: String,
    pub from: MirrorState,
    pub event: &'static str,
}

/// One mirror as `status` reports it. JSON field names are a contract.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub name: String,
    pub address: String,
    connected: bool,
    /// `syncing` (initial synchronisation, until the replica is consistent), `replicating`,
    /// `disconnected`.
    state: MirrorState,
    /// The replica is a consistent past state of this volume (false during initial sync and
    /// the journal replay that completes it).
    consistent: bool,
    pub received_lsn: u64,
    pub applied_lsn: u64,
    /// Payload bytes of the records the replica has not applied (sent or not).
    #[serde(default)]
    pub lag_bytes: u64,
    /// Records not yet applied on the replica.
    #[serde(default)]
    pub lag_records: u64,
    /// Age of the oldest record not yet applied (0 when caught up).
    #[serde(default)]
    pub lag_seconds: f64,
    /// Bytes put on the wire for the mirror's data: record batch frames whole (length,
    /// header, payloads raw or compressed) and the data of synchronisation and resync chunks.
    #[serde(default)]
    pub sent_bytes: u64,
    /// The same data uncompressed: record payloads and chunk data (`payload_bytes /
    /// sent_bytes` is the compression ratio, a little under 1 when nothing compresses).
    #[serde(default)]
    pub payload_bytes: u64,
    /// Record batches and coalesced ranges sent compressed (the others went raw).
    #[serde(default)]
    pub compressed_batches: u64,
    /// The mirror's compression setting: "off", "zstd:LEVEL" or "auto".
    #[serde(default)]
    pub compression: String,
    /// The zstd level of the last batch sent, null if it went raw (with `auto`: the level it
    /// has climbed to, 1..=3).
    #[serde(default)]
    pub compression_level: Option<i32>,
    /// Coalesced ranges sent (docs/coalescing.md): runs of records sent as the newest version
    /// of each block they wrote.
    #[serde(default)]
    pub coalesced_ranges: u64,
    /// Records those ranges stood for (they count in `sent_records` too).
    #[serde(default)]
    pub coalesced_records: u64,
    /// Payload bytes of those records not sent because a later record of the same range
    /// overwrote them (`payload_bytes` counts what was sent).
    #[serde(default)]
    pub coalesced_skipped_bytes: u64,
    /// The mirror's coalescing setting: "off", "on" or "auto".
    #[serde(default)]
    pub coalesce: String,
    #[serde(default)]
    pub sent_records: u64,
    /// Payload bytes the replica acknowledged as applied since `run` started.
    #[serde(default)]
    pub applied_bytes: u64,
    /// Payload bytes applied on the replica per second, over about the last second: what
    /// the link really carries (0 while disconnected).
    #[serde(default)]
    pub throughput_bytes_per_second: f64,
    /// The bandwidth limit in bytes per second (`max_rate`; absent: none).
    #[serde(default)]
    pub max_rate: Option<u64>,
    /// Connections lost or refused since `run` started (each followed by a retry).
    #[serde(default)]
    pub reconnects: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Initial synchronisation: chunks of `sync_chunk_bytes` compared so far, of all, and how
    /// many were sent (as data, or as zeros).
    #[serde(default)]
    pub sync_chunk_bytes: u64,
    #[serde(default)]
    pub sync_chunks_total: u64,
    #[serde(default)]
    pub sync_chunks_compared: u64,
    #[serde(default)]
    pub sync_chunks_sent: u64,
    #[serde(default)]
    pub sync_chunks_zeroed: u64,
    /// Applied LSN at which the replica becomes consistent after a sync.
    #[serde(default)]
    consistent_lsn: Option<u64>,
    /// Bytes the mirror's dirty map marks (tracking, resyncing; 0 otherwise).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// The running (or last) resync: bytes of regions to compare and send, of them done
    /// (compared equal, or sent), and sent as data.
    #[serde(default)]
    pub resync_total_bytes: u64,
    #[serde(default)]
    pub resync_done_bytes: u64,
    #[serde(default)]
    pub resync_sent_bytes: u64,
    /// Seconds the running resync still needs at its pace so far (absent when unknown).
    #[serde(default)]
    pub resync_eta_seconds: Option<f64>,
    /// Markers still in the journal that the replica has not applied yet.
    #[serde(default)]
    pub markers_pending: u64,
    /// The newest marker the replica has applied (its snapshot point), if any.
    #[serde(default)]
    pub last_marker_applied: Option<String>,
    /// LSN ranges `[after, through]` the replica got by resync, as regions rather than
    /// records (the running one included): markers inside them have no snapshot there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resynced_lsn_ranges: Vec<[u64; 2]>,
    /// The online verify running, or the last one (`mirror verify`, `verify_every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<super::VerifyReport>,
    /// The last online verify that compared every chunk (absent until one did): what the
    /// metrics show, also while the next one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<VerifyResult>,
    /// The QUIC connection to the applier while there is one, refreshed every second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStats>,
}

/// What the transport sees of the path to the applier (`mirrors[].link`): where a WAN mirror
/// is slower than its link, this tells loss (a bottleneck queue overflowing, random loss)
/// from a long round trip or a small window. Counters are for the current connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Smoothed round-trip time.
    pub rtt_ms: f64,
    /// Bytes the congestion controller lets be in flight.
    pub congestion_window_bytes: u64,
    /// UDP datagrams and bytes sent, and packets the sender declared lost (and resent).
    pub sent_datagrams: u64,
    pub sent_udp_bytes: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    /// Times the congestion controller reacted to loss.
    pub congestion_events: u64,
    /// The path's largest datagram found so far (path MTU discovery).
    pub mtu_bytes: u64,
}

/// What the last verify of a mirror found (`mirrors[].last_verify`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyResult {
    /// When it finished (seconds since the Unix epoch).
    pub timestamp_seconds: f64,
    pub duration_seconds: f64,
    /// Regions whose contents differ between the volume and the replica, and their bytes.
    pub differing_regions: u64,
    pub differing_bytes: u64,
}

/// What became of a marker for one mirror (`marker list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MarkerState {
    /// The replica passed it record by record: its applier took the snapshot.
    Applied,
    /// Still in the journal, not applied yet.
    Pending,
    /// The replica got that stretch of history by a resync (the mirror was tracking): no
    /// snapshot of it exists there.
    Lost,
}

impl MirrorStatus {
    /// A mirror not (yet) connected, with the checkpoints its applier last acknowledged.
    pub fn new(name: &str, address: &str, max_rate: Option<u64>, received_lsn: u64, applied_lsn: u64) -> MirrorStatus {
        MirrorStatus { name: name.to_string(), address: address.to_string(), max_rate, received_lsn, applied_lsn, ..MirrorStatus::default() }
    }

    pub fn state(&self) -> MirrorState {
        self.state
    }

    /// Shows a verify report (running, or finished): as `verify`, and, once it compared every
    /// chunk, as `last_verify` too (what the metrics show, kept while the next one runs).
    pub fn show_verify(&mut self, report: super::VerifyReport) {
        if let Some(result) = report.result() {
            self.last_verify = Some(result);
        }
        self.verify = Some(report);
    }

    /// What became of the marker at `lsn` for this mirror (`journal_first_lsn`: the oldest
    /// record the volume's journal still holds).
    pub fn marker_state(&self, lsn: u64, journal_first_lsn: u64) -> MarkerState {
        if self.resynced_lsn_ranges.iter().any(|[after, through]| lsn > *after && lsn <= *through) {
            MarkerState::Lost
        } else if lsn <= self.applied_lsn {
            MarkerState::Applied
        } else if lsn >= journal_first_lsn {
            MarkerState::Pending
        } else {
            MarkerState::Lost
        }
    }

    /// Fills `markers_pending` and `last_marker_applied` from the volume's marker history.
    pub fn count_markers(&mut self, markers: &[crate::volume::MarkerEntry], journal_first_lsn: u64) {
        self.markers_pending = markers.iter().filter(|m| self.marker_state(m.lsn, journal_first_lsn) == MarkerState::Pending).count() as u64;
        self.last_marker_applied = markers.iter().rev().find(|m| self.marker_state(m.lsn, journal_first_lsn) == MarkerState::Applied).map(|m| m.name.clone());
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn consistent(&self) -> bool {
        self.consistent
    }

    pub fn consistent_lsn(&self) -> Option<u64> {
        self.consistent_lsn
    }

    /// True when the replica has applied everything through `lsn` and is consistent (what
    /// `mirror wait` waits for).
    pub fn has_applied(&self, lsn: u64) -> bool {
        self.applied_lsn >= lsn && self.consistent
    }

    fn refuse(&self, event: &'static str) -> Result<(), TransitionError> {
        Err(TransitionError { mirror: self.name.clone(), from: self.state, event })
    }

    /// The applier welcomed the sender: the replica is `consistent`, or becomes so once it
    /// applied `consistent_lsn` (a synchronisation whose copy is done).
    pub fn connect(&mut self, consistent: bool, consistent_lsn: Option<u64>) -> Result<(), TransitionError> {
        if self.connected || !matches!(self.state, MirrorState::Disconnected | MirrorState::Tracking) {
            return self.refuse("connect");
        }
        self.connected = true;
        self.consistent = consistent;
        self.consistent_lsn = if consistent { None } else { consistent_lsn };
        // A tracking mirror stays tracking until its resync starts.
        if self.state != MirrorState::Tracking {
            self.state = if consistent { MirrorState::Replicating } else { MirrorState::Syncing };
        }
        Ok(())
    }

    /// The mirror's journal hold was released (the journal would have filled): from now on
    /// its dirty map keeps what it lacks. Allowed from every state.
    pub fn track(&mut self) {
        self.state = MirrorState::Tracking;
    }

    /// A resync of `total_bytes` of regions begins (a consistent replica, connected).
    pub fn start_resync(&mut self, total_bytes: u64) -> Result<(), TransitionError> {
        if !self.connected || !self.consistent {
            return self.refuse("start a resync");
        }
        self.state = MirrorState::Resyncing;
        self.resync_total_bytes = total_bytes;
        self.resync_done_bytes = 0;
        self.resync_sent_bytes = 0;
        self.resync_eta_seconds = None;
        Ok(())
    }

    /// The applier committed the resync: the replica equals the source at a new LSN, and the
    /// mirror streams from the journal again.
    pub fn finish_resync(&mut self) -> Result<(), TransitionError> {
        if self.state != MirrorState::Resyncing {
            return self.refuse("finish a resync");
        }
        self.state = MirrorState::Replicating;
        self.resync_done_bytes = self.resync_total_bytes;
        self.resync_eta_seconds = Some(0.0);
        self.dirty_bytes = 0;
        Ok(())
    }

    /// A synchronisation of `chunks_total` chunks of `chunk_bytes` begins: the replica stops
    /// being consistent until the journal replay after the copy.
    pub fn start_sync(&mut self, chunk_bytes: u64, chunks_total: u64) -> Result<(), TransitionError> {
        if !self.connected {
            return self.refuse("start a synchronisation");
        }
        self.state = MirrorState::Syncing;
        self.consistent = false;
        self.consistent_lsn = None;
        self.sync_chunk_bytes = chunk_bytes;
        self.sync_chunks_total = chunks_total;
        self.sync_chunks_compared = 0;
        self.sync_chunks_sent = 0;
        self.sync_chunks_zeroed = 0;
        Ok(())
    }

    /// Every chunk is copied: the replica is consistent once it applied `consistent_lsn`.
    pub fn finish_copy(&mut self, consistent_lsn: u64) -> Result<(), TransitionError> {
        if self.state != MirrorState::Syncing {
            return self.refuse("finish a synchronisation's copy");
        }
        self.consistent_lsn = Some(consistent_lsn);
        Ok(())
    }

    /// Sets the checkpoints outright (a synchronisation re-bases them).
    pub fn rebase(&mut self, received_lsn: u64, applied_lsn: u64) {
        self.received_lsn = received_lsn;
        self.applied_lsn = applied_lsn;
    }

    /// The applier acknowledged checkpoints (they only move forward). A syncing replica that
    /// reached its consistent LSN is consistent from now on, and the mirror replicates.
    pub fn acknowledge(&mut self, received_lsn: u64, applied_lsn: u64) {
        self.received_lsn = self.received_lsn.max(received_lsn);
        self.applied_lsn = self.applied_lsn.max(applied_lsn);
        if self.state == MirrorState::Syncing && self.consistent_lsn.is_some_and(|target| self.applied_lsn >= target) {
            self.consistent = true;
            self.consistent_lsn = None;
            self.state = MirrorState::Replicating;
        }
    }

    /// Another attempt failed like the one before (an applier that stays unreachable): the
    /// error is kept, `reconnects` not counted again.
    pub fn still_disconnected(&mut self, error: String) {
        if self.connected {
            return self.disconnect(Some(error));
        }
        self.last_error = Some(error);
    }

    /// The connection ended, cleanly (`error` None) or not; allowed from every state. A
    /// mirror with a dirty map (tracking, or a resync that did not finish) tracks on.
    pub fn disconnect(&mut self, error: Option<String>) {
        self.connected = false;
        self.state = match self.state {
            MirrorState::Tracking | MirrorState::Resyncing => MirrorState::Tracking,
            _ => MirrorState::Disconnected,
        };
        self.resync_eta_seconds = None;
        self.throughput_bytes_per_second = 0.0;
        self.link = None;
        self.compression_level = None;
        if let Some(error) = error {
            self.last_error = Some(error);
            self.reconnects += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_at_an_applier_that_stays_away_count_once() {
        let mut status = MirrorStatus::default();
        status.disconnect(Some("connection lost".into()));
        status.still_disconnected("no answer".into());
        status.still_disconnected("no answer again".into());
        assert_eq!(status.reconnects, 1);
        assert_eq!(status.last_error.as_deref(), Some("no answer again"));
        assert_eq!(status.state, MirrorState::Disconnected);
    }

    #[test]
    fn transitions_follow_the_mirror_history() {
        let mut status = MirrorStatus::new("m", "h:1", None, 5, 5);
        assert_eq!(status.state(), MirrorState::Disconnected);
        assert!(status.start_sync(1 << 20, 4).is_err(), "no sync while disconnected");
        assert!(status.finish_copy(9).is_err());
        status.connect(true, None).unwrap();
        assert_eq!(status.state(), MirrorState::Replicating);
        assert!(status.connect(true, None).is_err(), "already connected");
        status.start_sync(1 << 20, 4).unwrap();
        assert_eq!((status.state(), status.consistent()), (MirrorState::Syncing, false));
        status.rebase(10, 5);
        status.finish_copy(12).unwrap();
        status.acknowledge(11, 11);
        assert_eq!(status.state(), MirrorState::Syncing, "not yet at the consistent LSN");
        status.acknowledge(12, 12);
        assert_eq!((status.state(), status.consistent(), status.consistent_lsn()), (MirrorState::Replicating, true, None));
        assert!(status.has_applied(12) && !status.has_applied(13));
        status.disconnect(Some("link lost".into()));
        assert_eq!((status.state(), status.connected(), status.reconnects), (MirrorState::Disconnected, false, 1));
        assert!(status.consistent(), "a disconnected mirror keeps what it knew of the replica");
        status.connect(false, Some(20)).unwrap();
        assert_eq!((status.state(), status.consistent_lsn()), (MirrorState::Syncing, Some(20)));
        status.disconnect(None);
        status.track();
        status.connect(true, None).unwrap();
        assert_eq!(status.state(), MirrorState::Tracking, "a tracking mirror tracks on once connected, until its resync");
        status.start_resync(1 << 20).unwrap();
        assert_eq!(status.state(), MirrorState::Resyncing);
        status.disconnect(Some("lost".into()));
        assert_eq!(status.state(), MirrorState::Tracking, "an unfinished resync leaves the mirror tracking");
        assert!(status.start_resync(1).is_err(), "no resync while disconnected");
        status.connect(true, None).unwrap();
        status.start_resync(1 << 20).unwrap();
        status.finish_resync().unwrap();
        assert_eq!((status.state(), status.consistent()), (MirrorState::Replicating, true));
        assert!(status.finish_resync().is_err());
        status.disconnect(None);
        status.connect(false, Some(20)).unwrap();
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "syncing");
        assert_eq!(json["consistent"], false);
        assert_eq!(serde_json::from_value::<MirrorStatus>(json).unwrap(), status);
    }
}
