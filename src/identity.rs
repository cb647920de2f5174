//! A node's identity for mutually authenticated QUIC: a private key and a self-signed
//! certificate, known to peers by the SHA-256 fingerprint of the certificate (pinned, no CA).

use std::path::{Path, PathBuf};

use sha2::Digest;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generate key and certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("invalid fingerprint {0:?}: expected \"sha256:\" followed by 64 lowercase hex digits")]
    BadFingerprint(String),
}

pub const KEY_FILE: &str = "key.pem";
pub const CERT_FILE: &str = "cert.pem";

/// Creates `dir/key.pem` (mode 0600) and `dir/cert.pem` and returns the certificate's fingerprint.
pub fn create(dir: &Path, subject: &str) -> Result<String, IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |context: String| move |source| IdentityError::Io { context, source };
    crate::permissions::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let certified = rcgen::generate_simple_self_signed(vec![subject.to_string()])?;
    let key_path = dir.join(KEY_FILE);
    let mut key = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key_path).map_err(io(format!("create {}", key_path.display())))?;
    key.write_all(certified.key_pair.serialize_pem().as_bytes()).map_err(io(format!("write {}", key_path.display())))?;
    key.sync_all().map_err(io(format!("sync {}", key_path.display())))?;
    let cert_path = dir.join(CERT_FILE);
    crate::fsutil::write_atomic(&cert_path, certified.cert.pem().as_bytes()).map_err(io(format!("write {}", cert_path.display())))?;
    Ok(fingerprint_of_der(certified.cert.der()))
}

/// `sha256:` + 64 lowercase hex digits of the DER certificate.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    let digest = sha2::Sha256::digest(der);
    let mut text = String::with_capacity(71);
    text.push_str("sha256:");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// Fingerprint of the certificate stored in `dir/cert.pem`.
pub fn fingerprint(dir: &Path) -> Result<String, IdentityError> {
    let path = dir.join(CERT_FILE);
    let pem = std::fs::read_to_string(&path).map_err(|source| IdentityError::Io { context: format!("read {}", path.display()), source })?;
    let der = pem_certificate_der(&pem).ok_or(IdentityError::NoCertificate { path })?;
    Ok(fingerprint_of_der(&der))
}

fn pem_certificate_der(pem: &str) -> Option<Vec<u8>> {
    let body: String =
        pem.lines().skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----")).skip(1).take_while(|l| !l.starts_with("-----END CERTIFICATE-----")).collect();
    decode_base64(&body)
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut accumulator = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            accumulator |= value(c)? << (18 - 6 * i);
        }
        let bytes = accumulator.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Checks the textual form of a fingerprint and returns it normalised.
pub fn parse_fingerprint(text: &str) -> Result<String, IdentityError> {
    let hex = text.strip_prefix("sha256:").ok_or_else(|| IdentityError::BadFingerprint(text.into()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(IdentityError::BadFingerprint(text.into()));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_fingerprint_is_stable_and_well_formed() {
        let tmp = tempfile::tempdir().unwrap();
        let printed = create(tmp.path(), "vol0").unwrap();
        assert_eq!(fingerprint(tmp.path()).unwrap(), printed);
        parse_fingerprint(&printed).unwrap();
        assert!(parse_fingerprint("sha256:ABC").is_err());
        assert!(create(tmp.path(), "vol0").is_err(), "never overwrites a key");
        let mode = std::fs::metadata(tmp.path().join(KEY_FILE)).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
