//! ublk-mirror: asynchronous block-level mirroring for Linux.
//!
//! Modules by layer, top to bottom (a module imports only from layers below its own; see
//! `docs/architecture.md`):
//!
//! - the command line: the binary (`main.rs` and `cli/`, anyhow only there)
//! - service plumbing: `metrics`, `install`
//! - frontends and daemons: `frontend` (NBD, ublk), `mirror` (the source side of
//!   replication), `applier` (the target side)
//! - the status contract: `status` (typed values every report renders)
//! - the volume and the replication protocol: `volume`, `protocol`
//! - storage: `journal`, `store`, `dirty_map`
//! - foundation: `extent`, `layout`, `name`, `address`, `size`, `clock`, `fsutil`,
//!   `latency`, `priority`, `identity`, `control`, `daemon`, `failpoint`, `permissions`

pub mod address;
pub mod clock;
pub mod control;
pub mod cpu_idle;
pub mod daemon;
pub mod extent;
pub mod failpoint;
pub mod freeze;
pub mod fsutil;
pub mod generation;
pub mod identity;
pub mod latency;
pub mod layout;
pub mod marker;
pub mod name;
pub mod permissions;
pub mod priority;
pub mod reflink;
pub mod size;

pub mod dirty_map;
pub mod journal;
pub mod store;

pub mod protocol;
pub mod volume;

pub mod status;

pub mod applier;
pub mod frontend;
pub mod mirror;

pub mod install;
pub mod metrics;

#[cfg(test)]
mod proptests;

/// Locks a mutex, taking over one that a panicked thread left poisoned: every holder leaves
/// the guarded data consistent before anything that can panic, and refusing service after
/// one failed thread would lose more than it protects.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
