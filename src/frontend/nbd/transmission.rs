//! The transmission phase: requests read and checked on the connection's thread (reads
//! served there), write-side requests handed to the volume, replies sent by their own thread
//! in completion order, batched into few socket writes.

use std::io::{self, BufWriter, Read, Write};
use std::sync::{mpsc, Arc};

use super::protocol::*;
use super::{io_error, NbdError, Stream};
use crate::extent::Extent;
use crate::frontend::Export;
use crate::volume::{VolumeError, WriteOp};

/// A reply on its way to the client.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Vec<u8>>,
}

fn nbd_errno(error: &VolumeError) -> u32 {
    match error.errno() {
        libc::EINVAL => EINVAL,
        libc::ESHUTDOWN => ESHUTDOWN,
        libc::ENOSPC => ENOSPC,
        libc::EPERM => EPERM,
        _ => EIO,
    }
}

pub(super) fn transmission(mut reader: impl Read, writer: BufWriter<Stream>, volume: &Export) -> Result<(), NbdError> {
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let reply_thread =
        std::thread::Builder::new().name("nbd-reply".into()).spawn(move || send_replies(writer, reply_rx)).map_err(io_error("start reply thread"))?;
    let result = read_requests(&mut reader, volume, &reply_tx);
    // In-flight writes still hold reply senders; the reply thread ends after the last one.
    drop(reply_tx);
    let _ = reply_thread.join();
    result
}

fn send_replies(mut writer: BufWriter<Stream>, replies: mpsc::Receiver<Reply>) {
    while let Ok(reply) = replies.recv() {
        let mut next = Some(reply);
        // Batch whatever is ready into one socket write.
        while let Some(reply) = next {
            if writer.write_all(&simple_reply(reply.error, reply.cookie)).is_err() {
                return;
            }
            if let Some(data) = reply.data {
                if writer.write_all(&data).is_err() {
                    return;
                }
            }
            next = replies.try_recv().ok();
        }
        if writer.flush().is_err() {
            return;
        }
    }
    let _ = writer.flush();
}

fn read_requests(reader: &mut impl Read, volume: &Export, replies: &mpsc::Sender<Reply>) -> Result<(), NbdError> {
    let size = volume.size();
    let max_io = volume.max_io();
    loop {
        let mut bytes = [0u8; REQUEST_HEADER_SIZE];
        match reader.read_exact(&mut bytes) {
            Ok(()) => {}
            // The client closed without NBD_CMD_DISC, or we are shutting down: not an error.
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(io_error("read request")(error)),
        }
        let request = RequestHeader::decode(&bytes);
        if request.magic != REQUEST_MAGIC {
            return Err(NbdError::Protocol(format!("bad request magic {:#x}", request.magic)));
        }
        let cookie = request.cookie;
        let length = request.length as u64;
        let fua = request.flags & CMD_FLAG_FUA != 0;
        let extent = Extent::new(request.offset, length);
        let in_range = extent.fits(size);
        let send = |error: u32, data: Option<Vec<u8>>| {
            let _ = replies.send(Reply { cookie, error, data });
        };
        let known_flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;
        match request.command {
            CMD_WRITE => {
                if length > max_io {
                    return Err(NbdError::Protocol(format!("write of {length} bytes exceeds the advertised maximum {max_io}")));
                }
                // Read straight into fresh capacity (no zero-fill of bytes about to be overwritten).
                let mut data = Vec::with_capacity(length as usize);
                reader.by_ref().take(length).read_to_end(&mut data).map_err(io_error("read write payload"))?;
                if data.len() as u64 != length {
                    return Err(NbdError::Protocol(format!("connection closed inside a {length}-byte write payload")));
                }
                if !in_range {
                    send(ENOSPC, None);
                    continue;
                }
                if request.flags & !known_flags != 0 || length == 0 {
                    send(EINVAL, None);
                    continue;
                }
                let replies = replies.clone();
                volume.submit(
                    WriteOp::Write { offset: request.offset, data: Arc::new(data), fua },
                    Box::new(move |result| {
                        let _ = replies.send(Reply { cookie, error: result.as_ref().map_or_else(nbd_errno, |_| 0), data: None });
                    }),
                );
            }
            CMD_READ => {
                if !in_range || length == 0 || length > max_io || request.flags & !known_flags != 0 {
                    send(EINVAL, None);
                    continue;
                }
                let mut data = vec![0u8; length as usize];
                match volume.read(request.offset, &mut data) {
                    Ok(()) => send(0, Some(data)),
                    Err(error) => send(nbd_errno(&error), None),
                }
            }
            CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {
                let op = match request.command {
                    CMD_FLUSH => WriteOp::Flush,
                    _ if !in_range => {
                        send(if request.command == CMD_TRIM { EINVAL } else { ENOSPC }, None);
                        continue;
                    }
                    CMD_TRIM => WriteOp::Discard { extent },
                    _ => WriteOp::WriteZeroes { extent, fua },
                };
                if request.flags & !known_flags != 0 {
                    send(EINVAL, None);
                    continue;
                }
                let replies = replies.clone();
                volume.submit(
                    op,
                    Box::new(move |result| {
                        let _ = replies.send(Reply { cookie, error: result.as_ref().map_or_else(nbd_errno, |_| 0), data: None });
                    }),
                );
            }
            CMD_DISC => return Ok(()),
            other => {
                tracing::debug!(command = other, "unsupported NBD command");
                send(EINVAL, None);
            }
        }
    }
}

#[cfg(test)]
#[path = "transmission_proptests.rs"]
mod proptests;
