//! What a session has sent and the applier has not acknowledged yet: the send window (bytes
//! on the wire not yet `received`) and the payload still to be `applied`; and the task that
//! reads the applier's acknowledgements, which must not outlive its session.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::checkpoints::{self, Checkpoints};
use super::resync_source::ResyncEvent;
use crate::journal::Hold;
use crate::layout::VolumeDir;
use crate::lock;
use crate::protocol::framing::{read_frame, LinkError};
use crate::protocol::wire::{Control, Frame};
use crate::status::MirrorStatus;

/// Checkpoints are persisted at most this often, off the sending thread. The saved state only
/// has to be no newer than the applier's: it is the trim floor when the volume starts, and
/// the applier sends its own checkpoints on every connect. (Every 500 ms on the sending
/// thread, the file's two fsyncs forced ext4 journal commits that stalled the volume's own
/// journal syncs under load and held up sending.)
const PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// What the applier says besides checkpoints (read by the acknowledgement task).
pub(super) enum ApplierEvent {
    Resync(ResyncEvent),
    Verified { at_lsn: u64, differ: Vec<u64>, skipped: Option<String> },
}

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

/// What the acknowledgement reader needs of its sender (owned: it runs as a task).
pub(super) struct AckReader {
    pub dir: VolumeDir,
    pub name: String,
    pub status: Arc<Mutex<MirrorStatus>>,
    pub hold: Hold,
}

/// Records the applier's checkpoints in the mirror's status and moves its journal hold to
/// `received`.
pub(super) fn acknowledge(status: &Mutex<MirrorStatus>, hold: &Hold, received: u64, applied: u64) {
    let received = {
        let mut status = lock(status);
        status.acknowledge(received, applied);
        status.received_lsn
    };
    hold.set(received);
}

impl AckReader {
    /// The applier's acknowledgements: they close the window, move the journal hold, and are
    /// saved now and then.
    pub(super) async fn run(
        self,
        mut recv: quinn::RecvStream,
        in_flight: Arc<Mutex<Flight>>,
        events: tokio::sync::mpsc::UnboundedSender<ApplierEvent>,
    ) -> Result<(), LinkError> {
        let mut last_persist = Instant::now() - PERSIST_INTERVAL;
        let mut persisting: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            match read_frame(&mut recv).await? {
                Some(Frame::Control(Control::Ack { received_lsn, applied_lsn })) => {
                    // The window closes on `received` (durable at the applier); applied
                    // bytes are counted for the throughput.
                    let done = lock(&in_flight).acknowledge(received_lsn, applied_lsn);
                    lock(&self.status).applied_bytes += done;
                    acknowledge(&self.status, &self.hold, received_lsn, applied_lsn);
                    if last_persist.elapsed() >= PERSIST_INTERVAL && persisting.as_ref().is_none_or(|save| save.is_finished()) {
                        let (dir, name) = (self.dir.clone(), self.name.clone());
                        persisting = Some(tokio::task::spawn_blocking(move || {
                            let _ = checkpoints::save(&dir, &name, Checkpoints { received_lsn, applied_lsn });
                        }));
                        last_persist = Instant::now();
                    }
                }
                Some(Frame::Control(Control::ResyncDiffer { regions })) => {
                    let _ = events.send(ApplierEvent::Resync(ResyncEvent::Differ(regions)));
                }
                Some(Frame::Control(Control::ResyncStored { chunks })) => {
                    let _ = events.send(ApplierEvent::Resync(ResyncEvent::Stored(chunks)));
                }
                Some(Frame::Control(Control::ResyncCommitted { at_lsn })) => {
                    let _ = events.send(ApplierEvent::Resync(ResyncEvent::Committed(at_lsn)));
                }
                Some(Frame::Control(Control::VerifyResult { at_lsn, differ, skipped })) => {
                    let _ = events.send(ApplierEvent::Verified { at_lsn, differ, skipped });
                }
                Some(Frame::Control(Control::ResyncRefused { reason })) => {
                    let _ = events.send(ApplierEvent::Resync(ResyncEvent::Refused(reason)));
                }
                // The applier stops acknowledging (its disk failed): the mirror shows why,
                // reconnects later and resends what was not acknowledged.
                Some(Frame::Control(Control::Refused(refusal))) => return Err(LinkError::Refused(refusal)),
                None => return Ok(()),
                other => return Err(LinkError::Protocol(format!("unexpected frame from the applier: {other:?}"))),
            }
        }
    }
}
