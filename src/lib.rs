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
pub mod replication;
pub mod ublk;
