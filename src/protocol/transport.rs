//! The QUIC transport of the replication link: quinn endpoints and connection settings for a
//! long-lived bulk stream over a WAN (windows, congestion control, keep-alives, path MTU,
//! socket buffers), on top of the mutual TLS of `tls.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::tls::{client_crypto, server_crypto, AllowList, Identity, TlsError};

/// Seconds without any packet from the peer after which a connection is declared dead,
/// unless a mirror or the applier sets its own.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 15;

/// The congestion controller of the side that sends the data (the mirror's sender).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// Paces at the measured bottleneck rate; random loss costs little. The default.
    #[default]
    Bbr,
    /// Loss-based (halves on loss): gentler on shared links with deep buffers and no random
    /// loss, collapses on lossy long paths.
    Cubic,
}

/// Transport settings for a long-lived bulk stream: windows large enough for a WAN
/// bandwidth-delay product, keep-alives so an idle mirror stays connected. The connection
/// is declared dead after `idle_timeout` without a packet (QUIC uses the smaller of the two
/// sides' values); keep-alives go out at a third of it so an idle link never hits it.
fn transport(idle_timeout: Duration, congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    transport.receive_window(quinn::VarInt::from_u32(128 << 20));
    transport.send_window(128 << 20);
    transport.keep_alive_interval(Some(idle_timeout / 3));
    // BBR paces to the measured bottleneck bandwidth instead of halving on every loss: a WAN
    // path with 1% random loss keeps most of its capacity (Cubic's rate falls to about
    // MSS/RTT * 1.2/sqrt(loss), a few hundred KB/s at 80 ms RTT).
    match congestion {
        // quinn's BBR, its window held to two bandwidth-delay products (`congestion.rs`).
        Congestion::Bbr => transport.congestion_controller_factory(Arc::new(super::congestion::BoundedBbrConfig::default())),
        Congestion::Cubic => transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
    };
    // Path MTU discovery up to jumbo frames (common on storage networks): on such a path
    // (and on loopback) each packet carries four times the data, for the same per-packet CPU
    // (crypto, syscalls, acknowledgements) on both ends. Where the path is plain Ethernet
    // the probes are lost and packets stay at quinn's 1452-byte default.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(LARGEST_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    let millis = u32::try_from(idle_timeout.as_millis()).unwrap_or(u32::MAX);
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(millis))));
    Arc::new(transport)
}

/// The sender's side: present `identity`, accept only the applier whose fingerprint is pinned.
pub fn client_config(identity: &Identity, applier_fingerprint: &str, idle_timeout: Duration, congestion: Congestion) -> Result<quinn::ClientConfig, TlsError> {
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto(identity, applier_fingerprint)?));
    client.transport_config(transport(idle_timeout, congestion));
    Ok(client)
}

/// The applier's side: present `identity`, accept only clients `allowed` says yes to.
pub fn server_config(identity: &Identity, allowed: AllowList, idle_timeout: Duration) -> Result<quinn::ServerConfig, TlsError> {
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto(identity, allowed)?));
    server.transport_config(transport(idle_timeout, Congestion::default()));
    Ok(server)
}

/// UDP socket buffers asked for. The kernel default (about 208 KiB) overflows at a few
/// hundred MB/s and every drop costs QUIC a congestion-window cut, so ask for more; root may
/// exceed `net.core.rmem_max`/`wmem_max` (SO_RCVBUFFORCE), others get what the limits allow.
const SOCKET_BUFFER_BYTES: usize = 16 << 20;

/// A UDP socket bound to `address` with large send and receive buffers, for quinn.
pub fn bind_udp(address: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    enlarge_socket_buffers(&socket, SOCKET_BUFFER_BYTES);
    Ok(socket)
}

/// The largest UDP payload path MTU discovery looks for: inside a jumbo frame, and small
/// enough that quinn's batches of 10 segments fit one 64 KiB UDP GSO send (with 8952-byte
/// datagrams the kernel refused whole batches with EMSGSIZE, which quinn took for loss and
/// then for an MTU black hole, falling back to 1200 bytes).
pub const LARGEST_UDP_PAYLOAD: u16 = 6500;

/// A quinn endpoint on [`bind_udp`]; a server when `server` is given. It accepts datagrams up
/// to [`LARGEST_UDP_PAYLOAD`] so the peer's path MTU discovery may go that far.
pub fn endpoint(address: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    endpoint_with(address, server, quinn::EndpointConfig::default())
}

/// The applier's endpoint: a server for `server`, whose stateless resets are keyed by its
/// `identity` (`stateless_reset_key`), so an applier that restarts after a crash answers a
/// sender still talking to its predecessor with a reset the sender believes, and the sender
/// reconnects at once instead of after its idle timeout (15 s by default).
pub fn applier_endpoint(address: std::net::SocketAddr, server: quinn::ServerConfig, identity: &Identity) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::new(Arc::new(stateless_reset_key(identity)));
    // quinn's default connection ids carry a keyed hash it checks before answering a packet
    // with a reset; with a key per start, a restarted applier dropped its predecessor's
    // packets instead. A key kept across starts would not do either: those ids have 2^24
    // values per key, and the key shows in them, so anyone could collect the reset token of
    // every id the applier will ever use. Random 16-byte ids instead: a reset is only ever
    // issued for an id no live connection has, and nobody can guess a future one.
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(CONNECTION_ID_BYTES)));
    endpoint_with(address, Some(server), config)
}

/// The length of the applier's connection ids (QUIC allows up to 20).
const CONNECTION_ID_BYTES: usize = 16;

/// The key of the applier's stateless reset tokens (RFC 9000, 10.3), the same at every start
/// of one identity: derived from its private key, which is secret and kept.
fn stateless_reset_key(identity: &Identity) -> ring::hmac::Key {
    use sha2::Digest;
    let secret = sha2::Sha256::new().chain_update(b"ublk-mirror QUIC stateless reset key v1\0").chain_update(identity.key.secret_der()).finalize();
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
}

fn endpoint_with(address: std::net::SocketAddr, server: Option<quinn::ServerConfig>, mut config: quinn::EndpointConfig) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for quinn"))?;
    config.max_udp_payload_size(LARGEST_UDP_PAYLOAD).map_err(|e| std::io::Error::other(format!("QUIC endpoint: {e}")))?;
    quinn::Endpoint::new(config, server, bind_udp(address)?, runtime)
}

/// Raises a socket's send and receive buffers to `bytes`: first with the FORCE options
/// (root may exceed the sysctl limits), else within the limits. Best effort: a socket with
/// default buffers still works, only slower.
pub fn enlarge_socket_buffers(socket: &impl std::os::fd::AsRawFd, bytes: usize) {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        for option in [force, plain] {
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local c_int;
            // the descriptor is valid for the call (borrowed from `socket`).
            let result = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if result == 0 {
                break;
            }
        }
    }
}

/// The fingerprint of the certificate the peer presented (mutual TLS: every accepted
/// connection has one).
pub fn peer_fingerprint(connection: &quinn::Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<rustls::pki_types::CertificateDer<'static>>>()?;
    chain.first().map(|der| crate::identity::fingerprint_of_der(der))
}

/// The TLS server name a connection is opened with, carrying the sender's id: the applier
/// tells a reconnect of the same mirror (which may supersede its own stale session) from a
/// second sender of the same volume (which is refused while the first is connected).
/// Switchovers and restores connect as plain `applier`.
pub fn sender_server_name(sender: u64) -> String {
    format!("s{sender:016x}.applier")
}

/// The sender id an accepted connection was opened with (see [`sender_server_name`]); `None`
/// for a connection that carries none (a switchover, a restore, an older release).
pub fn sender_id(connection: &quinn::Connection) -> Option<u64> {
    let data = connection.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?;
    let name = data.server_name?;
    let hex = name.strip_prefix('s')?.strip_suffix(".applier")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn identity(dir: &Path, name: &str) -> Identity {
        crate::identity::create(dir, name).unwrap();
        Identity::load(dir).unwrap()
    }

    /// Path MTU discovery goes past Ethernet's 1452 bytes where the path allows it (loopback)
    /// without quinn ever mistaking full GSO batches for a black hole (lost packets).
    #[test]
    fn mtu_discovery_finds_large_datagrams_on_loopback() {
        let tmp = tempfile::tempdir().unwrap();
        let applier = identity(&tmp.path().join("a"), "applier");
        let source = identity(&tmp.path().join("s"), "vol0");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let allow = source.fingerprint.clone();
            let server =
                endpoint("127.0.0.1:0".parse().unwrap(), Some(server_config(&applier, Arc::new(move |fp| fp == allow), Duration::from_secs(15)).unwrap()))
                    .unwrap();
            let address = server.local_addr().unwrap();
            let total = 64usize << 20;
            let receiver = tokio::spawn(async move {
                let connection = server.accept().await.unwrap().await.unwrap();
                let (_send, mut recv) = connection.accept_bi().await.unwrap();
                let mut received = 0;
                while let Some(chunk) = recv.read_chunk(1 << 20, true).await.unwrap() {
                    received += chunk.bytes.len();
                }
                connection.close(0u32.into(), b"done");
                received
            });
            let mut client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
            client.set_default_client_config(client_config(&source, &applier.fingerprint, Duration::from_secs(15), Congestion::default()).unwrap());
            let connection = client.connect(address, "applier").unwrap().await.unwrap();
            let (mut send, _recv) = connection.open_bi().await.unwrap();
            let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
            for _ in 0..total >> 20 {
                send.write_chunk(chunk.clone()).await.unwrap();
            }
            send.finish().unwrap();
            assert_eq!(receiver.await.unwrap(), total);
            let path = connection.stats().path;
            assert!(path.current_mtu > 1452 && path.current_mtu <= LARGEST_UDP_PAYLOAD, "MTU after 64 MiB on loopback: {path:?}");
            assert_eq!(path.black_holes_detected, 0, "{path:?}");
        });
    }
}
