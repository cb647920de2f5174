//! Replication: the wire protocol, mutual-TLS QUIC transport, the sender (in `run`) and the
//! applier daemon.

pub mod replica;
pub mod tls;
pub mod wire;
