//! The ublk frontend against the real kernel driver: the scripts in tests/vm/ run natively when
//! this host has /dev/ublk-control, otherwise inside the VM harness (ublk/vm/run), which boots a
//! Debian kernel with ublk_drv under qemu. Each script prints its steps and `PASS: ...`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn host_has_ublk() -> bool {
    Path::new("/dev/ublk-control").exists() && std::env::var_os("UBLK_MIRROR_FORCE_VM").is_none()
}

/// Runs a guest script in the VM (or natively on a ublk host) with `vm_env` for the harness
/// (e.g. `UBLK_VM_SMP`); returns its output.
fn run_script(script: &str, extra_programs: &str, vm_env: &[(&str, &str)]) -> Output {
    let root = repository();
    let script_path = root.join("tests/vm").join(script);
    let binary = env!("CARGO_BIN_EXE_ublk-mirror");
    let output = if host_has_ublk() {
        let work = tempfile::tempdir().unwrap();
        let bin_dir = Path::new(binary).parent().unwrap().to_path_buf();
        let path = format!("{}:{}:{}", bin_dir.display(), bin_dir.join("examples").display(), std::env::var("PATH").unwrap_or_default());
        Command::new("sh").arg(&script_path).env("WORK", work.path()).env("LIB", root.join("tests/vm/lib.sh")).env("PATH", path).output().expect("run sh")
    } else {
        Command::new(root.join("ublk/vm/run"))
            .envs(vm_env.iter().copied())
            .arg(&script_path)
            .env("UBLK_MIRROR_BIN", binary)
            .env("UBLK_VM_FILES", root.join("tests/vm/lib.sh"))
            .env("UBLK_VM_EXTRA", extra_programs)
            .env("UBLK_VM_TIMEOUT", "900")
            .output()
            .expect("run ublk/vm/run (needs bash, qemu-system-x86, busybox-static: scripts/setup.sh)")
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The console log is long; keep the interesting lines for the test report.
    for line in stdout.lines().chain(stderr.lines()) {
        if line.starts_with("==") || line.contains("PASS") || line.contains("FAIL") || line.starts_with("ok:") || line.contains("panic") {
            println!("{line}");
        }
    }
    output
}

fn assert_passes(script: &str, extra_programs: &str) {
    assert_passes_with(script, extra_programs, &[]);
}

fn assert_passes_with(script: &str, extra_programs: &str, vm_env: &[(&str, &str)]) {
    let output = run_script(script, extra_programs, vm_env);
    if !output.status.success() {
        panic!("{script} failed ({}):\n{}\n{}", output.status, String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn filesystem_on_ublk_discard_write_zeroes_two_queues_and_replica() {
    assert_passes("ublk-filesystem.sh", "blkdiscard");
}

#[test]
fn fsynced_files_survive_kill_9_with_recovery_and_restart() {
    assert_passes("ublk-crash.sh", "");
}

#[test]
fn ublk_prerequisite_and_conflict_errors() {
    assert_passes("ublk-errors.sh", "");
}

/// A disk error under the device reaches the guest's writer as ENOSPC, then EIO; a restart
/// after the fault serves everything fsync'd.
#[test]
fn disk_errors_reach_the_guest_with_their_errno() {
    assert_passes("ublk-disk-errors.sh", "");
}

/// The data-checking workload the recovery tests run in the guest (an example of this
/// package: `cargo test` builds it beside the binary).
fn fs_workload() -> String {
    let path = Path::new(env!("CARGO_BIN_EXE_ublk-mirror")).parent().unwrap().join("examples/fs_workload");
    assert!(path.exists(), "{} is missing: build it with `cargo build --examples`", path.display());
    path.display().to_string()
}

/// Recovery with 1, 2 and 4 queues (depth 64 and 128) under a busy mixed workload on ext4,
/// with a mirror: nothing lost, no kernel error, fsck clean, replica byte-equal. The guest
/// gets 4 CPUs: the ublk driver gives a device at most one queue per CPU.
#[test]
fn ublk_recovery_matrix_under_a_mixed_workload() {
    assert_passes_with("ublk-recovery.sh", &fs_workload(), &[("UBLK_VM_SMP", "4")]);
}

/// Recoveries that cannot work: a clear error, no hang, the device (and a later server)
/// unaffected; a recovery that fails midway says what to do, and `ublk delete` unblocks.
#[test]
fn ublk_recovery_refusals_and_giving_a_device_up() {
    assert_passes("ublk-recovery-errors.sh", "");
}

/// `marker create --freeze` on ext4 over /dev/ublkbN: the replica's snapshot at the marker,
/// exported over NBD, is clean under e2fsck with nothing to replay; always thawed.
#[test]
fn frozen_markers_give_clean_filesystem_snapshots() {
    assert_passes("ublk-markers.sh", "qemu-img dumpe2fs timeout");
}

/// `mirror switchover` with ext4 on /dev/ublkbN, both ends in the guest, and back: the new
/// primary's device is fsck clean with the same files, nothing resent.
#[test]
fn switchover_moves_a_mounted_ext4_and_back() {
    assert_passes("ublk-switchover.sh", "");
}

/// The harness itself: a failing guest script, and a guest that dies, both fail the run.
#[test]
fn vm_harness_reports_failures() {
    if host_has_ublk() {
        return; // natively there is no harness in the way; the scripts' own status is the verdict
    }
    let work = tempfile::tempdir().unwrap();
    let failing = work.path().join("fails.sh");
    std::fs::write(&failing, "echo about to fail\nexit 7\n").unwrap();
    let dying = work.path().join("dies.sh");
    std::fs::write(&dying, "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger\nsleep 30\n").unwrap();
    let harness = repository().join("ublk/vm/run");
    let binary = env!("CARGO_BIN_EXE_ublk-mirror");
    let status = Command::new(&harness).arg(&failing).env("UBLK_MIRROR_BIN", binary).output().unwrap();
    assert_eq!(status.status.code(), Some(7), "{}", String::from_utf8_lossy(&status.stderr));
    let status = Command::new(&harness).arg(&dying).env("UBLK_MIRROR_BIN", binary).env("UBLK_VM_TIMEOUT", "120").output().unwrap();
    assert_eq!(status.status.code(), Some(125), "{}", String::from_utf8_lossy(&status.stderr));
}
