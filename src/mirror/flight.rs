//! What a session has sent and the applier has not acknowledged yet: the send window (bytes
//! on the wire not yet `received`) and the payload still to be `applied`; and the task that
//! reads the applier's acknowledgements, which must not outlive its session.

use std::collections::VecDeque;

/// A record sent on this connection (or the last of a batch or range sent together).
pub(super) struct InFlight {
    pub lsn: u64,
    /// Payload bytes up to this LSN since the previous entry (what `applied_bytes` counts).
    pub payload: u64,
    /// What those records took on the wire, headers and compression included: the window
    /// is counted in these, so a compressed backlog keeps as many bytes in flight on the
    /// link as a raw one.
    pub wire: u64,
}

/// Records sent on this connection and not yet applied, oldest first. Those after
/// `received_lsn` are the window (not yet durable at the applier).
#[derive(Default)]
pub(super) struct Flight {
    records: VecDeque<InFlight>,
    received_lsn: u64,
}

impl Flight {
    /// A record (or the last of a batch or range) sent.
    pub fn push(&mut self, sent: InFlight) {
        self.records.push_back(sent);
    }

    /// Bytes on the wire sent and not yet received.
    pub fn window_bytes(&self) -> u64 {
        // Records are in LSN order: sum only those after `received`, not every unapplied one
        // (the applier checkpoints once a second, so tens of thousands may wait for `applied`).
        let first_unreceived = self.records.partition_point(|r| r.lsn <= self.received_lsn);
        self.records.range(first_unreceived..).map(|r| r.wire).sum()
    }

    /// Records the checkpoints; returns the payload bytes newly applied.
    pub fn acknowledge(&mut self, received_lsn: u64, applied_lsn: u64) -> u64 {
        self.received_lsn = self.received_lsn.max(received_lsn);
        let mut applied = 0;
        while self.records.front().is_some_and(|r| r.lsn <= applied_lsn) {
            applied += self.records.pop_front().map_or(0, |r| r.payload);
        }
        applied
    }
}

/// A task aborted when its handle is dropped: the acknowledgement reader holds the session's
/// connection (its receive stream), and a detached reader kept that connection open after
/// the session ended (its keep-alives went out whenever the runtime ran a later session), so
/// the applier refused every reconnect as "already connected".
pub(super) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
