//! NBD frontend: serves a [`Volume`] to NBD clients (qemu, qemu-io, fio, nbd-client) over a
//! Unix or TCP socket. Fixed newstyle negotiation with NBD_OPT_GO/INFO; simple replies.
//!
//! Per connection: one thread reads requests and serves reads; writes go to the volume and
//! complete on its writer thread; one thread sends replies (out of order, as the protocol
//! allows), batching them into few socket writes. With TLS (`tls`), STARTTLS is required
//! before any other option and a pump thread carries the TLS stream. Malformed input closes the connection
//! with a logged reason; it never reaches the volume.

mod negotiation;
pub mod protocol;
pub mod tls;
mod transmission;

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::Export;
pub use crate::address::NbdAddress;
use negotiation::{Outcome, TlsState};
pub use tls::{NbdTls, TlsCredsError, TlsMode};

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("client protocol error: {0}")]
    Protocol(String),
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

pub(super) enum Stream {
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
    /// With `tls`, every connection (TCP or Unix) must STARTTLS before anything else.
    pub fn start(addresses: &[NbdAddress], export: impl Into<Export>, export_name: &str, tls: Option<NbdTls>) -> Result<NbdServer, NbdError> {
        let volume: Export = export.into();
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
                    // NBD is unauthenticated: whoever can connect reads and writes the disk.
                    crate::permissions::make_private(path).map_err(|source| NbdError::Io { context: format!("chmod 0600 {address}"), source })?;
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
            let tls = tls.clone();
            accept_threads.push(
                std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || accept_loop(listener, volume, export_name, tls, stopping, connections))
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

fn accept_loop(listener: Listener, volume: Export, export_name: String, tls: Option<NbdTls>, stopping: Arc<AtomicBool>, connections: Arc<Mutex<Connections>>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| (Stream::Unix(s), "unix".to_string())),
            Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                (Stream::Tcp(s), peer.to_string())
            }),
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "NBD accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let Ok(control) = stream.try_clone() else { continue };
        let volume = volume.clone();
        let export_name = export_name.clone();
        let tls = tls.clone();
        let thread = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
            if let Err(error) = serve_connection(stream, &volume, &export_name, tls.as_ref()) {
                tracing::warn!(%peer, error = %crate::describe(&error), "NBD connection closed");
            }
        });
        if let Ok(thread) = thread {
            let mut connections = connections.lock().unwrap_or_else(|p| p.into_inner());
            connections.retain(|(_, t)| !t.is_finished());
            connections.push((control, thread));
        }
    }
}

pub(super) fn io_error(context: &str) -> impl FnOnce(io::Error) -> NbdError + '_ {
    move |source| NbdError::Io { context: context.to_string(), source }
}

fn serve_connection(stream: Stream, volume: &Export, export_name: &str, tls: Option<&NbdTls>) -> Result<(), NbdError> {
    let closer = stream.try_clone().map_err(io_error("clone socket"))?;
    let result = serve_stream(stream, volume, export_name, tls);
    // Other handles on the socket exist (for shutdown): make the client see the close now.
    closer.shutdown(std::net::Shutdown::Both);
    result
}

fn serve_stream(stream: Stream, volume: &Export, export_name: &str, tls: Option<&NbdTls>) -> Result<(), NbdError> {
    // Unix sockets are private to the volume's owner (0600): TLS is for TCP.
    let tls = if matches!(stream, Stream::Tcp(_)) { tls } else { None };
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone().map_err(io_error("clone socket"))?);
    let mut writer = BufWriter::with_capacity(256 << 10, stream);
    let no_zeroes = negotiation::greet(&mut reader, &mut writer)?;
    let state = if tls.is_some() { TlsState::Required } else { TlsState::Plain };
    match negotiation::options(&mut reader, &mut writer, volume, export_name, no_zeroes, state)? {
        Outcome::Abort => Ok(()),
        Outcome::Transmission => transmission::transmission(reader, writer, volume),
        Outcome::StartTls => {
            let Some(tls) = tls else { return Err(NbdError::Protocol("STARTTLS without TLS".into())) };
            // The client waits for STARTTLS's reply before its ClientHello: nothing is buffered.
            if !reader.buffer().is_empty() {
                return Err(NbdError::Protocol("client sent data after NBD_OPT_STARTTLS before its reply".into()));
            }
            let stream = writer.into_inner().map_err(|e| NbdError::Io { context: "send option reply".into(), source: e.into_error() })?;
            drop(reader);
            let (plain, pump) = match stream {
                Stream::Tcp(tcp) => tls::start(tls, tcp).map_err(io_error("TLS"))?,
                Stream::Unix(_) => return Err(NbdError::Protocol("TLS is served on TCP exports only".into())),
            };
            let result = serve_plaintext(Stream::Unix(plain), volume, export_name, no_zeroes);
            let _ = pump.join();
            result
        }
    }
}

/// Option haggling restarted inside TLS, then the transmission phase, on the pump's plaintext end.
fn serve_plaintext(stream: Stream, volume: &Export, export_name: &str, no_zeroes: bool) -> Result<(), NbdError> {
    let closer = stream.try_clone().map_err(io_error("clone socket"))?;
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone().map_err(io_error("clone socket"))?);
    let mut writer = BufWriter::with_capacity(256 << 10, stream);
    let result = match negotiation::options(&mut reader, &mut writer, volume, export_name, no_zeroes, TlsState::Active) {
        Ok(Outcome::Transmission) => transmission::transmission(reader, writer, volume),
        Ok(_) => Ok(()),
        Err(error) => Err(error),
    };
    // The pump sees EOF, sends close_notify and ends.
    closer.shutdown(std::net::Shutdown::Both);
    result
}
