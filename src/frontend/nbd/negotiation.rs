//! The handshake: fixed newstyle negotiation with NBD_OPT_GO/INFO, LIST, ABORT and STARTTLS.

use std::io::{self, Read, Write};

use super::io_error;
use super::protocol::*;
use super::NbdError;
use crate::frontend::Export;

fn read_u32(stream: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn read_u64(stream: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

fn transmission_flags(read_only: bool) -> u16 {
    if read_only {
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
    } else {
        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN
    }
}

/// Whether `name` selects our export. The empty name is the default export (as qemu-nbd does).
fn is_our_export(name: &str, export_name: &str) -> bool {
    name.is_empty() || name == export_name
}

/// Where a connection stands with TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsState {
    /// The export has no TLS: STARTTLS is unsupported.
    Plain,
    /// TLS is required and not yet started: every option but STARTTLS and ABORT is refused
    /// with NBD_REP_ERR_TLS_REQD (doc/proto.md, "TLS support").
    Required,
    /// Haggling restarted inside TLS.
    Active,
}

/// How option haggling ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The client aborted (or went away politely).
    Abort,
    /// The client entered the transmission phase.
    Transmission,
    /// STARTTLS was acknowledged: the TLS handshake follows, then haggling restarts inside it.
    StartTls,
}

/// Sends the greeting and reads the client's flags; true when the client asked for no zeroes.
pub(super) fn greet(reader: &mut impl Read, writer: &mut impl Write) -> Result<bool, NbdError> {
    writer.write_all(&NBD_MAGIC.to_be_bytes()).map_err(io_error("send greeting"))?;
    writer.write_all(&IHAVEOPT.to_be_bytes()).map_err(io_error("send greeting"))?;
    writer.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).map_err(io_error("send greeting"))?;
    writer.flush().map_err(io_error("send greeting"))?;
    let client_flags = read_u32(reader).map_err(io_error("read client flags"))?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(client_flags & CLIENT_FLAG_NO_ZEROES != 0)
}

/// Runs option haggling (after the greeting, or again inside TLS after STARTTLS).
pub(super) fn options(
    reader: &mut impl Read,
    writer: &mut impl Write,
    volume: &Export,
    export_name: &str,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Outcome, NbdError> {
    let size = volume.size();
    let max_io = volume.max_io() as u32;
    loop {
        let magic = read_u64(reader).map_err(io_error("read option"))?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(reader).map_err(io_error("read option"))?;
        let length = read_u32(reader).map_err(io_error("read option"))?;
        if length > MAX_OPTION_LENGTH {
            return Err(NbdError::Protocol(format!("option {option} claims {length} bytes of data")));
        }
        let mut data = vec![0u8; length as usize];
        reader.read_exact(&mut data).map_err(io_error("read option data"))?;
        let reply = |writer: &mut dyn Write, kind: u32, payload: &[u8]| -> Result<(), NbdError> {
            writer.write_all(&option_reply(option, kind, payload)).map_err(io_error("send option reply"))
        };
        if tls == TlsState::Required && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                // The old-style option cannot carry an error: closing is the answer.
                return Err(NbdError::Protocol("client sent NBD_OPT_EXPORT_NAME before STARTTLS; this export requires TLS".into()));
            }
            reply(writer, REP_ERR_TLS_REQD, b"this export requires TLS: send NBD_OPT_STARTTLS first")?;
            writer.flush().map_err(io_error("send option reply"))?;
            continue;
        }
        match option {
            OPT_STARTTLS if tls != TlsState::Plain => {
                if tls == TlsState::Active {
                    reply(writer, REP_ERR_INVALID, b"TLS is already active")?;
                } else if !data.is_empty() {
                    reply(writer, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                } else {
                    reply(writer, REP_ACK, &[])?;
                    writer.flush().map_err(io_error("send option reply"))?;
                    return Ok(Outcome::StartTls);
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !is_our_export(&name, export_name) {
                    // The old-style option cannot carry an error: closing is the answer.
                    return Err(NbdError::Protocol(format!("client asked for unknown export {name:?}")));
                }
                writer.write_all(&size.to_be_bytes()).map_err(io_error("send export"))?;
                writer.write_all(&transmission_flags(volume.read_only()).to_be_bytes()).map_err(io_error("send export"))?;
                if !no_zeroes {
                    writer.write_all(&[0u8; 124]).map_err(io_error("send export"))?;
                }
                writer.flush().map_err(io_error("send export"))?;
                return Ok(Outcome::Transmission);
            }
            OPT_ABORT => {
                reply(writer, REP_ACK, &[])?;
                writer.flush().map_err(io_error("send option reply"))?;
                return Ok(Outcome::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(writer, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    let mut entry = (export_name.len() as u32).to_be_bytes().to_vec();
                    entry.extend_from_slice(export_name.as_bytes());
                    reply(writer, REP_SERVER, &entry)?;
                    reply(writer, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, _requested)) = parse_info_request(&data) else {
                    reply(writer, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO request")?;
                    writer.flush().map_err(io_error("send option reply"))?;
                    continue;
                };
                if !is_our_export(&name, export_name) {
                    let message = format!("unknown export {name:?}; this server exports {export_name:?}");
                    tracing::warn!(%message, "NBD client asked for an unknown export");
                    reply(writer, REP_ERR_UNKNOWN, message.as_bytes())?;
                    writer.flush().map_err(io_error("send option reply"))?;
                    continue;
                }
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&transmission_flags(volume.read_only()).to_be_bytes());
                reply(writer, REP_INFO, &export)?;
                let mut named = INFO_NAME.to_be_bytes().to_vec();
                named.extend_from_slice(export_name.as_bytes());
                reply(writer, REP_INFO, &named)?;
                // Any byte alignment works; 4 KiB is what the journal and page cache like best.
                let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                block.extend_from_slice(&1u32.to_be_bytes());
                block.extend_from_slice(&4096u32.to_be_bytes());
                block.extend_from_slice(&max_io.to_be_bytes());
                reply(writer, REP_INFO, &block)?;
                reply(writer, REP_ACK, &[])?;
                writer.flush().map_err(io_error("send option reply"))?;
                if option == OPT_GO {
                    return Ok(Outcome::Transmission);
                }
            }
            _ => {
                reply(writer, REP_ERR_UNSUP, format!("option {option} is not supported").as_bytes())?;
            }
        }
        writer.flush().map_err(io_error("send option reply"))?;
    }
}

/// The whole plaintext handshake (what the property tests drive); true on transmission.
#[cfg(test)]
pub(super) fn negotiate(reader: &mut impl Read, writer: &mut impl Write, volume: &Export, export_name: &str) -> Result<bool, NbdError> {
    let no_zeroes = greet(reader, writer)?;
    Ok(options(reader, writer, volume, export_name, no_zeroes, TlsState::Plain)? == Outcome::Transmission)
}
