//! `volume restore`: a volume whose backing store died is rebuilt from its replica, chunk by
//! chunk where the new backing store differs (an empty new disk: every non-zero chunk), then
//! its own journal is redone over it, so it holds every write it acknowledged: the replica's
//! state at its LSN, then the records after it, which the journal kept because the mirror
//! had not yet received them. `restore.json` marks a restore in progress (`run` refuses the
//! directory meanwhile); running the command again resumes it (chunks already equal are
//! only hashed).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MirrorError;
use crate::generation::History;
use crate::journal::Journal;
use crate::layout::VolumeDir;
use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::tls;
use crate::protocol::wire::{Control, Frame, Hello, SYNC_CHUNK, SYNC_HASH_BATCH};
use crate::store::Store;
use crate::volume::{Volume, VolumeConfig, VolumeState};

/// What a restore did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restored {
    pub backing: PathBuf,
    /// The replica's LSN the chunks came from, and the journal records redone after it.
    pub replica_lsn: u64,
    pub redone_records: u64,
    pub chunks: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InProgress {
    from: String,
    backing: PathBuf,
}

fn invalid(message: String) -> MirrorError {
    MirrorError::Invalid(message)
}

/// Restores the volume in `dir` from the applier at `from` (pinned by `fingerprint`), onto
/// `backing` (default: the configured backing store, made anew if it is gone).
pub fn restore(dir: &Path, from: &str, fingerprint: &str, backing: Option<&Path>) -> Result<Restored, MirrorError> {
    let layout = VolumeDir::new(std::path::absolute(dir).map_err(|source| MirrorError::Io { context: format!("resolve {}", dir.display()), source })?);
    let volume_error = |error: crate::volume::VolumeError| invalid(format!("volume {}: {error}", dir.display()));
    let mut config = VolumeConfig::load(&layout).map_err(volume_error)?;
    if crate::volume::is_locked(layout.root()) {
        return Err(invalid(format!("volume {} is being served: stop `run` first", dir.display())));
    }
    // The journal is redone over the fetched chunks: it must be there before anything changes.
    crate::volume::check_journal(&layout, &config, true).map_err(volume_error)?;
    crate::identity::parse_fingerprint(fingerprint).map_err(|e| invalid(e.to_string()))?;
    let target = match backing {
        Some(path) => std::path::absolute(path).map_err(|source| MirrorError::Io { context: format!("resolve {}", path.display()), source })?,
        None => config.backing.clone(),
    };
    let store = match Store::open(&target, "new backing store") {
        Ok(store) => store,
        Err(_) if !target.exists() => {
            Store::create_sparse(&target, config.size).map_err(|e| invalid(e.to_string()))?;
            Store::open(&target, "new backing store").map_err(|e| invalid(e.to_string()))?
        }
        Err(error) => return Err(invalid(error.to_string())),
    };
    if store.size() != config.size {
        return Err(invalid(format!("{} is {} bytes, the volume {}", target.display(), store.size(), config.size)));
    }
    let (journal, report) = Journal::open_read_only(&layout.journal()).map_err(|e| invalid(format!("the volume's journal: {e}")))?;
    drop(journal);
    let state = VolumeState::load(&layout).map_err(volume_error)?;
    let history = History::load_or_first(&layout.generations(), state.generation).map_err(|e| invalid(e.to_string()))?;
    let hello = super::link::hello(&config, &history, report.first_lsn, report.last_lsn);
    crate::fsutil::write_atomic(
        &layout.restoring(),
        &serde_json::to_vec_pretty(&InProgress { from: from.to_string(), backing: target.clone() }).expect("serialises"),
    )
    .map_err(|source| MirrorError::Io { context: format!("write {}", layout.restoring().display()), source })?;
    if config.backing != target {
        config.backing = target.clone();
        config.save(&layout).map_err(volume_error)?;
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| MirrorError::Io { context: "start a runtime".into(), source })?;
    let identity = tls::Identity::load(&layout.identity()).map_err(|e| invalid(e.to_string()))?;
    let (lsn, chunks, fetched, bytes) = runtime
        .block_on(fetch(&identity, from, fingerprint, &hello, &store, |lsn| {
            if lsn + 1 < report.first_lsn || lsn > report.last_lsn {
                Err(format!(
                    "the replica holds LSN {lsn} but the volume's journal holds LSNs {} to {}: the writes between are in neither; nothing was restored",
                    report.first_lsn, report.last_lsn
                ))
            } else {
                Ok(())
            }
        }))
        .map_err(|e| invalid(format!("restore from {from}: {e}")))?;
    store.sync_data().map_err(|source| MirrorError::Io { context: format!("sync {}", target.display()), source })?;
    // The journal after the replica's LSN is redone at the next open: do it now.
    let mut state = state;
    state.applied_lsn = lsn;
    state.clean_shutdown = false;
    state.save(&layout).map_err(volume_error)?;
    std::fs::remove_file(layout.restoring()).map_err(|source| MirrorError::Io { context: format!("remove {}", layout.restoring().display()), source })?;
    let holds = super::holds(&layout, config.size)?;
    let volume = Volume::open(layout.root(), holds).map_err(volume_error)?;
    volume.shutdown().map_err(volume_error)?;
    Ok(Restored {
        backing: target,
        replica_lsn: lsn,
        redone_records: report.last_lsn.saturating_sub(lsn),
        chunks,
        chunks_fetched: fetched,
        bytes_fetched: bytes,
    })
}

async fn fetch(
    identity: &tls::Identity,
    from: &str,
    fingerprint: &str,
    hello: &Hello,
    store: &Store,
    check: impl Fn(u64) -> Result<(), String>,
) -> Result<(u64, u64, u64, u64), LinkError> {
    const IDLE: std::time::Duration = std::time::Duration::from_secs(15);
    let (_endpoint, connection) = super::link::connect(identity, from, fingerprint, IDLE, Default::default(), "applier", IDLE).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    write_control(&mut send, &Control::RestoreStart { hello: hello.clone() }).await?;
    let lsn = match read_frame(&mut recv).await? {
        Some(Frame::Control(Control::RestoreReady { lsn })) => lsn,
        Some(Frame::Control(Control::Refused(refusal))) => return Err(LinkError::Refused(refusal)),
        other => return Err(LinkError::Protocol(format!("expected RestoreReady, got {other:?}"))),
    };
    check(lsn).map_err(LinkError::Protocol)?;
    let size = store.size();
    let total = size.div_ceil(SYNC_CHUNK);
    let (mut fetched, mut bytes) = (0u64, 0u64);
    let mut first = 0u64;
    while first < total {
        let count = (total - first).min(SYNC_HASH_BATCH as u64);
        let mut hashes = Vec::with_capacity(count as usize);
        for chunk in first..first + count {
            let offset = chunk * SYNC_CHUNK;
            let mut data = vec![0u8; (size - offset).min(SYNC_CHUNK) as usize];
            let hole = store.read_for_scan(&mut data, offset, true)?;
            hashes.push(crate::store::chunk_hash(&data, hole));
        }
        write_control(&mut send, &Control::SyncHashes { first_chunk: first, hashes }).await?;
        let differ = match read_frame(&mut recv).await? {
            Some(Frame::Control(Control::SyncDiffer { first_chunk, differ })) if first_chunk == first => differ,
            other => return Err(LinkError::Protocol(format!("expected SyncDiffer for chunk {first}, got {other:?}"))),
        };
        for expected in differ {
            if !(first..first + count).contains(&expected) {
                return Err(LinkError::Protocol(format!("the applier named chunk {expected}, outside the batch at {first}")));
            }
            let (chunk, zero, data) = match read_frame(&mut recv).await? {
                Some(Frame::Control(Control::SyncChunk { chunk, zero, data })) => (chunk, zero, data),
                other => return Err(LinkError::Protocol(format!("expected SyncChunk {expected}, got {other:?}"))),
            };
            let offset = expected * SYNC_CHUNK;
            let length = (size - offset).min(SYNC_CHUNK);
            if chunk != expected || (!zero && data.len() as u64 != length) || (zero && !data.is_empty()) {
                return Err(LinkError::Protocol(format!("chunk {chunk} ({} bytes) does not fit chunk {expected} of {length} bytes", data.len())));
            }
            if zero {
                store.zero(crate::extent::Extent::new(offset, length), true)?;
            } else {
                // Past the page cache where aligned (a restore is a bulk copy, see
                // `Store::write_bulk_at`).
                store.write_bulk_at(&data, offset)?;
                bytes += length;
            }
            fetched += 1;
        }
        first += count;
    }
    let _ = send.finish();
    connection.close(0u32.into(), b"restore done");
    Ok((lsn, total, fetched, bytes))
}
