//! The replication protocol both ends speak: the wire format (`wire`, pure encoding), frames
//! on QUIC streams (`framing`), mutual TLS by pinned fingerprints (`tls`), the QUIC
//! transport settings (`transport`) and its congestion control (`congestion`). See `docs/replication-protocol.md`.

pub mod compression;
pub mod congestion;
pub mod framing;
pub mod tls;
pub mod transport;
pub mod wire;

/// Largest frame body accepted: one batch of up to 32 MiB of payload plus headers. Here, not
/// in `wire`, because `compression` bounds a decompressed batch by it and `wire` decodes
/// through `compression`.
pub const MAX_FRAME: u32 = 40 << 20;
