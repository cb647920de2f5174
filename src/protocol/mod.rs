//! The replication protocol both ends speak: the wire format (`wire`, pure encoding), frames
//! on QUIC streams (`framing`), mutual TLS by pinned fingerprints (`tls`) and the QUIC
//! transport settings (`transport`). See `docs/replication-protocol.md`.

pub mod compression;
pub mod framing;
pub mod tls;
pub mod transport;
pub mod wire;
