//! Replication: the wire protocol, mutual-TLS QUIC transport, the sender (in `run`) and the
//! applier daemon.

pub mod applier;
pub mod applier_config;
pub mod framing;
pub mod mirror;
pub mod rate;
pub mod sender;
pub mod replica;
pub mod tls;
pub mod wire;
