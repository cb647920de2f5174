//! The fault kinds a trial can inject, and what the campaign counts.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// kill -9 of `run` (sometimes with a write in flight), then a restart.
    KillSource,
    /// kill -9 of the applier, a check of its recovered replica, a restart later.
    KillApplier,
    /// The `journal-power-cut-before-commit` failpoint: unsynced journal bytes are lost.
    PowerCut,
    /// The relay black-holes both directions for a while.
    Partition,
    /// The relay drops a share of the packets for the whole trial.
    Loss,
    /// A partition long enough for the small journal to overflow into tracking, then the
    /// resync back to journaling.
    Overflow,
    /// An EIO/ENOSPC failpoint in the source's journal or backing store, then a restart.
    DiskSource,
    /// An EIO/ENOSPC failpoint in the applier's journal or replica image, then recovery.
    DiskApplier,
}

pub const ALL: [Kind; 8] =
    [Kind::KillSource, Kind::KillApplier, Kind::PowerCut, Kind::Partition, Kind::Loss, Kind::Overflow, Kind::DiskSource, Kind::DiskApplier];

/// The default: every kind.
pub const DEFAULT: &str = "kill-source,kill-applier,power-cut,partition,loss,overflow,disk-source,disk-applier";

/// Source failpoints of the disk kind (docs/disk-errors.md): (name, the errno of the first
/// request that fails). A journal write or sync error fails the requests waiting for it with
/// its errno; a backing store error fails no acknowledged request, the volume enters failed
/// and the next request gets EIO.
pub const SOURCE_DISK: [(&str, u32); 6] = [
    ("journal-write-eio", 5),
    ("journal-write-enospc", 28),
    ("journal-sync-eio", 5),
    ("journal-sync-enospc", 28),
    ("backing-write-eio", 5),
    ("backing-write-enospc", 5),
];
pub const APPLIER_DISK: [&str; 4] = ["applier-journal-eio", "applier-journal-enospc", "replica-image-eio", "replica-image-enospc"];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillSource => "kill-source",
            Kind::KillApplier => "kill-applier",
            Kind::PowerCut => "power-cut",
            Kind::Partition => "partition",
            Kind::Loss => "loss",
            Kind::Overflow => "overflow",
            Kind::DiskSource => "disk-source",
            Kind::DiskApplier => "disk-applier",
        }
    }
}

/// Parses a comma list of kind names (`disk` = both disk kinds, `all` = every kind).
pub fn parse(list: &str) -> Result<Vec<Kind>, String> {
    let mut kinds = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found: Vec<Kind> = match item {
            "all" => ALL.to_vec(),
            "disk" => vec![Kind::DiskSource, Kind::DiskApplier],
            name => ALL.iter().copied().filter(|k| k.name() == name).collect(),
        };
        if found.is_empty() {
            let names: Vec<&str> = ALL.iter().map(|k| k.name()).collect();
            return Err(format!("unknown fault kind {item:?}: use {} (or disk, all)", names.join(", ")));
        }
        for kind in found {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    kinds.sort();
    Ok(kinds)
}

/// What one trial did, kept outside the trial's thread so that a failed or hung trial still
/// counts what it injected.
#[derive(Debug, Default, Clone)]
pub struct TrialStats {
    pub faults: BTreeMap<String, u64>,
    pub checks: BTreeMap<String, u64>,
    pub writes: u64,
    pub flushes: u64,
    /// Acknowledged but unflushed writes a crash legitimately lost.
    pub lost_acked: u64,
    /// What the trial was doing last (for the report of a hang).
    pub step: String,
    /// Seconds spent per phase (setup, workload, convergence, ...), to see where time goes.
    pub phases: BTreeMap<String, f64>,
}

impl TrialStats {
    pub fn fault(&mut self, label: &str) {
        *self.faults.entry(label.to_string()).or_default() += 1;
    }

    pub fn check(&mut self, label: &str) {
        *self.checks.entry(label.to_string()).or_default() += 1;
    }

    pub fn phase(&mut self, label: &str, since: std::time::Instant) {
        *self.phases.entry(label.to_string()).or_default() += since.elapsed().as_secs_f64();
    }

    pub fn add(&mut self, other: &TrialStats) {
        for (k, v) in &other.phases {
            *self.phases.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.faults {
            *self.faults.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.checks {
            *self.checks.entry(k.clone()).or_default() += v;
        }
        self.writes += other.writes;
        self.flushes += other.flushes;
        self.lost_acked += other.lost_acked;
    }
}
