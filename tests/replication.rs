//! Replication end to end through the binaries: applier + `run` on loopback, real QUIC.

mod common;
use common::*;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fingerprint_line(output: &str) -> String {
    output.lines().find(|l| l.starts_with("sha256:")).expect("fingerprint line").to_string()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Applier {
    child: Child,
}

impl Applier {
    fn start(dir: &Path, port: u16) -> Applier {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
        let child = Command::new(bin())
            .args(["applier", "run", "--dir", dir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("control.sock").exists() {
            assert!(Instant::now() < deadline, "applier did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Applier { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn applier_status(dir: &Path) -> serde_json::Value {
    let output = cli(&["applier", "status", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Waits (bounded) until the mirror has applied everything the volume journaled.
fn wait_caught_up(volume: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = status_json(volume);
        let last = status["volume"]["last_lsn"].as_u64().unwrap();
        let mirror = &status["mirrors"][0];
        if mirror["applied_lsn"].as_u64() == Some(last) && mirror["connected"] == true && last > 0 {
            return status;
        }
        assert!(Instant::now() < deadline, "mirror did not catch up: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn compare(a: &str, b: &str) -> bool {
    let output = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]).output().unwrap();
    output.status.success()
}

fn setup(tmp: &Path, fingerprint_override: Option<&str>) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let adir = tmp.join("applier");
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    let vdir = tmp.join("vol");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "32M", &["--journal-size", "64M", "--segment-size", "8M"]));
    let output = cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    let port = free_udp_port();
    let pin = fingerprint_override.unwrap_or(&applier_fp);
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", pin]);
    assert!(output.status.success(), "{}", stderr(&output));
    (adir, vdir, port)
}

#[test]
fn replica_equals_source_and_survives_an_applier_kill() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = setup(tmp.path(), None);
    let mut applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    let uri = served.uri("vol0");
    let replica = adir.join("replicas/vol0/data.img");

    let mut commands = Vec::new();
    for i in 0..200u64 {
        let offset = (i * 7919 % 8000) * 4096;
        match i % 10 {
            7 => commands.push(format!("discard {offset} 8192")),
            8 => commands.push(format!("write -z {offset} 12288")),
            _ => commands.push(format!("write -P {} {offset} {}", i % 250 + 1, 4096 * (1 + i % 4))),
        }
    }
    commands.push("flush".into());
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let output = qemu_io(&uri, &refs);
    assert!(output.status.success(), "{}", stderr(&output));
    let status = wait_caught_up(&vdir);
    assert_eq!(status["mirrors"][0]["state"], "replicating");
    assert!(compare(&uri, replica.to_str().unwrap()), "replica differs from the source");
    let applier_view = applier_status(&adir);
    assert_eq!(applier_view["replicas"][0]["volume"], "vol0");
    assert_eq!(applier_view["replicas"][0]["connected"], true);
    assert_eq!(applier_view["replicas"][0]["applied_lsn"], status["volume"]["last_lsn"]);

    // Kill -9 the applier while writes continue, restart it: the mirror resumes and converges.
    let writer_uri = uri.clone();
    let load = std::thread::spawn(move || {
        let mut commands = Vec::new();
        for i in 0..400u64 {
            commands.push(format!("write -P {} {} 65536", i % 200 + 20, (i * 104729 % 480) * 65536));
        }
        commands.push("flush".into());
        let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(&writer_uri, &refs)
    });
    std::thread::sleep(Duration::from_millis(300));
    applier.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(&vdir)["mirrors"][0]["connected"] == true {
        assert!(Instant::now() < deadline, "the sender never noticed the applier died");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_json(&vdir)["mirrors"][0]["state"], "disconnected");
    let _applier = Applier::start(&adir, port);
    assert!(load.join().unwrap().status.success());
    let status = wait_caught_up(&vdir);
    assert!(status["mirrors"][0]["reconnects"].as_u64().unwrap() >= 1);
    assert!(compare(&uri, replica.to_str().unwrap()), "replica differs after the applier restart");
    let duplicated = applier_status(&adir)["replicas"][0]["records_duplicated"].as_u64().unwrap();
    // Records sent twice stay within the unacknowledged window (64 MiB of 64 KiB writes).
    assert!(duplicated <= 1024, "{duplicated} records resent");
    drop(served);
}

#[test]
fn wrong_applier_fingerprint_and_unknown_source_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let stranger = fingerprint_line(&stdout(&cli(&["applier", "init", "--dir", tmp.path().join("other").to_str().unwrap()])));
    let (adir, vdir, port) = setup(tmp.path(), Some(&stranger));
    let _applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_json(&vdir);
        if let Some(error) = status["mirrors"][0]["last_error"].as_str() {
            assert!(error.contains("pinned"), "{error}");
            assert_eq!(status["mirrors"][0]["connected"], false);
            break;
        }
        assert!(Instant::now() < deadline, "no refusal reported: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(served);
    // The applier made no replica for a source it never authenticated.
    assert!(applier_status(&adir)["replicas"].as_array().unwrap().is_empty());

    // A source the applier does not allow is refused too.
    let tmp2 = tempfile::tempdir().unwrap();
    let (adir2, vdir2, port2) = setup(tmp2.path(), None);
    std::fs::write(adir2.join("allowed"), b"").unwrap();
    let _applier2 = Applier::start(&adir2, port2);
    let _served2 = Served::start(&vdir2, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_json(&vdir2);
        if status["mirrors"][0]["last_error"].is_string() {
            assert_eq!(status["mirrors"][0]["connected"], false);
            break;
        }
        assert!(Instant::now() < deadline, "no refusal reported: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(applier_status(&adir2)["replicas"].as_array().unwrap().is_empty());
}
