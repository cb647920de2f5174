// Each bench binary uses a different part of this module.
#![allow(dead_code)]

//! Shared by the bench binaries.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `ublk-mirror ARGS` to completion; its stdout (a failure panics with its stderr).
pub fn run(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ublk-mirror")).args(args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `sha256:` fingerprint line of a command's output.
pub fn fingerprint(output: &str) -> String {
    output.lines().find(|l| l.starts_with("sha256:")).unwrap().to_string()
}

/// A server process started by a bench: SIGTERM and a bounded wait when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one time-based fio job (nbd engine) achieved.
pub struct FioResult {
    pub iops: f64,
    pub bandwidth: f64,
}

/// Runs fio's nbd engine against `uri` for `runtime` seconds over a 1 GiB range.
pub fn fio(base: &Path, uri: &str, rw: &str, bs: &str, depth: u32, runtime: u64) -> FioResult {
    fio_with(base, uri, rw, bs, depth, runtime, &[])
}

/// [`fio`] with more fio options (e.g. `--end_fsync=1`).
pub fn fio_with(base: &Path, uri: &str, rw: &str, bs: &str, depth: u32, runtime: u64, extra: &[&str]) -> FioResult {
    fio_on(None, base, uri, rw, bs, depth, runtime, extra)
}

/// [`fio_with`], fio on `cpu` alone (through taskset) when given.
#[allow(clippy::too_many_arguments)]
pub fn fio_on(cpu: Option<usize>, base: &Path, uri: &str, rw: &str, bs: &str, depth: u32, runtime: u64, extra: &[&str]) -> FioResult {
    let output = base.join("fio.json");
    let mut command = match cpu {
        Some(cpu) => {
            let mut taskset = Command::new("taskset");
            taskset.arg("-c").arg(cpu.to_string()).arg("fio");
            taskset
        }
        None => Command::new("fio"),
    };
    let status = command
        .args(extra)
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--size=1g",
            "--time_based",
            &format!("--runtime={runtime}"),
            "--randrepeat=0",
            "--output-format=json",
            &format!("--output={}", output.display()),
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run fio");
    assert!(status.success(), "fio failed");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    let write = &json["jobs"][0]["write"];
    FioResult { iops: write["iops"].as_f64().unwrap_or(0.0), bandwidth: write["bw_bytes"].as_f64().unwrap_or(0.0) }
}
