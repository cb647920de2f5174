//! Mutual TLS 1.3 for the replication link, authenticated by pinned SHA-256 certificate
//! fingerprints on both sides: no CA, no names. Anything else is refused during the handshake.
//! (The QUIC transport built on it is `transport.rs`.)

use std::path::Path;
use std::sync::Arc;

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
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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

/// The sender's TLS side: present `identity`, accept only the applier whose fingerprint is
/// pinned.
pub fn client_crypto(identity: &Identity, applier_fingerprint: &str) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { fingerprint: applier_fingerprint.to_string(), provider }))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
}

/// The applier's TLS side: present `identity`, accept only clients `allowed` says yes to.
pub fn server_crypto(identity: &Identity, allowed: AllowList) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AllowedClients { allowed, provider }))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transport::{client_config, server_config, Congestion};
    use std::time::Duration;

    fn identity(dir: &Path, name: &str) -> Identity {
        crate::identity::create(dir, name).unwrap();
        Identity::load(dir).unwrap()
    }

    async fn try_connect(server: &Identity, allow: &str, client: &Identity, pin: &str) -> Result<Vec<u8>, String> {
        let allow = allow.to_string();
        let endpoint =
            quinn::Endpoint::server(server_config(server, Arc::new(move |fp| fp == allow), Duration::from_secs(15)).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
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
}
