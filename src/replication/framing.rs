//! Reading and writing wire frames on QUIC streams (the async shell around `wire`).

use super::wire::{self, Control, Frame, WireError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Protocol(String),
    #[error("refused by the applier: {0}")]
    Refused(wire::Refusal),
    #[error(transparent)]
    Replica(#[from] super::replica::ReplicaError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>, LinkError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let length = wire::check_length(prefix)?;
    // Gathered from QUIC's chunks: one copy, and no zero-filling of a buffer it overwrites.
    let mut body = Vec::with_capacity(length);
    while body.len() < length {
        match recv.read_chunk(length - body.len(), true).await.map_err(quinn::ReadExactError::ReadError)? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(quinn::ReadExactError::FinishedEarly(body.len()).into()),
        }
    }
    Ok(Some(wire::decode_frame(body.into())?))
}

pub async fn write_control(send: &mut quinn::SendStream, message: &Control) -> Result<(), LinkError> {
    send.write_all(&wire::encode_control(message)).await?;
    Ok(())
}
