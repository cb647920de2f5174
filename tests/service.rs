//! Running as a service: configuration files and their errors, systemd units (verified by
//! systemd-analyze), sd_notify, the human status table, applier metrics.

mod common;
use common::*;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}:\n{text}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn append(path: &Path, text: &str) {
    let mut contents = std::fs::read_to_string(path).unwrap();
    contents.push_str(text);
    std::fs::write(path, contents).unwrap();
}

/// Runs `args`, expects exit 1 with an error naming `file` and `key`, and that nothing
/// under `dir` changed.
fn refused(args: &[&str], dir: &Path, file: &Path, key: &str) {
    let before = snapshot(dir);
    let output = cli(args);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{args:?} should fail: {message}");
    assert!(message.contains(&file.display().to_string()), "the error names the file {}: {message}", file.display());
    assert!(message.contains(key), "the error names the key {key}: {message}");
    assert_eq!(snapshot(dir), before, "a refused start changes nothing");
}

/// Names and contents of the regular files under `dir` (small state files only).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml" || e == "json") || path.file_name().is_some_and(|n| n == "allowed") {
                files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn invalid_configuration_is_refused_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    create_volume(&vdir, "vol0", "16M", &["--journal-size", "32M", "--segment-size", "8M"]);
    let config = vdir.join("volume.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    assert!(original.contains("# [run]") && original.contains("# metrics ="), "volume.toml documents the [run] keys:\n{original}");
    let run = ["run", "--dir", vdir.to_str().unwrap()];

    // Nothing configured and no flag: a clear error pointing at the file.
    refused(&run, &vdir, &config, "run.nbd");
    let cases: &[(&str, &str)] = &[
        ("\n[run]\nqueues = 0\nublk = true\n", "run.queues"),
        ("\n[run]\ndepth = 5000\nublk = true\n", "run.depth"),
        ("\n[run]\nnbd = [\"ftp:somewhere\"]\n", "run.nbd[0]"),
        ("\n[run]\nnbd = [\"unix:/tmp/x.sock\"]\nmetrics = \"localhost\"\n", "run.metrics"),
        ("\n[run]\nqueues = 2\n", "run.ublk"),
        ("\n[run]\nnbd = [\"unix:/tmp/x.sock\"]\ncolour = \"blue\"\n", "colour"),
        ("\n[run]\nublk = \"yes\"\n", "ublk"),
    ];
    for (text, key) in cases {
        std::fs::write(&config, format!("{original}{text}")).unwrap();
        refused(&run, &vdir, &config, key);
        refused(&["status", "--dir", vdir.to_str().unwrap()], &vdir, &config, key);
    }
    std::fs::write(&config, &original).unwrap();
    edit(&config, "segment_size = 8388608", "segment_size = 1000");
    refused(&run, &vdir, &config, "journal.segment_size");
    std::fs::write(&config, &original).unwrap();

    // A mirror's file.
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", "127.0.0.1:9", "--fingerprint", &fingerprint, "--max-rate", "10M"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mirror = vdir.join("mirrors/mirror.toml");
    let mirror_original = std::fs::read_to_string(&mirror).unwrap();
    assert!(mirror_original.contains("max_rate = \"10M\""), "{mirror_original}");
    let run_nbd = ["run", "--dir", vdir.to_str().unwrap(), "--nbd", "unix:/nonexistent-dir/x.sock"];
    for (from, to, key) in [
        ("max_rate = \"10M\"", "max_rate = \"10 parsecs\"", "max_rate"),
        ("max_rate = \"10M\"", "max_rate = 0", "max_rate"),
        ("max_rate = \"10M\"", "max_rate = \"10M\"\nidle_timeout = 0", "idle_timeout"),
        ("max_rate = \"10M\"", "max_rate = \"10M\"\nspeed = 3", "speed"),
        ("fingerprint = \"sha256:", "fingerprint = \"md5:", "fingerprint"),
        ("address = \"127.0.0.1:9\"", "address = \"127.0.0.1\"", "address"),
        ("name = \"mirror\"", "name = \"other\"", "name"),
    ] {
        std::fs::write(&mirror, &mirror_original).unwrap();
        edit(&mirror, from, to);
        refused(&run_nbd, &vdir, &mirror, key);
    }
    std::fs::write(&mirror, &mirror_original).unwrap();
    // Bad values on the command line are refused too, and change nothing.
    for args in [
        vec!["mirror", "set", "--dir", vdir.to_str().unwrap(), "--max-rate", "1K"],
        vec!["mirror", "set", "--dir", vdir.to_str().unwrap(), "--idle-timeout", "601"],
    ] {
        let output = cli(&args);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert_eq!(std::fs::read_to_string(&mirror).unwrap(), mirror_original);
    }

    // The applier's file.
    let adir = tmp.path().join("applier");
    assert!(cli(&["applier", "init", "--dir", adir.to_str().unwrap()]).status.success());
    let applier_config = adir.join("applier.toml");
    let applier_original = std::fs::read_to_string(&applier_config).unwrap();
    let applier_run = ["applier", "run", "--dir", adir.to_str().unwrap()];
    refused(&applier_run, &adir, &applier_config, "listen");
    for (text, key) in [
        ("listen = \"0.0.0.0\"\n", "listen"),
        ("listen = \"127.0.0.1:0\"\nmetrics = \"nowhere:1\"\n", "metrics"),
        ("listen = \"127.0.0.1:0\"\nidle_timeout = 9999\n", "idle_timeout"),
        ("listen = \"127.0.0.1:0\"\nport = 7\n", "port"),
    ] {
        std::fs::write(&applier_config, format!("{applier_original}{text}")).unwrap();
        refused(&applier_run, &adir, &applier_config, key);
    }
    std::fs::write(&applier_config, applier_original.replace("format_version = 1", "format_version = 2")).unwrap();
    refused(&applier_run, &adir, &applier_config, "format_version");
}

#[test]
fn run_takes_exports_and_metrics_from_volume_toml_and_reports_to_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    create_volume(&vdir, "vol0", "16M", &["--journal-size", "32M", "--segment-size", "8M"]);
    let socket = tmp.path().join("vol0.sock");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    append(&vdir.join("volume.toml"), &format!("\n[run]\nnbd = [\"unix:{}\"]\nmetrics = \"127.0.0.1:{metrics_port}\"\n", socket.display()));

    // systemd's side of sd_notify: a datagram socket named by NOTIFY_SOCKET.
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let log = std::fs::File::create(tmp.path().join("run.log")).unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--dir", vdir.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buffer = [0u8; 4096];
    let length = notify.recv(&mut buffer).expect("READY=1 arrives");
    let ready = String::from_utf8_lossy(&buffer[..length]).into_owned();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving vol0 on unix:"), "{ready}");
    // Ready means served: the configured NBD socket answers at once.
    let mut client = nbd_client::NbdClient::connect(&socket, "vol0").expect("the NBD export from volume.toml");
    assert_eq!(client.write(0, &[7u8; 4096]), 0);
    assert_eq!(client.flush(), 0);
    client.disconnect();
    // Periodic STATUS= updates.
    let length = notify.recv(&mut buffer).expect("a STATUS update within 30 s");
    let update = String::from_utf8_lossy(&buffer[..length]).into_owned();
    assert!(update.starts_with("STATUS=vol0 journaling, last LSN"), "{update}");
    // The metrics address from volume.toml serves the page.
    let page = http_get(metrics_port);
    assert!(page.contains("ublk_mirror_volume_writes_total{volume=\"vol0\"} 1"), "{page}");
    assert!(page.contains("ublk_mirror_request_latency_seconds_count{volume=\"vol0\",op=\"flush\"} 1"), "{page}");

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stopping = false;
    while Instant::now() < deadline && !stopping {
        if let Ok(length) = notify.recv(&mut buffer) {
            stopping = String::from_utf8_lossy(&buffer[..length]).contains("STOPPING=1");
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

fn http_get(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn applier_reads_applier_toml_notifies_and_serves_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("applier");
    assert!(cli(&["applier", "init", "--dir", adir.to_str().unwrap()]).status.success());
    let port = free_udp_port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    append(&adir.join("applier.toml"), &format!("listen = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n"));
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut child = Command::new(bin())
        .args(["applier", "run", "--dir", adir.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buffer = [0u8; 4096];
    let length = notify.recv(&mut buffer).expect("READY=1 arrives");
    let ready = String::from_utf8_lossy(&buffer[..length]).into_owned();
    assert!(ready.contains("READY=1") && ready.contains(&format!("STATUS=listening on 127.0.0.1:{port}")), "{ready}");
    let page = http_get(metrics_port);
    let body = page.split_once("\r\n\r\n").unwrap().1;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    assert!(scrape.samples.iter().any(|s| s.metric == "ublk_mirror_applier_replicas"), "{body}");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let mut stopping = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !stopping {
        if let Ok(length) = notify.recv(&mut buffer) {
            stopping = String::from_utf8_lossy(&buffer[..length]).contains("STOPPING=1");
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn units_install_verify_and_uninstall() {
    require_tool("systemd-analyze", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let output = cli(&["install-units", "--root", root.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    for path in [
        "usr/local/bin/ublk-mirror",
        "etc/systemd/system/ublk-mirror@.service",
        "etc/systemd/system/ublk-mirror-applier.service",
        "etc/udev/rules.d/90-ublk-mirror.rules",
        "etc/modules-load.d/ublk-mirror.conf",
        "etc/default/ublk-mirror",
        "usr/local/share/doc/ublk-mirror/configuration.md",
        "var/lib/ublk-mirror",
        "var/lib/ublk-mirror-applier",
    ] {
        assert!(root.join(path).exists(), "install-units made {path}: {}", stdout(&output));
    }
    let installed = Command::new(root.join("usr/local/bin/ublk-mirror")).arg("--version").output().unwrap();
    assert!(installed.status.success(), "the installed binary runs");

    // systemd-analyze resolves dependencies (network-online.target, ...) under --root: give it
    // the system's own unit directory there.
    let system_units = Path::new("/usr/lib/systemd/system");
    assert!(system_units.join("network-online.target").exists(), "this test needs systemd's units: apt-get install -y systemd");
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let copied = Command::new("cp").args(["-a", system_units.to_str().unwrap(), root.join("usr/lib/systemd/").to_str().unwrap()]).status().unwrap();
    assert!(copied.success());
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::os::unix::fs::symlink("ublk-mirror@.service", root.join("etc/systemd/system/ublk-mirror@vol0.service")).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(["ublk-mirror@vol0.service", "ublk-mirror-applier.service"])
        .output()
        .unwrap();
    let complaints = stderr(&verify);
    assert!(verify.status.success(), "systemd-analyze verify: {complaints}");
    let ours: Vec<&str> = complaints.lines().filter(|l| l.contains("ublk-mirror")).collect();
    assert!(ours.is_empty(), "systemd-analyze complains about our units: {ours:?}");
    // Prove the check bites: an unknown key is reported.
    let broken = root.join("etc/systemd/system/ublk-mirror-applier.service");
    let unit = std::fs::read_to_string(&broken).unwrap();
    std::fs::write(&broken, unit.replace("[Service]\n", "[Service]\nNotAKey=1\n")).unwrap();
    let verify = Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.display())).arg("ublk-mirror-applier.service").output().unwrap();
    assert!(stderr(&verify).contains("NotAKey"), "{}", stderr(&verify));
    std::fs::write(&broken, unit).unwrap();
    let text = std::fs::read_to_string(root.join("etc/systemd/system/ublk-mirror@.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "After=network-online.target systemd-modules-load.service",
        "ExecStart=/usr/local/bin/ublk-mirror run --dir ${UBLK_MIRROR_STATE}/%i",
    ] {
        assert!(text.contains(line), "the volume unit has {line}");
    }

    // Reinstalling keeps an edited environment file; uninstalling keeps it and the state.
    std::fs::write(root.join("etc/default/ublk-mirror"), "RUST_LOG=debug\n").unwrap();
    let output = cli(&["install-units", "--root", root.to_str().unwrap()]);
    assert!(output.status.success());
    assert_eq!(std::fs::read_to_string(root.join("etc/default/ublk-mirror")).unwrap(), "RUST_LOG=debug\n");
    let output = cli(&["uninstall-units", "--root", root.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    for path in [
        "usr/local/bin/ublk-mirror",
        "etc/systemd/system/ublk-mirror@.service",
        "etc/systemd/system/ublk-mirror-applier.service",
        "etc/udev/rules.d/90-ublk-mirror.rules",
        "etc/modules-load.d/ublk-mirror.conf",
    ] {
        assert!(!root.join(path).exists(), "uninstall-units removed {path}");
    }
    assert!(root.join("etc/default/ublk-mirror").exists(), "an edited environment file is kept");
    assert!(root.join("var/lib/ublk-mirror").is_dir(), "state is kept");
}

#[test]
fn status_prints_a_mirror_table_and_watch_refreshes() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    create_volume(&vdir, "vol0", "16M", &["--journal-size", "32M", "--segment-size", "8M"]);
    let fingerprint = format!("sha256:{}", "cd".repeat(32));
    let port = free_udp_port();
    // A mirror to nowhere: it stays disconnected and counts its attempts.
    assert!(cli(&[
        "mirror",
        "add",
        "--dir",
        vdir.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{port}"),
        "--fingerprint",
        &fingerprint,
        "--name",
        "dr-site",
        "--max-rate",
        "50M",
        "--idle-timeout",
        "2"
    ])
    .status
    .success());
    let served = Served::start(&vdir, &[]);
    let output = cli(&["status", "--dir", vdir.to_str().unwrap(), "--watch", "--interval", "0.5", "--count", "3"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert_eq!(text.matches("(every 0.5s)").count(), 3, "three refreshes:\n{text}");
    let header = text.lines().find(|l| l.trim_start().starts_with("MIRROR")).expect("a table header");
    for column in ["STATE", "LAG", "LAG-BYTES", "LAG-AGE", "RATE", "LIMIT", "RECONNECTS"] {
        assert!(header.contains(column), "{header}");
    }
    let row = text.lines().rev().find(|l| l.trim_start().starts_with("dr-site")).expect("a row for the mirror");
    assert!(row.contains("disconnected") && row.contains("50.0M/s") && row.contains(&format!("127.0.0.1:{port}")), "{row}");
    drop(served);
}
