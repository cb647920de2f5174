//! The frontends that serve a volume to its users: NBD (`nbd/`: QEMU, qemu-io, fio,
//! nbd-client, any NBD client) and ublk (`ublk.rs`: `/dev/ublkbN` through the kernel's ublk
//! driver). Both only call `Volume::read` and `Volume::submit`; NBD also serves read-only
//! views (`export.rs`: a replica snapshot).

mod export;
pub mod nbd;
pub mod ublk;

pub use export::Export;
