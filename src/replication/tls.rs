//! Mutual TLS 1.3 for the replication link, authenticated by pinned SHA-256 certificate
//! fingerprints on both sides: no CA, no names. Anything else is refused during the handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{fingerprint_of_der, CERT_FILE, KEY_FILE};

pub const ALPN: &[u8] = b"ublk-mirror/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}: no certificate or key in the PEM file")]
    MissingPem(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// A node's certificate chain and key, loaded from an identity directory.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: String,
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| TlsError::Io { context: format!("read {}", path.display()), source })
        };
        let cert_pem = read(CERT_FILE)?;
        let key_pem = read(KEY_FILE)?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice()).filter_map(Result::ok).collect();
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| TlsError::MissingPem(dir.join(KEY_FILE).display().to_string()))?;
        let first = chain.first().ok_or_else(|| TlsError::MissingPem(dir.join(CERT_FILE).display().to_string()))?;
        let fingerprint = fingerprint_of_der(first);
        Ok(Identity { chain, key, fingerprint })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Decides which client fingerprints an applier accepts (re-read on every handshake so
/// `applier allow` takes effect without a restart).
pub type AllowList = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Debug)]
struct PinnedServer {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(&self, end_entity: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint_of_der(end_entity);
        if presented == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("applier presented certificate {presented}, but {} is pinned", self.fingerprint)))
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

struct AllowedClients {
    allowed: AllowList,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for AllowedClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AllowedClients")
    }
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        let presented = fingerprint_of_der(end_entity);
        if (self.allowed)(&presented) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %presented, "refused a source whose certificate is not allowed");
            Err(rustls::Error::General(format!("source certificate {presented} is not allowed on this applier")))
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

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
        Congestion::Bbr => transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
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
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { fingerprint: applier_fingerprint.to_string(), provider }))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport(idle_timeout, congestion));
    Ok(client)
}

/// The applier's side: present `identity`, accept only clients `allowed` says yes to.
pub fn server_config(identity: &Identity, allowed: AllowList, idle_timeout: Duration) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AllowedClients { allowed, provider }))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
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
    crate::fsutil::enlarge_socket_buffers(&socket, SOCKET_BUFFER_BYTES);
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
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for quinn"))?;
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(LARGEST_UDP_PAYLOAD).map_err(|e| std::io::Error::other(format!("QUIC endpoint: {e}")))?;
    quinn::Endpoint::new(config, server, bind_udp(address)?, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &Path, name: &str) -> Identity {
        crate::identity::create(dir, name).unwrap();
        Identity::load(dir).unwrap()
    }

    async fn try_connect(server: &Identity, allow: &str, client: &Identity, pin: &str) -> Result<Vec<u8>, String> {
        let allow = allow.to_string();
        let endpoint = quinn::Endpoint::server(server_config(server, Arc::new(move |fp| fp == allow), Duration::from_secs(15)).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let address = endpoint.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let connection = endpoint.accept().await?.await.ok()?;
            let (mut send, mut recv) = connection.accept_bi().await.ok()?;
            let data = recv.read_to_end(1024).await.ok()?;
            send.write_all(&data).await.ok()?;
            send.finish().ok()?;
            connection.closed().await;
            Some(())
        });
        let mut client_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client_endpoint.set_default_client_config(client_config(client, pin, Duration::from_secs(15), Congestion::default()).unwrap());
        let result = async {
            let connection = client_endpoint.connect(address, "applier").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(b"ping").await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let echo = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
            connection.close(0u32.into(), b"done");
            Ok(echo)
        }
        .await;
        accept.abort();
        result
    }

    #[test]
    fn pinned_fingerprints_on_both_sides() {
        let tmp = tempfile::tempdir().unwrap();
        let applier = identity(&tmp.path().join("a"), "applier");
        let source = identity(&tmp.path().join("s"), "vol0");
        let stranger = identity(&tmp.path().join("x"), "stranger");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let ok = try_connect(&applier, &source.fingerprint, &source, &applier.fingerprint).await;
            assert_eq!(ok.unwrap(), b"ping");
            let wrong_pin = try_connect(&applier, &source.fingerprint, &source, &stranger.fingerprint).await;
            assert!(wrong_pin.unwrap_err().contains("pinned"), "wrong applier fingerprint is refused");
            let unknown_source = try_connect(&applier, &source.fingerprint, &stranger, &applier.fingerprint).await;
            assert!(unknown_source.is_err(), "unknown source is refused");
        });
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
            let server = endpoint("127.0.0.1:0".parse().unwrap(), Some(server_config(&applier, Arc::new(move |fp| fp == allow), Duration::from_secs(15)).unwrap())).unwrap();
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
