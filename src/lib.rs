//! ublk-mirror: asynchronous block-level mirroring for Linux.
//!
//! See `docs/architecture.md` for the modules and the write path.

pub mod failpoint;
pub mod fsutil;
pub mod journal;
pub mod size;
pub mod identity;
pub mod volume;
pub mod nbd;
pub mod control;
pub mod status;
pub mod daemon;
pub mod metrics;
pub mod install;
pub mod replication;
pub mod ublk;

/// Locks a mutex, taking over one that a panicked thread left poisoned: every holder leaves
/// the guarded data consistent before anything that can panic, and refusing service after
/// one failed thread would lose more than it protects.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
