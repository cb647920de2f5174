//! A volume and an applier that mirror it on loopback: made, configured, waited on.

use super::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Waits (bounded) until `count` mirrors are consistent and have applied everything.
pub fn wait_all_consistent(volume: &Path, count: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = status_json(volume);
        let last = status["volume"]["last_lsn"].as_u64().unwrap();
        let mirrors = status["mirrors"].as_array().unwrap();
        if mirrors.len() == count && mirrors.iter().all(|m| m["consistent"] == true && m["applied_lsn"].as_u64() == Some(last) && m["state"] == "replicating") {
            return status;
        }
        assert!(Instant::now() < deadline, "mirrors did not converge: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes an applier in `adir` that allows the volume, and a mirror of the volume named
/// `mirror` to it on a fresh port (pinned to `pin`, default the applier's own fingerprint).
/// Returns the port; the applier is not started.
pub fn configure_applier(adir: &Path, vdir: &Path, volume_fp: &str, mirror: &str, pin: Option<&str>) -> u16 {
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    let output = cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), volume_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    let port = free_udp_port();
    let output = cli(&[
        "mirror",
        "add",
        "--dir",
        vdir.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{port}"),
        "--fingerprint",
        pin.unwrap_or(&applier_fp),
        "--name",
        mirror,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    port
}

pub fn setup(tmp: &Path, fingerprint_override: Option<&str>) -> (PathBuf, PathBuf, u16) {
    setup_with(tmp, fingerprint_override, &[])
}

/// [`setup`] with more `volume create` arguments.
pub fn setup_with(tmp: &Path, fingerprint_override: Option<&str>, create_args: &[&str]) -> (PathBuf, PathBuf, u16) {
    let adir = tmp.join("applier");
    let vdir = tmp.join("vol");
    let args: Vec<&str> = ["--journal-size", "64M", "--segment-size", "8M"].into_iter().chain(create_args.iter().copied()).collect();
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "32M", &args));
    let port = configure_applier(&adir, &vdir, &volume_fp, "mirror", fingerprint_override);
    (adir, vdir, port)
}
