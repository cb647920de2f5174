//! The replicas a running applier has opened, by [`ReplicaKey`] (source and volume name):
//! found, bound to their source, created or opened for a connection; looked up by name (and
//! source) for the control requests; and the applier's status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::admin::{attached_image, offline_replica};
use super::replica::{Replica, ReplicaState};
use super::{replicas, Applier, ApplierError};
use crate::layout::ReplicaKey;
use crate::lock;
use crate::protocol::transport;
use crate::protocol::wire::Hello;
use crate::status::{ApplierStatus, ReplicaStatus, ResyncProgress};

pub(super) struct Slot {
    pub replica: Arc<Mutex<Replica>>,
    /// The source's session streaming into the replica, if one is.
    pub session: Option<Session>,
    /// The connected source's address.
    pub peer: Option<SocketAddr>,
    pub connections: u64,
    /// Set after a disk error: the replica is opened anew from its files before it is used.
    pub reopen: bool,
}

type Slots = HashMap<ReplicaKey, Slot>;

/// A source's connection that holds a replica.
pub(super) struct Session {
    /// Told apart from a later session of the same replica.
    id: u64,
    /// The mirror it comes from (`transport::sender_id`), if the connection says.
    sender: Option<u64>,
    connection: quinn::Connection,
}

/// Session ids, unique in this process.
static SESSIONS: AtomicU64 = AtomicU64::new(1);

/// How long a new connection waits for the session it supersedes to end.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(10);
/// How often it looks.
const SUPERSEDE_LOOK: Duration = Duration::from_millis(20);
/// The application close code of a superseded connection.
const SUPERSEDED: u32 = 2;

impl Applier {
    /// The replica that the source with certificate `fingerprint` feeds for `hello`'s volume:
    /// an unbound one it proves to be its own is bound first (moved into its directory);
    /// with `create`, a new one is made on its first connection.
    pub(super) fn replica_for(&self, hello: &Hello, fingerprint: &str, create: bool) -> Result<(ReplicaKey, Arc<Mutex<Replica>>), ApplierError> {
        let mut slots = lock(&self.replicas);
        let unbound = ReplicaKey::unbound(&hello.volume_name);
        // An unbound replica a command opened is left alone while it moves (no operation on
        // it runs meanwhile), then reopened from its new place.
        let held = slots.get(&unbound).map(|slot| slot.replica.clone());
        let guard = held.as_ref().map(|replica| lock(replica));
        let found = replicas::for_source(&self.dir, fingerprint, &hello.volume_name, uuid::Uuid::from_bytes(hello.volume_uuid));
        drop(guard);
        let key = found?;
        if key != unbound && held.is_some() && !self.dir.replica(&unbound).holds_replica() {
            slots.remove(&unbound);
        }
        let dir = self.dir.replica(&key);
        if let Some(slot) = slots.get(&key) {
            // A promoted replica that `volume demote` made a replica again (a switchover
            // back) is opened anew from its files.
            let remade = lock(&slot.replica).state().promotion.is_some() && ReplicaState::load(&dir).is_ok_and(|state| state.promotion.is_none());
            if !remade && !slot.reopen {
                return Ok((key, slot.replica.clone()));
            }
            if slot.reopen {
                tracing::info!(replica = %key, "reopening the replica after a disk error");
                // The old instance goes before the new one opens the same files. If opening
                // fails (the disk still does), the source is refused and retries; status
                // keeps showing the disk error meanwhile.
                slots.remove(&key);
                let replica = Replica::open(dir.root()).inspect_err(|error| {
                    tracing::error!(replica = %key, error = %error, "the replica cannot be reopened");
                    self.set_disk_failure(&key, error.to_string());
                })?;
                return Ok((key.clone(), self.register(&mut slots, key, replica)));
            }
            tracing::info!(replica = %key, "the promoted replica was made a replica again: reopening it");
        }
        let mut preallocate = false;
        let replica = if dir.holds_replica() {
            Replica::open(dir.root())?
        } else if !create {
            return Err(ApplierError::Invalid(format!("applier {} holds no replica of {} from this source", self.dir.root().display(), hello.volume_name)));
        } else {
            let image = attached_image(&dir)?;
            let config = super::ApplierConfig::load(&self.dir)?;
            preallocate = config.preallocate_journals;
            match &image {
                Some(image) => tracing::info!(replica = %key, image = %image.display(), "creating replica on the attached image"),
                None => tracing::info!(replica = %key, size = hello.size, "creating replica for a new source"),
            }
            Replica::create(dir.root(), hello, image.as_deref(), config.replica_journal(&self.dir, &dir).as_ref())?
        };
        let replica = self.register(&mut slots, key.clone(), replica);
        drop(slots);
        if preallocate {
            // Outside the table of replicas: writing 1 GiB must not hold up other sources'
            // sessions or status. The replica's own lock is held: its source, which waits
            // for this answer, is the only one that could use it.
            let made = lock(&replica).preallocate_journal();
            match made {
                Ok(files) => tracing::info!(replica = %key, files, "preallocated the replica's journal"),
                Err(error) => tracing::warn!(replica = %key, %error, "could not preallocate the replica's journal; it grows as it fills"),
            }
        }
        Ok((key, replica))
    }

    /// Keeps an opened replica (with its snapshot retention from applier.toml).
    fn register(&self, slots: &mut Slots, key: ReplicaKey, mut replica: Replica) -> Arc<Mutex<Replica>> {
        match super::ApplierConfig::load(&self.dir) {
            Ok(config) => replica.set_keep_snapshots(config.keep_snapshots(&key.volume)),
            Err(error) => tracing::warn!(%error, "applier.toml unreadable: the default snapshot retention applies"),
        }
        let replica = Arc::new(Mutex::new(replica));
        slots.insert(key, Slot { replica: replica.clone(), session: None, peer: None, connections: 0, reopen: false });
        replica
    }

    /// The replica of `volume` (from `source`, when sources share the name) that exists on
    /// disk, opened if no source has connected yet.
    pub fn existing_replica(&self, volume: &str, source: Option<&str>) -> Result<(ReplicaKey, Arc<Mutex<Replica>>), ApplierError> {
        let mut slots = lock(&self.replicas);
        let found = replicas::resolve(&self.dir, volume, source)?;
        if let Some(slot) = slots.get(&found.key) {
            return Ok((found.key, slot.replica.clone()));
        }
        let replica = Replica::open(found.dir.root())?;
        Ok((found.key.clone(), self.register(&mut slots, found.key, replica)))
    }

    /// Records the disk error that stopped `key`'s replica (status shows it until a batch is
    /// stored and acknowledged again).
    pub(super) fn set_disk_failure(&self, key: &ReplicaKey, error: String) {
        lock(&self.disk_failures).insert(key.to_string(), error);
    }

    /// A batch of `key`'s replica was stored: its disk works again.
    pub(super) fn clear_disk_failure(&self, key: &str) {
        let mut failures = lock(&self.disk_failures);
        if !failures.is_empty() && failures.remove(key).is_some() {
            tracing::info!(replica = key, "the replica stores records again");
        }
    }

    pub(super) fn applier_dir(&self) -> &crate::layout::ApplierDir {
        &self.dir
    }

    /// Makes `connection` the session of the replica `key` (the instance `replica` that was
    /// found for it). A session of the same mirror (`transport::sender_id`) still open there
    /// is superseded: its connection is closed and, once it has ended (a lost connection's
    /// way: the batch in hand is journaled whole or not at all), the new one takes its place.
    /// A mirror that lost its connection without the applier noticing (a close dropped on the
    /// way) thus reconnects at once instead of being refused until the old one times out. A
    /// session of another sender (a second mirror of the volume to this applier, a copy of the
    /// volume) is not superseded: the connection is refused. Returns the session's id, or why
    /// the connection is refused.
    pub(super) async fn claim(&self, key: &ReplicaKey, replica: &Arc<Mutex<Replica>>, connection: &quinn::Connection) -> Result<u64, String> {
        let sender = transport::sender_id(connection);
        let deadline = Instant::now() + SUPERSEDE_WAIT;
        let mut superseded = None;
        loop {
            if let Some(reason) = connection.close_reason() {
                return Err(format!("the connection closed while waiting for the replica: {reason}"));
            }
            {
                let mut slots = lock(&self.replicas);
                let Some(slot) = slots.get_mut(key) else { return Err(format!("the replica of {} was closed meanwhile", key.volume)) };
                // The old session may have left the replica to be reopened (a disk error):
                // the next connection opens it anew.
                if slot.reopen || !Arc::ptr_eq(&slot.replica, replica) {
                    return Err(format!("the replica of {} is being reopened; connect again", key.volume));
                }
                match &slot.session {
                    None => {
                        let id = SESSIONS.fetch_add(1, Ordering::Relaxed);
                        slot.session = Some(Session { id, sender, connection: connection.clone() });
                        slot.connections += 1;
                        slot.peer = Some(connection.remote_address());
                        return Ok(id);
                    }
                    Some(old) if sender.is_none() || old.sender != sender => {
                        return Err(format!(
                            "volume {} is already connected from {} by another sender (a second mirror of this volume to this applier, or a copy of the volume?)",
                            key.volume,
                            old.connection.remote_address()
                        ));
                    }
                    Some(old) if superseded != Some(old.id) => {
                        tracing::warn!(replica = %key, old = %old.connection.remote_address(), new = %connection.remote_address(), "a new connection of the same mirror supersedes its open session");
                        old.connection.close(SUPERSEDED.into(), b"superseded by a new connection of the same mirror");
                        superseded = Some(old.id);
                    }
                    Some(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "volume {} is already connected (its open session did not end within {} s of being superseded)",
                    key.volume,
                    SUPERSEDE_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(SUPERSEDE_LOOK).await;
        }
    }

    /// Ends session `id` of the replica `key` (not a later one); the slot, if that session
    /// still held it.
    pub(super) fn release<'a>(slots: &'a mut Slots, key: &ReplicaKey, id: u64) -> Option<&'a mut Slot> {
        let slot = slots.get_mut(key).filter(|slot| slot.session.as_ref().is_some_and(|session| session.id == id))?;
        slot.session = None;
        Some(slot)
    }

    /// The address of the source connected to the replica `key`, if one is.
    pub(super) fn connected_source(&self, key: &ReplicaKey) -> Option<SocketAddr> {
        lock(&self.replicas).get(key).filter(|slot| slot.session.is_some()).and_then(|slot| slot.peer)
    }

    /// A temporary snapshot of a replica's latest consistent state (`export --latest`).
    pub fn snapshot_latest(&self, volume: &str, source: Option<&str>) -> Result<(String, u64), ApplierError> {
        let (_, replica) = self.existing_replica(volume, source)?;
        let result = lock(&replica).snapshot_latest();
        Ok(result?)
    }

    pub fn delete_snapshot(&self, volume: &str, source: Option<&str>, name: &str) -> Result<(), ApplierError> {
        let (_, replica) = self.existing_replica(volume, source)?;
        let result = lock(&replica).delete_snapshot(name);
        Ok(result?)
    }

    /// The control requests about snapshots: `snapshot-latest REPLICA` answers `{"name",
    /// "lsn"}`, `snapshot-delete REPLICA NAME` answers `{"deleted": NAME}`. REPLICA is the
    /// volume name, or `SOURCE/NAME` ([`replicas::reference`]).
    pub fn snapshot_request(&self, request: &str) -> Option<serde_json::Value> {
        let words: Vec<&str> = request.split_whitespace().collect();
        let result = match words.as_slice() {
            ["snapshot-latest", replica] => {
                let (volume, source) = replicas::parse_reference(replica);
                self.snapshot_latest(volume, source).map(|(name, lsn)| serde_json::json!({ "name": name, "lsn": lsn }))
            }
            ["snapshot-delete", replica, name] => {
                let (volume, source) = replicas::parse_reference(replica);
                self.delete_snapshot(volume, source, name).map(|()| serde_json::json!({ "deleted": name }))
            }
            [verb, ..] if verb.starts_with("snapshot-") => Err(ApplierError::Invalid(format!("bad request {request:?}"))),
            _ => return None,
        };
        Some(result.unwrap_or_else(|error| serde_json::json!({ "error": format!("{error}") })))
    }

    /// Records the group snapshots that the snapshots just taken complete. Members are
    /// volume names: every replica of a name is looked at (the marker's id tells its snapshot).
    pub(super) fn record_groups(&self, taken: &[super::snapshot::SnapshotMeta]) {
        for meta in taken.iter().filter(|m| m.group.is_some() && m.is_valid()) {
            super::snapshot::group::record_if_complete(&self.dir, meta, |member| {
                replicas::named(&self.dir, member).iter().flat_map(super::snapshot::metas_on_disk).collect()
            });
        }
    }

    pub fn status(&self) -> ApplierStatus {
        let fingerprint = crate::identity::fingerprint(&self.dir.identity()).unwrap_or_default();
        let disk_failures = lock(&self.disk_failures).clone();
        let mut replicas: Vec<ReplicaStatus> = lock(&self.replicas)
            .iter()
            .map(|(key, slot)| {
                let r = lock(&slot.replica);
                let counters = r.counters();
                ReplicaStatus {
                    volume: key.volume.clone(),
                    source: key.source.clone(),
                    source_fingerprint: key.source.as_deref().and_then(|id| replicas::source_fingerprint(&self.dir, id)),
                    image: r.state().image.display().to_string(),
                    received_lsn: r.received_lsn(),
                    applied_lsn: r.applied_lsn(),
                    consistent: r.state().is_consistent(),
                    consistent_lsn: r.state().is_consistent().then(|| r.applied_lsn()),
                    resync: r.resync_progress().map(|(base_lsn, staged_bytes)| ResyncProgress { base_lsn, staged_bytes }),
                    connected: slot.session.is_some(),
                    records_received: counters.records_received,
                    records_duplicated: counters.records_duplicated,
                    bytes_received: counters.bytes_received,
                    connections: slot.connections,
                    snapshots: r.snapshot_count(),
                    snapshot_bytes: r.snapshot_bytes(),
                    snapshots_invalid: r.invalid_snapshot_count(),
                    generation: Some(r.state().generation),
                    promoted_to: r.promoted_to().map(|p| p.display().to_string()),
                    disk_error: disk_failures.get(&key.to_string()).cloned(),
                }
            })
            .collect();
        // Replicas on disk that no source has connected to since start.
        for found in replicas::list(&self.dir) {
            if !replicas.iter().any(|r| r.volume == found.key.volume && r.source == found.key.source) {
                // A replica that failed to reopen after a disk error is closed, not healthy.
                let disk_error = disk_failures.get(&found.key.to_string()).cloned();
                replicas.push(ReplicaStatus { disk_error, ..offline_replica(&self.dir, found) });
            }
        }
        replicas.sort_by(|a, b| (&a.volume, &a.source).cmp(&(&b.volume, &b.source)));
        ApplierStatus { running: true, fingerprint, listen: self.local_addr().map(|a| a.to_string()), replicas }
    }
}
