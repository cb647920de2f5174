//! NBD over TLS: NBD_OPT_STARTTLS with rustls (TLS 1.3 only), credentials from a directory
//! laid out as QEMU's `tls-creds-x509` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`),
//! so one directory serves qemu-nbd and us.
//!
//! Client certificates: when the directory holds `ca-cert.pem`, every client must present a
//! certificate signed by that CA (qemu-nbd's default `verify-peer=yes`); without it, clients
//! are not authenticated (only encrypted). TLS-PSK is not offered: rustls implements no
//! external pre-shared keys (docs/security.md).
//!
//! Threading: the transmission phase reads requests on one thread and writes replies on
//! another, each with its own handle on the socket (`Stream::try_clone`). A
//! `rustls::ServerConnection` cannot be split that way, so after the handshake one pump thread
//! per connection owns the connection and the TCP socket and bridges them to one end of a
//! `UnixStream::pair()`; the negotiation (restarted inside TLS) and the transmission run
//! unchanged on the other, plaintext, in-process end. The pump polls both descriptors
//! (non-blocking, bounded buffers both ways) and carries half-closes across: the client's
//! close (or `NbdServer::shutdown`'s read shutdown of the TCP socket) becomes EOF on the
//! plaintext end, which drains the replies in flight; the plaintext end's close becomes
//! close_notify and the TCP write shutdown.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// Whether clients must use TLS. `off` lets the command line turn off creds set in the
/// volume's `[run]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Require,
    Off,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "require" => Ok(TlsMode::Require),
            "off" => Ok(TlsMode::Off),
            other => Err(format!("{other:?} is not an NBD TLS mode: use require or off")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsCredsError {
    #[error("read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{} does not match {}: {source}", key.display(), cert.display())]
    Mismatch { key: PathBuf, cert: PathBuf, source: rustls::Error },
}

/// The server side of NBD's TLS: what STARTTLS hands each connection.
#[derive(Clone)]
pub struct NbdTls {
    config: Arc<ServerConfig>,
    /// Whether client certificates are required (the directory has `ca-cert.pem`).
    pub client_auth: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls").field("client_auth", &self.client_auth).finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsCredsError> {
    std::fs::read(path).map_err(|source| TlsCredsError::Read { path: path.to_path_buf(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsCredsError> {
    let bytes = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsCredsError::Invalid { path: path.to_path_buf(), message: format!("not PEM certificates: {e}") })?;
    if certs.is_empty() {
        return Err(TlsCredsError::Invalid { path: path.to_path_buf(), message: "holds no PEM certificate".into() });
    }
    Ok(certs)
}

impl NbdTls {
    /// Loads `dir` (QEMU's `tls-creds-x509` layout); every error names the file at fault, and a
    /// key that does not belong to the certificate is refused here, before anything listens.
    pub fn load(dir: &Path) -> Result<NbdTls, TlsCredsError> {
        let cert_path = dir.join("server-cert.pem");
        let key_path = dir.join("server-key.pem");
        let ca_path = dir.join("ca-cert.pem");
        let chain = certificates(&cert_path)?;
        let key_bytes = read_file(&key_path)?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .map_err(|e| TlsCredsError::Invalid { path: key_path.clone(), message: format!("not a PEM private key: {e}") })?
            .ok_or_else(|| TlsCredsError::Invalid { path: key_path.clone(), message: "holds no PEM private key".into() })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsCredsError::Invalid { path: dir.to_path_buf(), message: e.to_string() })?;
        let client_auth = ca_path.exists();
        let builder = if client_auth {
            let mut roots = RootCertStore::empty();
            for cert in certificates(&ca_path)? {
                roots.add(cert).map_err(|e| TlsCredsError::Invalid { path: ca_path.clone(), message: format!("not a usable CA certificate: {e}") })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsCredsError::Invalid { path: ca_path.clone(), message: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(|source| match source {
            rustls::Error::InconsistentKeys(_) => TlsCredsError::Mismatch { key: key_path.clone(), cert: cert_path.clone(), source },
            other => TlsCredsError::Invalid { path: key_path.clone(), message: other.to_string() },
        })?;
        Ok(NbdTls { config: Arc::new(config), client_auth })
    }
}

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Plaintext held in the pump per direction before it stops reading that side.
const PUMP_LIMIT: usize = 1 << 20;

/// Runs the TLS handshake on `tcp` (the client just got STARTTLS's ACK) and starts the pump;
/// returns the plaintext end and the pump's thread (it ends when both sides are closed).
pub(super) fn start(tls: &NbdTls, tcp: TcpStream) -> io::Result<(UnixStream, std::thread::JoinHandle<()>)> {
    let mut connection = ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
    let mut tcp = tcp;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    while connection.is_handshaking() {
        if let Err(error) = connection.complete_io(&mut tcp) {
            // Tell the client why (an alert) if it still listens.
            let _ = connection.write_tls(&mut tcp);
            return Err(io::Error::new(error.kind(), format!("TLS handshake: {error}")));
        }
    }
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    let (inner, outer) = UnixStream::pair()?;
    let thread = std::thread::Builder::new().name("nbd-tls".into()).spawn(move || {
        if let Err(error) = pump(connection, tcp, outer) {
            tracing::debug!(%error, "NBD TLS connection ended");
        }
    })?;
    Ok((inner, thread))
}

fn would_block(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// Moves bytes between the TLS connection on `tcp` and the plaintext `unix` end until both
/// directions are closed (or either socket fails).
fn pump(mut connection: ServerConnection, mut tcp: TcpStream, mut unix: UnixStream) -> io::Result<()> {
    tcp.set_nonblocking(true)?;
    unix.set_nonblocking(true)?;
    connection.set_buffer_limit(None);
    let mut to_unix: Vec<u8> = Vec::new();
    let mut from_unix: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 64 << 10];
    let (mut tcp_eof, mut unix_eof, mut unix_shut, mut close_sent) = (false, false, false, false);
    // Plaintext the client sent right behind its handshake.
    tcp_eof |= drain_plaintext(&mut connection, &mut to_unix, &mut buffer)?;
    loop {
        while !to_unix.is_empty() {
            match unix.write(&to_unix) {
                Ok(n) => drop(to_unix.drain(..n)),
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if tcp_eof && to_unix.is_empty() && !unix_shut {
            let _ = unix.shutdown(std::net::Shutdown::Write);
            unix_shut = true;
        }
        if !from_unix.is_empty() {
            // Unlimited buffer (set below): the connection takes it all; unix is read again
            // only once the TLS records are out, which bounds what is held.
            connection.writer().write_all(&from_unix)?;
            from_unix.clear();
        }
        if unix_eof && from_unix.is_empty() && !close_sent {
            connection.send_close_notify();
            close_sent = true;
        }
        while connection.wants_write() {
            match connection.write_tls(&mut tcp) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if close_sent && !connection.wants_write() {
            // Everything the server had to say is out; the client's half no longer matters.
            let _ = tcp.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        let mut tcp_flags = PollFlags::empty();
        if !tcp_eof && to_unix.len() < PUMP_LIMIT {
            tcp_flags |= PollFlags::IN;
        }
        if connection.wants_write() {
            tcp_flags |= PollFlags::OUT;
        }
        let mut unix_flags = PollFlags::empty();
        if !unix_eof && !connection.wants_write() {
            unix_flags |= PollFlags::IN;
        }
        if !to_unix.is_empty() {
            unix_flags |= PollFlags::OUT;
        }
        let mut fds = [PollFd::new(&tcp, tcp_flags), PollFd::new(&unix, unix_flags)];
        match poll(&mut fds, -1) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let (tcp_ready, unix_ready) = (fds[0].revents(), fds[1].revents());
        let woke = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
        if tcp_flags.contains(PollFlags::IN) && tcp_ready.intersects(woke) {
            match connection.read_tls(&mut tcp) {
                Ok(0) => tcp_eof = true,
                Ok(_) => {
                    if let Err(error) = connection.process_new_packets() {
                        let _ = connection.write_tls(&mut tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                    }
                    tcp_eof |= drain_plaintext(&mut connection, &mut to_unix, &mut buffer)?;
                }
                Err(e) if would_block(&e) => {}
                // A reset client: the plaintext side sees EOF and its writes fail.
                Err(_) => tcp_eof = true,
            }
        }
        if unix_flags.contains(PollFlags::IN) && unix_ready.intersects(woke) {
            match unix.read(&mut buffer) {
                Ok(0) => unix_eof = true,
                Ok(n) => from_unix.extend_from_slice(&buffer[..n]),
                Err(e) if would_block(&e) => {}
                Err(_) => unix_eof = true,
            }
        }
        if tcp_eof && unix_eof && to_unix.is_empty() && !connection.wants_write() && from_unix.is_empty() && close_sent {
            return Ok(());
        }
    }
}

/// Moves decrypted bytes into `to`; true when the client sent close_notify.
fn drain_plaintext(connection: &mut ServerConnection, to: &mut Vec<u8>, buffer: &mut [u8]) -> io::Result<bool> {
    loop {
        match connection.reader().read(buffer) {
            Ok(0) => return Ok(true),
            Ok(n) => to.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}
