//! What a source makes of a replica that was promoted: compared with the promoted volume's
//! history, this volume is **stale** (it wrote nothing after the branch, or only records
//! that were written before the promote and never reached the replica: a failback undoes
//! them) or in **split brain** (it went on writing after the promote). Either way nothing is
//! changed on either side; the error says which, with the counts, and what resolves it.
//!
//! Which of its records came after the promote is told by their journal timestamps against
//! the promote's (the two hosts' clocks are assumed to agree within a second or so, as NTP
//! keeps them; a record whose time is not known, because the journal no longer holds it,
//! counts as written after: split brain, the answer that needs the explicit choice).

use serde::{Deserialize, Serialize};

use crate::generation::{Generation, History, Relation};
use crate::layout::VolumeDir;
use crate::protocol::framing::LinkError;
use crate::protocol::wire::{history_from_wire, Refusal};
use crate::size::human_size;
use crate::volume::Volume;

/// What a mirror's applier said when it refused the mirror because its replica was promoted
/// (`mirrors/NAME.promoted.json`): `volume demote` goes by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionSeen {
    pub to: String,
    pub generation: uuid::Uuid,
    pub branch_lsn: u64,
    /// When the promote began (the new generation's time).
    pub promoted_us: u64,
    /// The promoted volume's history and last LSN when it was seen.
    pub history: Vec<Generation>,
    pub last_lsn: u64,
    pub seen_us: u64,
}

impl PromotionSeen {
    /// What was seen now of the volume in `to` with the promoted `history` (its current
    /// generation is the promote's) written through `last_lsn`.
    pub(super) fn of(to: &str, history: &History, last_lsn: u64) -> PromotionSeen {
        let promoted = history.current();
        PromotionSeen {
            to: to.to_string(),
            generation: promoted.id,
            branch_lsn: promoted.branch_lsn,
            promoted_us: promoted.created_us,
            history: history.generations().to_vec(),
            last_lsn,
            seen_us: crate::clock::now_micros(),
        }
    }

    pub fn load(dir: &VolumeDir, mirror: &str) -> Option<PromotionSeen> {
        serde_json::from_slice(&std::fs::read(dir.mirror_promoted(mirror)).ok()?).ok()
    }

    pub(super) fn save(&self, dir: &VolumeDir, mirror: &str) {
        let path = dir.mirror_promoted(mirror);
        if let Err(error) = crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(self).expect("serialises")) {
            tracing::warn!(path = %path.display(), %error, "could not save what the applier said of the promotion");
        }
    }
}

/// Records this volume wrote after an LSN, split by the promote's time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WrittenAfter {
    pub records: u64,
    pub bytes: u64,
    /// Of those, written after the promote (or at an unknown time).
    pub after_promote: u64,
}

/// Counts the volume's records after `lsn`; `promoted_us` splits them. From the journal's
/// ledger (it runs at every refused reconnect: nothing is read from disk).
pub fn written_after(volume: &Volume, lsn: u64, promoted_us: u64) -> WrittenAfter {
    let journal = volume.journal();
    let last = journal.written_lsn();
    let mut counted = WrittenAfter::default();
    if last <= lsn {
        return counted;
    }
    if journal.first_lsn() <= lsn + 1 {
        (counted.records, counted.bytes, counted.after_promote) = journal.written(lsn + 1, last, promoted_us);
    }
    // Records the journal no longer holds: their times are unknown.
    let unknown = (last - lsn).saturating_sub(counted.records);
    counted.records += unknown;
    counted.after_promote += unknown;
    counted
}

/// The error for a refusal because the replica was promoted (other refusals as they are).
pub fn explain(volume: &Volume, mirror: &str, refusal: Refusal) -> LinkError {
    let Refusal::Promoted(promoted_replica) = &refusal else { return LinkError::Refused(refusal) };
    let crate::protocol::wire::PromotedReplica { name, to, generation, branch_lsn, last_lsn, written_bytes, history } = promoted_replica.as_ref();
    let Ok(promoted) = history_from_wire(history) else { return LinkError::Refused(refusal) };
    let vdir = volume.dir().root();
    PromotionSeen::of(to, &promoted, *last_lsn).save(volume.dir(), mirror);
    let ours = volume.history();
    let our_last = volume.journal().written_lsn();
    let (common_lsn, theirs_after) = match ours.relation(our_last, &promoted, *last_lsn) {
        Relation::Branched { common_lsn, theirs_after, .. } => (common_lsn, theirs_after),
        _ => return LinkError::Refused(refusal),
    };
    let promoted_us = promoted.current().created_us;
    let mine = written_after(volume, common_lsn, promoted_us);
    let when = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_micros(promoted_us));
    let their_bytes = written_bytes.map(|bytes| format!(" ({} at most)", human_size(bytes))).unwrap_or_default();
    let theirs = format!(
        "the promoted volume (in {to} on the applier's host, generation {generation}, branched at LSN {branch_lsn}) has written {theirs_after} records{their_bytes} since"
    );
    let demote = format!("ublk-mirror volume demote --dir {} --applier ADIR", vdir.display());
    let message = if mine.records == 0 {
        format!("volume {name} is stale: its replica was promoted at {when}; {theirs}; this volume wrote nothing after LSN {common_lsn}. Nothing was changed. To make it a replica of the new primary: {demote}")
    } else if mine.after_promote == 0 {
        format!(
            "volume {name} is stale: its replica was promoted at {when}; {theirs}; this volume wrote {} records ({}) after LSN {common_lsn}, all before the promote, that never reached the replica. Nothing was changed. Demoting it undoes them (they are counted first): {demote}",
            mine.records,
            human_size(mine.bytes)
        )
    } else {
        format!(
            "split brain: the replica of volume {name} was promoted at {when} while this volume went on writing: this volume wrote {} records ({}) after LSN {common_lsn}, {} of them after the promote; {theirs}. Nothing was changed on either side. Keep one side; on the other: {demote} --discard-local-changes",
            mine.records,
            human_size(mine.bytes),
            mine.after_promote
        )
    };
    LinkError::Diverged(message)
}
