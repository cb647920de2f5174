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

/// `error` and its causes, "outer: inner: innermost", each cause said once: thiserror's
/// Display of an error that wraps another (quinn's "connection lost") does not say why (its
/// source, "reset by peer"), and a message that already quotes its source is not repeated.
pub(crate) fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Locks a mutex, taking over one that a panicked thread left poisoned: every holder leaves
/// the guarded data consistent before anything that can panic, and refusing service after
/// one failed thread would lose more than it protects.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reset by peer")]
    struct Innermost;

    #[derive(Debug, thiserror::Error)]
    #[error("connection lost")]
    struct Lost(#[source] Innermost);

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("read: {0}")]
        Read(#[from] Lost),
    }

    #[test]
    fn describe_says_each_cause_once() {
        assert_eq!(super::describe(&Outer::Read(Lost(Innermost))), "read: connection lost: reset by peer");
        assert_eq!(super::describe(&Innermost), "reset by peer");
    }
}
