//! Reading and writing wire frames on QUIC streams (the async shell around `wire`).

use super::wire::{self, Control, Frame, WireError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// No answer to a connection attempt: the applier is down or unreachable.
    #[error("no answer from {address} within {waited:?} (applier down or unreachable)")]
    Unanswered { address: String, waited: std::time::Duration },
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
    /// The two sides' histories split: what each wrote and what resolves it.
    #[error("refused by the applier: {0}")]
    Diverged(String),
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
    // Kept in the chunks QUIC hands over: record payloads stay slices of them (no copy).
    let mut chunks = Vec::new();
    let mut have = 0;
    while have < length {
        match recv.read_chunk(length - have, true).await.map_err(quinn::ReadExactError::ReadError)? {
            Some(chunk) => {
                have += chunk.bytes.len();
                chunks.push(chunk.bytes);
            }
            None => return Err(quinn::ReadExactError::FinishedEarly(have).into()),
        }
    }
    Ok(Some(wire::decode_frame(chunks)?))
}

pub async fn write_control(send: &mut quinn::SendStream, message: &Control) -> Result<(), LinkError> {
    send.write_all(&wire::encode_control(message)).await?;
    Ok(())
}
