//! An online verify as `status` (`mirrors[].verify`) and `mirror verify` report it: the one
//! running, or the last one finished (kept in `VDIR/mirrors/NAME.verify.json`, so the
//! metrics and the schedule survive a restart). JSON field names are a contract.

use serde::{Deserialize, Serialize};

/// Differing offsets a report lists at most (the count and bytes cover all of them).
pub const OFFSETS_LISTED: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyState {
    Running,
    /// Every chunk was compared.
    Done,
    /// It could not finish (the link dropped, a resync began, the volume stopped): what it
    /// compared until then is in the report, but it proves nothing about the rest.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Identifies the verify (its start, microseconds since the Unix epoch).
    pub id: u64,
    pub state: VerifyState,
    /// Started by the mirror's `verify_every` schedule rather than by `mirror verify`.
    #[serde(default)]
    pub scheduled: bool,
    /// `--repair`: the differing regions are resent through a resync once it is done.
    #[serde(default)]
    pub repair: bool,
    /// The resync that resent the differing regions committed.
    #[serde(default)]
    pub repaired: bool,
    pub started_us: u64,
    #[serde(default)]
    pub finished_us: Option<u64>,
    #[serde(default)]
    pub duration_seconds: f64,
    /// Bytes compared per chunk (the last chunk of the device may be shorter).
    pub chunk_bytes: u64,
    /// The device's size: what a complete verify compares.
    pub total_bytes: u64,
    #[serde(default)]
    pub compared_bytes: u64,
    /// The LSNs the chunks were compared at (first and last; writes go on meanwhile, each
    /// chunk is compared as both sides stood after one record).
    #[serde(default)]
    pub first_lsn: Option<u64>,
    #[serde(default)]
    pub last_lsn: Option<u64>,
    #[serde(default)]
    pub differing_regions: u64,
    #[serde(default)]
    pub differing_bytes: u64,
    /// Byte offsets of the first differing regions, ascending (at most [`OFFSETS_LISTED`]).
    #[serde(default)]
    pub differing_offsets: Vec<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

impl VerifyReport {
    pub fn start(id: u64, scheduled: bool, repair: bool, chunk_bytes: u64, total_bytes: u64) -> VerifyReport {
        VerifyReport {
            id,
            state: VerifyState::Running,
            scheduled,
            repair,
            repaired: false,
            started_us: crate::clock::now_micros(),
            finished_us: None,
            duration_seconds: 0.0,
            chunk_bytes,
            total_bytes,
            compared_bytes: 0,
            first_lsn: None,
            last_lsn: None,
            differing_regions: 0,
            differing_bytes: 0,
            differing_offsets: Vec::new(),
            error: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.state == VerifyState::Running
    }

    /// One batch compared at `lsn`: `compared` bytes, of which the regions `differing`
    /// (offset, length) differ.
    pub fn record(&mut self, lsn: u64, compared: u64, differing: &[(u64, u64)]) {
        self.first_lsn.get_or_insert(lsn);
        self.last_lsn = Some(lsn);
        self.compared_bytes += compared;
        for &(offset, length) in differing {
            self.differing_regions += 1;
            self.differing_bytes += length;
            if self.differing_offsets.len() < OFFSETS_LISTED {
                self.differing_offsets.push(offset);
            }
        }
        self.differing_offsets.sort_unstable();
        self.tick();
    }

    pub fn finish(&mut self) {
        self.state = VerifyState::Done;
        self.finished_us = Some(crate::clock::now_micros());
        self.tick();
    }

    pub fn fail(&mut self, error: String) {
        if self.is_running() {
            self.state = VerifyState::Failed;
            self.finished_us = Some(crate::clock::now_micros());
            self.error = Some(error);
            self.tick();
        }
    }

    fn tick(&mut self) {
        let now = self.finished_us.unwrap_or_else(crate::clock::now_micros);
        self.duration_seconds = now.saturating_sub(self.started_us) as f64 / 1e6;
    }

    /// The summary the metrics show, for a verify that compared every chunk.
    pub fn result(&self) -> Option<super::VerifyResult> {
        (self.state == VerifyState::Done).then(|| super::VerifyResult {
            timestamp_seconds: self.finished_us.unwrap_or(self.started_us) as f64 / 1e6,
            duration_seconds: self.duration_seconds,
            differing_regions: self.differing_regions,
            differing_bytes: self.differing_bytes,
        })
    }

    /// Bytes compared per second so far.
    pub fn rate(&self) -> f64 {
        if self.duration_seconds > 0.0 {
            self.compared_bytes as f64 / self.duration_seconds
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_every_difference_and_lists_the_first_offsets() {
        let mut report = VerifyReport::start(1, false, false, 1 << 20, 64 << 20);
        report.record(7, 32 << 20, &[(5 << 20, 1 << 20)]);
        let many: Vec<(u64, u64)> = (10..30).map(|chunk| (chunk << 20, 1 << 20)).collect();
        report.record(9, 32 << 20, &many);
        report.finish();
        assert_eq!((report.first_lsn, report.last_lsn), (Some(7), Some(9)));
        assert_eq!(report.differing_regions, 21);
        assert_eq!(report.differing_bytes, 21 << 20);
        assert_eq!(report.differing_offsets.len(), OFFSETS_LISTED);
        assert_eq!(report.differing_offsets[0], 5 << 20);
        assert_eq!(report.compared_bytes, 64 << 20);
        assert_eq!(report.state, VerifyState::Done);
        assert_eq!(report.result().map(|r| r.differing_regions), Some(21));
        // A finished report does not turn into a failed one.
        report.fail("late".into());
        assert_eq!(report.state, VerifyState::Done);
        assert!(report.error.is_none());
    }
}
