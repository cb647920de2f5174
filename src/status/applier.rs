//! An applier and its replicas as `applier status` reports them. JSON field names are a
//! contract.

use serde::{Deserialize, Serialize};

/// One replica as `applier status` reports it (`replicas[]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub volume: String,
    /// The source feeding the replica: its id, the first 16 hex digits of the certificate
    /// fingerprint it presents (`ADIR/replicas/SOURCE/NAME`); absent for a replica not bound
    /// to a source yet (`ADIR/replicas/NAME`, bound at its source's first connection).
    #[serde(default)]
    pub source: Option<String>,
    /// The source's whole certificate fingerprint.
    #[serde(default)]
    pub source_fingerprint: Option<String>,
    pub image: String,
    pub received_lsn: u64,
    pub applied_lsn: u64,
    pub consistent: bool,
    /// The source LSN the image equals (absent while it is not consistent).
    #[serde(default)]
    pub consistent_lsn: Option<u64>,
    /// A resync in progress: the image stays at `consistent_lsn` meanwhile.
    #[serde(default)]
    pub resync: Option<ResyncProgress>,
    pub connected: bool,
    pub records_received: u64,
    pub records_duplicated: u64,
    /// Payload bytes received (records and synchronisation chunks) since the applier started.
    #[serde(default)]
    pub bytes_received: u64,
    /// Connections accepted from the source since the applier started.
    #[serde(default)]
    pub connections: u64,
    /// Snapshots kept (taken at markers), valid or not, and the space they hold.
    #[serde(default)]
    pub snapshots: u64,
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// Of those, the invalid ones (the marker came while the replica was not consistent, or
    /// a copy-on-write store could not preserve a chunk): they cannot be read or promoted.
    #[serde(default)]
    pub snapshots_invalid: u64,
    /// The generation the replica follows.
    #[serde(default)]
    pub generation: Option<uuid::Uuid>,
    /// After `replica promote`: the volume directory the replica became (it takes no more
    /// records).
    #[serde(default)]
    pub promoted_to: Option<String>,
    /// The last disk error of the replica's journal, image or state while the applier ran
    /// (EIO, ENOSPC): it stores and acknowledges nothing until the disk works again, when
    /// this clears. Absent when the disk is fine.
    #[serde(default)]
    pub disk_error: Option<String>,
}

/// A replica's running resync.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Records after this LSN belong to the resync.
    pub base_lsn: u64,
    /// Bytes staged so far (regions sent, and regions records touched).
    pub staged_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplierStatus {
    pub running: bool,
    pub fingerprint: String,
    pub listen: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
}
