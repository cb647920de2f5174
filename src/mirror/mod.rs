//! The source side of replication, inside `run`: a volume's mirrors (`config.rs`, their
//! saved checkpoints `checkpoints.rs`), one sender per mirror (`senders.rs` starts and reports
//! them; `session.rs` is one connection: handshake, then the journal streamed from the
//! applier's `received` checkpoint, `flight.rs` what it has in flight; `link.rs` the connection, its Hello and its
//! frames, `sync_source.rs` the source half of an initial
//! synchronisation, `resync_source.rs` of a resync from the dirty map,
//! `verify_source.rs` of an online verify, `batches.rs` record batches as frames, compressed
//! or raw), and the bandwidth limit (`rate.rs`).

mod batches;
pub mod checkpoints;
pub mod coalesce;
pub mod config;
mod flight;
pub mod generations;
mod link;
pub mod rate;
mod restore;
mod resync_source;
mod senders;
mod session;
mod switchover;
mod sync_source;
mod verify_source;

pub use checkpoints::Checkpoints;
pub use config::{add, list, load, remove, set, MirrorChanges, MirrorConfig, MIN_RATE};
pub use generations::{written_after, PromotionSeen, WrittenAfter};
pub use restore::{restore, Restored};
pub use senders::{holds, offline_statuses, Senders};
pub use switchover::{switchover, SwitchedOver, SwitchoverRequest};

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}
