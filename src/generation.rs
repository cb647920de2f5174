//! Generations: the identity of one writer's history of a volume. A volume starts with one
//! generation; a promote starts a new one whose parent is the generation the replica followed
//! and whose **branch LSN** is the last record of the parent it holds (its own records
//! continue the numbering after it). Within one generation the record at an LSN is the same
//! wherever it is held (a generation has one writer), so two histories can be compared by
//! their generation lists and last LSNs alone: the same generation, one extending the other
//! (the other is stale), or both written after a common point (split brain).
//!
//! Kept in `generations.json` of a volume directory and of a replica directory (a list,
//! oldest first, replaced atomically); a directory from before generations had a history
//! reads as the one generation its state file names.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One generation of a volume's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub id: uuid::Uuid,
    /// The generation this one branched from (`None`: the volume's first).
    #[serde(default)]
    pub parent: Option<uuid::Uuid>,
    /// The last record of the parent's history this generation holds; its own records
    /// start after it (0 for the first generation).
    pub branch_lsn: u64,
    /// When it began (microseconds since the Unix epoch; 0 when not known).
    #[serde(default)]
    pub created_us: u64,
}

/// A history, oldest generation first; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Generation>", into = "Vec<Generation>")]
pub struct History(Vec<Generation>);

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// Where one history stands against another (`ours` against `theirs`), each with the last
/// LSN it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same current generation.
    Same,
    /// Both hold the same history through `common_lsn`; after it, `ours` holds
    /// `ours_after` more records and `theirs` `theirs_after` (at most one of them non-zero
    /// unless they diverged).
    Branched { common_lsn: u64, ours_after: u64, theirs_after: u64 },
    /// No common generation: not the same volume's history.
    Unrelated,
}

impl Relation {
    /// Both sides wrote after their common point.
    pub fn diverged(&self) -> bool {
        matches!(self, Relation::Branched { ours_after, theirs_after, .. } if *ours_after > 0 && *theirs_after > 0)
    }
}

impl TryFrom<Vec<Generation>> for History {
    type Error = String;
    fn try_from(list: Vec<Generation>) -> Result<History, String> {
        if list.is_empty() {
            return Err("a generation history cannot be empty".into());
        }
        for pair in list.windows(2) {
            if pair[1].parent != Some(pair[0].id) {
                return Err(format!("generation {} does not name {} as its parent", pair[1].id, pair[0].id));
            }
            if pair[1].branch_lsn < pair[0].branch_lsn {
                return Err(format!("generation {} branches at LSN {}, before its parent began ({})", pair[1].id, pair[1].branch_lsn, pair[0].branch_lsn));
            }
        }
        Ok(History(list))
    }
}

impl From<History> for Vec<Generation> {
    fn from(history: History) -> Vec<Generation> {
        history.0
    }
}

impl History {
    /// The history of a volume that has only ever had `id`.
    pub fn first(id: uuid::Uuid) -> History {
        History(vec![Generation { id, parent: None, branch_lsn: 0, created_us: 0 }])
    }

    pub fn current(&self) -> &Generation {
        self.0.last().expect("never empty")
    }

    pub fn generations(&self) -> &[Generation] {
        &self.0
    }

    pub fn contains(&self, id: uuid::Uuid) -> bool {
        self.0.iter().any(|g| g.id == id)
    }

    /// This history extended by a new generation branching at `branch_lsn` (which must not
    /// be before the current one began).
    pub fn branch(&self, id: uuid::Uuid, branch_lsn: u64, created_us: u64) -> History {
        let mut list = self.0.clone();
        list.push(Generation { id, parent: Some(self.current().id), branch_lsn: branch_lsn.max(self.current().branch_lsn), created_us });
        History(list)
    }

    /// Compares `self` holding records through `our_lsn` with `theirs` holding records through
    /// `their_lsn`.
    pub fn relation(&self, our_lsn: u64, theirs: &History, their_lsn: u64) -> Relation {
        if self.current().id == theirs.current().id {
            return Relation::Same;
        }
        let common = self.0.iter().zip(&theirs.0).take_while(|(a, b)| a.id == b.id).count();
        if common == 0 {
            return Relation::Unrelated;
        }
        // Where each left the last common generation: the branch of its next generation, or
        // its last LSN if it is still on it.
        let left = |list: &[Generation], last: u64| list.get(common).map_or(last, |next| next.branch_lsn.min(last));
        let common_lsn = left(&self.0, our_lsn).min(left(&theirs.0, their_lsn));
        Relation::Branched { common_lsn, ours_after: our_lsn.saturating_sub(common_lsn), theirs_after: their_lsn.saturating_sub(common_lsn) }
    }

    /// Reads `path`; a missing file is the one generation `current` (a directory from before
    /// histories were kept).
    pub fn load_or_first(path: &Path, current: uuid::Uuid) -> Result<History, HistoryError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(History::first(current)),
            Err(source) => return Err(HistoryError::Io { context: format!("read {}", path.display()), source }),
        };
        let history: History =
            serde_json::from_slice(&text).map_err(|error| HistoryError::Invalid { path: path.display().to_string(), message: error.to_string() })?;
        if history.current().id != current {
            return Err(HistoryError::Invalid {
                path: path.display().to_string(),
                message: format!("the history ends at generation {}, the state file names {current}", history.current().id),
            });
        }
        Ok(history)
    }

    pub fn save(&self, path: &Path) -> Result<(), HistoryError> {
        let text = serde_json::to_vec_pretty(self).expect("history serialises");
        crate::fsutil::write_atomic(path, &text).map_err(|source| HistoryError::Io { context: format!("write {}", path.display()), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> uuid::Uuid {
        uuid::Uuid::from_bytes([n; 16])
    }

    #[test]
    fn histories_compare_by_generations_and_lsns() {
        let a = History::first(id(1));
        let b = a.branch(id(2), 100, 0);
        assert_eq!(a.relation(150, &a, 90), Relation::Same);
        // B promoted at 100 and wrote 20; A stopped at 100: A is stale, nothing to undo.
        assert_eq!(a.relation(100, &b, 120), Relation::Branched { common_lsn: 100, ours_after: 0, theirs_after: 20 });
        // A wrote 5 records after 100 that B never got: diverged.
        let r = a.relation(105, &b, 120);
        assert_eq!(r, Relation::Branched { common_lsn: 100, ours_after: 5, theirs_after: 20 });
        assert!(r.diverged());
        // B promoted but wrote nothing: A is ahead.
        assert!(!a.relation(105, &b, 100).diverged());
        // A replica that had received only 80 of the parent: a prefix.
        assert_eq!(a.relation(80, &b, 120), Relation::Branched { common_lsn: 80, ours_after: 0, theirs_after: 40 });
        // Two promotions of the same parent.
        let c = a.branch(id(3), 90, 0);
        assert_eq!(b.relation(120, &c, 95), Relation::Branched { common_lsn: 90, ours_after: 30, theirs_after: 5 });
        assert_eq!(b.relation(1, &History::first(id(9)), 1), Relation::Unrelated);
    }

    #[test]
    fn a_history_file_is_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("generations.json");
        assert_eq!(History::load_or_first(&path, id(1)).unwrap(), History::first(id(1)));
        let history = History::first(id(1)).branch(id(2), 7, 5);
        history.save(&path).unwrap();
        assert_eq!(History::load_or_first(&path, id(2)).unwrap(), history);
        assert!(History::load_or_first(&path, id(1)).is_err(), "a history that does not end at the state's generation");
        std::fs::write(
            &path,
            br#"[{"id":"01010101-0101-0101-0101-010101010101","branch_lsn":0},{"id":"02020202-0202-0202-0202-020202020202","branch_lsn":3}]"#,
        )
        .unwrap();
        assert!(History::load_or_first(&path, id(2)).unwrap_err().to_string().contains("parent"));
        std::fs::write(&path, b"[]").unwrap();
        assert!(History::load_or_first(&path, id(2)).is_err());
    }
}
