//! NBD over TLS with real clients: qemu-io/qemu-img (tls-creds-x509) and libnbd's nbdinfo and
//! nbdcopy (nbds:// URIs) against `run --nbd tcp:127.0.0.1:P --nbd-tls-creds DIR`, with
//! certificates made here by rcgen: a CA, a server certificate it signed (or a self-signed
//! one), client certificates signed by it and by another CA. Plaintext clients and clients
//! without a good certificate are refused; the start-time checks refuse bad credentials and
//! a non-loopback export without TLS.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

fn leaf(name: &str, purpose: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![purpose];
    params
}

fn write(dir: &Path, files: &[(&str, String)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// Writes the credential directories under `base`: `server` (CA-signed, client certs
/// required), `client` (good client), `rogue` (client cert of another CA), `anonymous` (no
/// client cert), `self-server` + `self-client` (self-signed server, no client auth),
/// `no-key` and `wrong-key` (bad server dirs).
fn pki(base: &Path) {
    let ca = new_ca("test CA");
    let other = new_ca("other CA");
    let server_key = KeyPair::generate().unwrap();
    let server = leaf("server", ExtendedKeyUsagePurpose::ServerAuth).signed_by(&server_key, &ca.cert, &ca.key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = leaf("client", ExtendedKeyUsagePurpose::ClientAuth).signed_by(&client_key, &ca.cert, &ca.key).unwrap();
    let rogue_key = KeyPair::generate().unwrap();
    let rogue = leaf("rogue", ExtendedKeyUsagePurpose::ClientAuth).signed_by(&rogue_key, &other.cert, &other.key).unwrap();
    let self_key = KeyPair::generate().unwrap();
    // QEMU's client wants the certificate it trusts to say it is a CA, even a self-signed one.
    let mut self_params = leaf("self", ExtendedKeyUsagePurpose::ServerAuth);
    self_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    self_params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    let self_signed = self_params.self_signed(&self_key).unwrap();
    write(&base.join("server"), &[("ca-cert.pem", ca.cert.pem()), ("server-cert.pem", server.pem()), ("server-key.pem", server_key.serialize_pem())]);
    write(&base.join("client"), &[("ca-cert.pem", ca.cert.pem()), ("client-cert.pem", client.pem()), ("client-key.pem", client_key.serialize_pem())]);
    write(&base.join("rogue"), &[("ca-cert.pem", ca.cert.pem()), ("client-cert.pem", rogue.pem()), ("client-key.pem", rogue_key.serialize_pem())]);
    write(&base.join("anonymous"), &[("ca-cert.pem", ca.cert.pem())]);
    write(&base.join("self-server"), &[("server-cert.pem", self_signed.pem()), ("server-key.pem", self_key.serialize_pem())]);
    write(&base.join("self-client"), &[("ca-cert.pem", self_signed.pem())]);
    write(&base.join("no-key"), &[("ca-cert.pem", ca.cert.pem()), ("server-cert.pem", server.pem())]);
    write(&base.join("wrong-key"), &[("ca-cert.pem", ca.cert.pem()), ("server-cert.pem", server.pem()), ("server-key.pem", client_key.serialize_pem())]);
}

fn tls_object(creds: &Path) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display())
}

fn nbd_opts(port: u16, tls: bool) -> String {
    format!("driver=nbd,host=127.0.0.1,port={port},export=vol0{}", if tls { ",tls-creds=tls0" } else { "" })
}

/// qemu-io over TLS with the client credentials in `creds`.
fn qemu_io_tls(creds: &Path, port: u16, commands: &[&str]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["--object", &tls_object(creds), "--image-opts", &nbd_opts(port, true)]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.output().expect("run qemu-io")
}

fn qemu_io_plain(port: u16, commands: &[&str]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["--image-opts", &nbd_opts(port, false)]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.output().expect("run qemu-io")
}

fn ok(output: &Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {}{}", stdout(output), stderr(output));
    stdout(output)
}

/// qemu-io exits 0 even when a command fails; a refused connection or failed read says so.
fn refused(output: &Output) -> bool {
    let text = format!("{}{}", stdout(output), stderr(output));
    !output.status.success() || text.contains("failed") || text.contains("Pattern verification failed") || text.contains("rror")
}

fn start(base: &Path, server_creds: &str) -> (tempfile::TempDir, Served, u16) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "vol0", "16M", &["--journal-size", "32M", "--segment-size", "8M"]);
    let port = free_tcp_port();
    let creds = base.join(server_creds);
    let served = Served::start_with_args(&dir, &["--nbd", &format!("tcp:127.0.0.1:{port}"), "--nbd-tls-creds", creds.to_str().unwrap()], &[]);
    (tmp, served, port)
}

#[test]
fn qemu_and_libnbd_over_tls_and_refusals() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("nbdcopy", "libnbd-bin");
    let pki_dir = tempfile::tempdir().unwrap();
    let base = pki_dir.path();
    pki(base);
    let (tmp, mut served, port) = start(base, "server");
    let client = base.join("client");

    // qemu-io writes and reads back through TLS with a client certificate.
    let out = ok(&qemu_io_tls(&client, port, &["write -P 0x5a 0 1M", "write -P 0xa5 4M 64k", "read -P 0x5a 0 1M", "read -P 0xa5 4M 64k"]), "qemu-io over TLS");
    assert!(!out.contains("failed"), "{out}");
    let mut expected = vec![0u8; 16 << 20];
    expected[..1 << 20].fill(0x5a);
    expected[4 << 20..(4 << 20) + (64 << 10)].fill(0xa5);
    // qemu-img copies the whole export out through TLS.
    let copied = tmp.path().join("qemu.raw");
    ok(
        &Command::new("qemu-img")
            .args(["convert", "--object", &tls_object(&client), "--image-opts", &nbd_opts(port, true), "-O", "raw", copied.to_str().unwrap()])
            .output()
            .unwrap(),
        "qemu-img convert over TLS",
    );
    assert!(std::fs::read(&copied).unwrap() == expected, "qemu-img's copy differs from what was written");

    // libnbd: nbdinfo shows the size, nbdcopy copies the same bytes.
    let uri = format!("nbds://127.0.0.1:{port}/vol0?tls-certificates={}", client.display());
    let size = ok(&Command::new("nbdinfo").args(["--size", &uri]).output().unwrap(), "nbdinfo over TLS");
    assert_eq!(size.trim(), (16u64 << 20).to_string());
    let nbdcopied = tmp.path().join("nbdcopy.raw");
    ok(&Command::new("nbdcopy").args([uri.as_str(), nbdcopied.to_str().unwrap()]).output().unwrap(), "nbdcopy over TLS");
    assert!(std::fs::read(&nbdcopied).unwrap() == expected, "nbdcopy's copy differs from what was written");

    // Plaintext clients are refused (NBD_REP_ERR_TLS_REQD) and change nothing.
    let plain = qemu_io_plain(port, &["write -P 0x66 0 4096"]);
    assert!(refused(&plain), "plaintext qemu-io was served: {}{}", stdout(&plain), stderr(&plain));
    let plain = Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/vol0")).output().unwrap();
    assert!(!plain.status.success(), "plaintext nbdinfo was served: {}", stdout(&plain));
    // Clients without a certificate of the CA are refused.
    for creds in ["rogue", "anonymous"] {
        let output = qemu_io_tls(&base.join(creds), port, &["write -P 0x77 0 4096"]);
        assert!(refused(&output), "qemu-io with {creds} credentials was served: {}{}", stdout(&output), stderr(&output));
        let uri = format!("nbds://127.0.0.1:{port}/vol0?tls-certificates={}", base.join(creds).display());
        let output = Command::new("nbdinfo").args(["--size", &uri]).output().unwrap();
        assert!(!output.status.success(), "nbdinfo with {creds} credentials was served: {}", stdout(&output));
    }
    let log = served.log_text();
    assert!(log.contains("TLS handshake") && log.contains("127.0.0.1:"), "a failed handshake is logged with the peer: {log}");
    // The volume still holds only what the good client wrote.
    let out = ok(&qemu_io_tls(&client, port, &["read -P 0x5a 0 1M"]), "qemu-io over TLS");
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(served.terminate(), Some(0), "run stops cleanly with TLS connections: {}", served.log_text());
}

#[test]
fn self_signed_server_without_client_auth() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let pki_dir = tempfile::tempdir().unwrap();
    let base = pki_dir.path();
    pki(base);
    let (_tmp, mut served, port) = start(base, "self-server");
    let client = base.join("self-client");
    let out = ok(&qemu_io_tls(&client, port, &["write -P 0x42 8192 8192", "read -P 0x42 8192 8192"]), "qemu-io over TLS");
    assert!(!out.contains("failed"), "{out}");
    let uri = format!("nbds://127.0.0.1:{port}/vol0?tls-certificates={}", client.display());
    ok(&Command::new("nbdinfo").args(["--size", &uri]).output().unwrap(), "nbdinfo over TLS");
    // A client that trusts another CA does not accept this server.
    let output = qemu_io_tls(&base.join("client"), port, &["read 0 512"]);
    assert!(refused(&output), "qemu-io trusted a server its CA did not sign: {}", stdout(&output));
    // SIGTERM stops `run` with a TLS client still connected (the pump carries the shutdown).
    let mut open = Command::new("qemu-io")
        .args(["--object", &tls_object(&client), "--image-opts", &nbd_opts(port, true)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        open.stdin.as_mut().unwrap().write_all(b"read -P 0x42 8192 8192\n").unwrap();
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(served.terminate(), Some(0), "{}", served.log_text());
    drop(open.stdin.take());
    let _ = open.wait();
}

#[test]
fn start_time_checks() {
    let pki_dir = tempfile::tempdir().unwrap();
    let base = pki_dir.path();
    pki(base);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "vol0", "16M", &[]);
    let vdir = dir.to_str().unwrap();
    let port = free_tcp_port();
    let open = format!("tcp:0.0.0.0:{port}");
    let output = cli(&["run", "--dir", vdir, "--nbd", &open]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("not a loopback address") && stderr(&output).contains("--nbd-insecure"), "{}", stderr(&output));
    for (creds, message) in [("no-key", "server-key.pem"), ("wrong-key", "does not match"), ("nosuch", "server-cert.pem")] {
        let creds = base.join(creds);
        let output = cli(&["run", "--dir", vdir, "--nbd", &open, "--nbd-tls-creds", creds.to_str().unwrap()]);
        assert!(!output.status.success());
        assert!(stderr(&output).contains(message), "{message}: {}", stderr(&output));
    }
    assert!(!dir.join("control.sock").exists(), "nothing was started");
    let mut served = Served::start_with_args(&dir, &["--nbd", &open, "--nbd-insecure"], &[]);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "--nbd-insecure serves 0.0.0.0");
    assert_eq!(served.terminate(), Some(0));
    drop(served);
    // The same settings from the volume's [run] table.
    let config = dir.join("volume.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let wrong = base.join("wrong-key");
    std::fs::write(&config, format!("{original}\n[run]\nnbd = [\"{open}\"]\nnbd_tls_creds = \"{}\"\n", wrong.display())).unwrap();
    let output = cli(&["run", "--dir", vdir]);
    assert!(!output.status.success() && stderr(&output).contains("does not match"), "{}", stderr(&output));
    std::fs::write(&config, format!("{original}\n[run]\nnbd = [\"{open}\"]\nnbd_tls = \"sometimes\"\n")).unwrap();
    let output = cli(&["run", "--dir", vdir]);
    assert!(!output.status.success() && stderr(&output).contains("run.nbd_tls"), "{}", stderr(&output));
    std::fs::write(&config, format!("{original}\n[run]\nnbd = [\"{open}\"]\n")).unwrap();
    let output = cli(&["run", "--dir", vdir]);
    assert!(!output.status.success() && stderr(&output).contains("not a loopback address"), "{}", stderr(&output));
}
