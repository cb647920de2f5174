//! Mirrors added, changed and removed while the volume serves and a writer runs: `mirror
//! add` starts the sender at once (initial synchronisation live), `mirror remove` stops it and
//! releases its journal hold and dirty map, with no restart of `run`.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 64 << 10;
/// The writer cycles over this many blocks (16 MiB).
const BLOCKS: u64 = 256;

/// Writes numbered 64 KiB blocks (a FLUSH every 8) until told to stop, at most 60 s.
fn writer(socket: PathBuf, stop: Arc<AtomicBool>, pause: Duration) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut client = nbd_client::NbdClient::connect(&socket, "vol0").expect("connect");
        let started = Instant::now();
        let mut written = 0u64;
        while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
            let mut block = vec![0u8; BLOCK];
            for (index, word) in block.chunks_mut(8).enumerate() {
                word.copy_from_slice(&(written << 16 | index as u64).to_le_bytes());
            }
            assert_eq!(client.write((written % BLOCKS) * BLOCK as u64, &block), 0);
            written += 1;
            if written.is_multiple_of(8) {
                assert_eq!(client.flush(), 0);
            }
            std::thread::sleep(pause);
        }
        assert_eq!(client.flush(), 0);
        client.disconnect();
        written
    })
}

/// An applier directory with the volume's fingerprint allowed; returns its fingerprint.
fn applier_dir(adir: &Path, volume_fp: &str) -> String {
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), volume_fp]).status.success());
    fingerprint_line(&stdout(&output))
}

fn mirror_names(vdir: &Path) -> Vec<String> {
    status_json(vdir)["mirrors"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
}

fn mirror_status(vdir: &Path, name: &str) -> serde_json::Value {
    status_json(vdir)["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or_else(|| panic!("no mirror {name}"))
}

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mirrors_are_added_and_removed_on_a_running_volume_with_a_writer() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "32M", &["--journal-size", "16M", "--segment-size", "1M"]));
    let adir = tmp.path().join("applier");
    let applier_fp = applier_dir(&adir, &volume_fp);
    let port = free_udp_port();
    let _applier = Applier::start(&adir, port);
    let mut served = Served::start(&vdir, &[]);
    let v = vdir.to_str().unwrap();

    // Data before the mirror exists: the initial synchronisation must copy it.
    let stop = Arc::new(AtomicBool::new(false));
    let first = writer(served.socket.clone(), stop.clone(), Duration::ZERO);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    assert!(first.join().unwrap() > 0);

    // A live mirror while a writer runs.
    stop.store(false, Ordering::SeqCst);
    let steady = writer(served.socket.clone(), stop.clone(), Duration::from_millis(5));
    let to = format!("127.0.0.1:{port}");
    let output = cli(&["mirror", "add", "--dir", v, "--to", &to, "--fingerprint", &applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("started on the running volume"), "{}", stdout(&output));
    wait_for("the live-added mirror is consistent", Duration::from_secs(60), || mirror_status(&vdir, "mirror")["consistent"] == true);

    // A second mirror to an applier that is not there: its hold keeps the journal, then
    // (on_full = track) it falls back to a dirty map.
    let dead = free_udp_port();
    let output = cli(&["mirror", "add", "--dir", v, "--name", "away", "--to", &format!("127.0.0.1:{dead}"), "--fingerprint", &applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(mirror_names(&vdir), ["away", "mirror"]);
    wait_for("the unreachable mirror tracks", Duration::from_secs(40), || mirror_status(&vdir, "away")["state"] == "tracking");
    let away_map = vdir.join("mirrors/away.dirty");
    assert!(away_map.exists(), "a tracking mirror has a dirty map");

    // A live `mirror set` reaches the running sender.
    let output = cli(&["mirror", "set", "--dir", v, "--name", "away", "--max-rate", "10M"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(mirror_status(&vdir, "away")["max_rate"], 10 << 20);

    // Removed live: the sender stops, the dirty map and the files go, the volume serves on.
    let output = cli(&["mirror", "remove", "--dir", v, "--name", "away"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("running volume"), "{}", stdout(&output));
    assert_eq!(mirror_names(&vdir), ["mirror"]);
    for file in ["away.toml", "away.state.json", "away.dirty"] {
        assert!(!vdir.join("mirrors").join(file).exists(), "{file} left behind");
    }
    // Removing it again is a clear error that changes nothing.
    let output = cli(&["mirror", "remove", "--dir", v, "--name", "away"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("no mirror named \"away\""), "{}", stderr(&output));
    assert_eq!(mirror_names(&vdir), ["mirror"]);

    // A mirror removed while it streams: its hold no longer keeps the journal.
    let adir2 = tmp.path().join("applier2");
    let applier2_fp = applier_dir(&adir2, &volume_fp);
    let port2 = free_udp_port();
    let _applier2 = Applier::start(&adir2, port2);
    let output = cli(&["mirror", "add", "--dir", v, "--name", "second", "--to", &format!("127.0.0.1:{port2}"), "--fingerprint", &applier2_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_for("the second mirror is consistent", Duration::from_secs(60), || mirror_status(&vdir, "second")["consistent"] == true);
    assert!(cli(&["mirror", "remove", "--dir", v, "--name", "second"]).status.success());
    assert_eq!(mirror_names(&vdir), ["mirror"]);
    assert!(!served.log_text().contains("panicked"), "{}", served.log_text());

    stop.store(true, Ordering::SeqCst);
    assert!(steady.join().unwrap() > 0);
    let status = wait_caught_up(&vdir);
    assert_eq!(status["mirrors"].as_array().unwrap().len(), 1);
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "the live-added mirror's replica differs from the source");
    assert_eq!(served.terminate(), Some(0));
    // The stopped volume opens with the remaining mirror only.
    let offline: Vec<String> = status_json(&vdir)["mirrors"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(offline, ["mirror"]);
}
