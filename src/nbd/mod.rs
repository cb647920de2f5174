//! NBD frontend: serves a [`Volume`] to NBD clients (qemu, qemu-io, fio, nbd-client) over a
//! Unix or TCP socket. Fixed newstyle negotiation with NBD_OPT_GO/INFO; simple replies.
//!
//! Per connection: one thread reads requests and serves reads; writes go to the volume and
//! complete on its writer thread; one thread sends replies (out of order, as the protocol
//! allows), batching them into few socket writes. Malformed input closes the connection
//! with a logged reason; it never reaches the volume.

pub mod protocol;

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use protocol::*;

use crate::volume::{Volume, VolumeError, WriteOp};

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD address {0:?}: use unix:PATH or tcp:HOST:PORT")]
    BadAddress(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("client protocol error: {0}")]
    Protocol(String),
}

/// Where the export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for NbdAddress {
    type Err = NbdError;
    fn from_str(text: &str) -> Result<Self, NbdError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(NbdError::BadAddress(text.into()));
            }
            return Ok(NbdAddress::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:") {
            if address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
                return Err(NbdError::BadAddress(text.into()));
            }
            return Ok(NbdAddress::Tcp(address.to_string()));
        }
        Err(NbdError::BadAddress(text.into()))
    }
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            NbdAddress::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// Live connections: a handle on each socket (to stop reading at shutdown) and its thread.
type Connections = Vec<(Stream, JoinHandle<()>)>;

/// A running NBD export; [`NbdServer::shutdown`] stops it and drains its connections.
pub struct NbdServer {
    addresses: Vec<NbdAddress>,
    stopping: Arc<AtomicBool>,
    accept_threads: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Connections>>,
    wake: Vec<NbdAddress>,
}

impl NbdServer {
    /// Binds every address and starts accepting clients for `volume`, exported under `export_name`.
    pub fn start(addresses: &[NbdAddress], volume: Arc<Volume>, export_name: &str) -> Result<NbdServer, NbdError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Connections>> = Arc::new(Mutex::new(Vec::new()));
        let mut accept_threads = Vec::new();
        let mut bound = Vec::new();
        for address in addresses {
            let listener = match address {
                NbdAddress::Unix(path) => {
                    // A socket file left by a process that died is in the way; anything else is not ours to remove.
                    if let Ok(meta) = std::fs::symlink_metadata(path) {
                        use std::os::unix::fs::FileTypeExt;
                        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    let listener = UnixListener::bind(path).map_err(|source| NbdError::Io { context: format!("listen on {address}"), source })?;
                    Listener::Unix(listener, path.clone())
                }
                NbdAddress::Tcp(text) => {
                    let listener = TcpListener::bind(text.as_str()).map_err(|source| NbdError::Io { context: format!("listen on {address}"), source })?;
                    Listener::Tcp(listener)
                }
            };
            // The address to connect to for waking the accept loop (TCP port 0 resolved).
            let wake = match &listener {
                Listener::Unix(_, path) => NbdAddress::Unix(path.clone()),
                Listener::Tcp(l) => NbdAddress::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default()),
            };
            bound.push(wake);
            let volume = volume.clone();
            let export_name = export_name.to_string();
            let stopping = stopping.clone();
            let connections = connections.clone();
            accept_threads.push(
                std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || accept_loop(listener, volume, export_name, stopping, connections))
                    .map_err(|source| NbdError::Io { context: "start NBD accept thread".into(), source })?,
            );
        }
        Ok(NbdServer { addresses: addresses.to_vec(), stopping, accept_threads, connections, wake: bound })
    }

    pub fn addresses(&self) -> &[NbdAddress] {
        &self.addresses
    }

    /// The addresses actually bound (a TCP port 0 resolved to the real port).
    pub fn bound_addresses(&self) -> &[NbdAddress] {
        &self.wake
    }

    /// Stops accepting, lets every connection finish the requests it has in flight, closes them.
    pub fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for address in &self.wake {
            let _ = match address {
                NbdAddress::Unix(path) => UnixStream::connect(path).map(drop),
                NbdAddress::Tcp(text) => TcpStream::connect(text.as_str()).map(drop),
            };
        }
        for thread in self.accept_threads.drain(..) {
            let _ = thread.join();
        }
        let connections = std::mem::take(&mut *self.connections.lock().unwrap_or_else(|p| p.into_inner()));
        // No new requests are read; those already read complete and are answered.
        for (stream, _) in &connections {
            stream.shutdown(std::net::Shutdown::Read);
        }
        for (_, thread) in connections {
            let _ = thread.join();
        }
        for address in &self.addresses {
            if let NbdAddress::Unix(path) = address {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn accept_loop(listener: Listener, volume: Arc<Volume>, export_name: String, stopping: Arc<AtomicBool>, connections: Arc<Mutex<Connections>>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "NBD accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let Ok(control) = stream.try_clone() else { continue };
        let volume = volume.clone();
        let export_name = export_name.clone();
        let thread = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
            if let Err(error) = serve_connection(stream, &volume, &export_name) {
                tracing::warn!(error = %format!("{error:#}"), "NBD connection closed");
            }
        });
        if let Ok(thread) = thread {
            let mut connections = connections.lock().unwrap_or_else(|p| p.into_inner());
            connections.retain(|(_, t)| !t.is_finished());
            connections.push((control, thread));
        }
    }
}

fn io_error(context: &str) -> impl FnOnce(io::Error) -> NbdError + '_ {
    move |source| NbdError::Io { context: context.to_string(), source }
}

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

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN
}

/// Whether `name` selects our export. The empty name is the default export (as qemu-nbd does).
fn is_our_export(name: &str, export_name: &str) -> bool {
    name.is_empty() || name == export_name
}

fn serve_connection(stream: Stream, volume: &Arc<Volume>, export_name: &str) -> Result<(), NbdError> {
    let closer = stream.try_clone().map_err(io_error("clone socket"))?;
    let result = serve_stream(stream, volume, export_name);
    // Other handles on the socket exist (for shutdown): make the client see the close now.
    closer.shutdown(std::net::Shutdown::Both);
    result
}

fn serve_stream(stream: Stream, volume: &Arc<Volume>, export_name: &str) -> Result<(), NbdError> {
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone().map_err(io_error("clone socket"))?);
    let mut writer = BufWriter::with_capacity(256 << 10, stream);
    if !negotiate(&mut reader, &mut writer, volume, export_name)? {
        return Ok(());
    }
    transmission(reader, writer, volume)
}

/// Runs option haggling; true when the client entered the transmission phase.
fn negotiate(reader: &mut impl Read, writer: &mut impl Write, volume: &Volume, export_name: &str) -> Result<bool, NbdError> {
    writer.write_all(&NBD_MAGIC.to_be_bytes()).map_err(io_error("send greeting"))?;
    writer.write_all(&IHAVEOPT.to_be_bytes()).map_err(io_error("send greeting"))?;
    writer.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).map_err(io_error("send greeting"))?;
    writer.flush().map_err(io_error("send greeting"))?;
    let client_flags = read_u32(reader).map_err(io_error("read client flags"))?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    let size = volume.size();
    let max_io = volume.config().max_io() as u32;
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
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !is_our_export(&name, export_name) {
                    // The old-style option cannot carry an error: closing is the answer.
                    return Err(NbdError::Protocol(format!("client asked for unknown export {name:?}")));
                }
                writer.write_all(&size.to_be_bytes()).map_err(io_error("send export"))?;
                writer.write_all(&transmission_flags().to_be_bytes()).map_err(io_error("send export"))?;
                if !no_zeroes {
                    writer.write_all(&[0u8; 124]).map_err(io_error("send export"))?;
                }
                writer.flush().map_err(io_error("send export"))?;
                return Ok(true);
            }
            OPT_ABORT => {
                reply(writer, REP_ACK, &[])?;
                writer.flush().map_err(io_error("send option reply"))?;
                return Ok(false);
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
                export.extend_from_slice(&transmission_flags().to_be_bytes());
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
                    return Ok(true);
                }
            }
            _ => {
                reply(writer, REP_ERR_UNSUP, format!("option {option} is not supported").as_bytes())?;
            }
        }
        writer.flush().map_err(io_error("send option reply"))?;
    }
}

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
        _ => EIO,
    }
}

fn transmission(mut reader: impl Read, writer: BufWriter<Stream>, volume: &Arc<Volume>) -> Result<(), NbdError> {
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let reply_thread = std::thread::Builder::new()
        .name("nbd-reply".into())
        .spawn(move || send_replies(writer, reply_rx))
        .map_err(io_error("start reply thread"))?;
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

fn read_requests(reader: &mut impl Read, volume: &Arc<Volume>, replies: &mpsc::Sender<Reply>) -> Result<(), NbdError> {
    let size = volume.size();
    let max_io = volume.config().max_io();
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
        let in_range = request.offset.checked_add(length).is_some_and(|end| end <= size);
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
                    CMD_TRIM => WriteOp::Discard { offset: request.offset, length },
                    _ => WriteOp::WriteZeroes { offset: request.offset, length, fua },
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
