//! The ublk frontend against the real kernel driver: the scripts in tests/vm/ run natively when
//! this host has /dev/ublk-control, otherwise inside the VM harness (ublk/vm/run), which boots a
//! Debian kernel with ublk_drv under qemu. Each script prints its steps and `PASS: ...`.
//!
//! Scripts that need the same VM settings share one boot (booting and building the initramfs
//! cost ~15 s each under TCG, and fewer, longer VMs balance better over cargo's test threads);
//! the harness runs each in a fresh directory with a cleared kernel log, cleans up after it,
//! and reports one verdict per script, which `assert_all_pass` checks one by one.
//!
//! libtest starts tests in name order as its threads free up: the two longest boots
//! (`ublk_filesystem_...`, `ublk_recovery_matrix_...`) sort first so they start at once, and
//! the rest fill in behind them. (Before the grouping, the recovery matrix sorted seventh of
//! nine and started when most others were done, so it ran after them rather than beside them.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn host_has_ublk() -> bool {
    Path::new("/dev/ublk-control").exists() && std::env::var_os("UBLK_MIRROR_FORCE_VM").is_none()
}

/// The console log is long; keep the interesting lines for the test report.
fn print_interesting_lines(output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stdout.lines().chain(stderr.lines()) {
        if line.starts_with("==")
            || line.contains("PASS")
            || line.contains("FAIL")
            || line.starts_with("ok:")
            || line.contains("panic")
            || line.contains("ublk-vm: ")
        {
            println!("{line}");
        }
    }
}

/// Runs one guest script natively (this host has ublk) in a fresh directory.
fn run_natively(script: &str) -> Output {
    let root = repository();
    let binary = env!("CARGO_BIN_EXE_ublk-mirror");
    let work = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(binary).parent().unwrap().to_path_buf();
    let path = format!("{}:{}:{}", bin_dir.display(), bin_dir.join("examples").display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new("sh")
        .arg(root.join("tests/vm").join(script))
        .env("WORK", work.path())
        .env("LIB", root.join("tests/vm/lib.sh"))
        .env("PATH", path)
        .output()
        .expect("run sh");
    print_interesting_lines(&output);
    output
}

/// Runs guest scripts in one VM boot with `vm_env` for the harness (e.g. `UBLK_VM_SMP`).
fn run_in_vm(scripts: &[&str], extra_programs: &str, vm_env: &[(&str, &str)]) -> Output {
    let root = repository();
    let output = Command::new(root.join("ublk/vm/run"))
        .envs(vm_env.iter().copied())
        .args(scripts.iter().map(|script| root.join("tests/vm").join(script)))
        .env("UBLK_MIRROR_BIN", env!("CARGO_BIN_EXE_ublk-mirror"))
        .env("UBLK_VM_FILES", root.join("tests/vm/lib.sh"))
        // GNU cmp: busybox's reads byte by byte, ~50 s per 256 MiB under TCG.
        .env("UBLK_VM_EXTRA", format!("cmp {extra_programs}"))
        .env("UBLK_VM_TIMEOUT", (600 + 300 * scripts.len()).to_string()) // 900 s for one, as before
        .output()
        .expect("run ublk/vm/run (needs bash, qemu-system-x86, busybox-static: scripts/setup.sh)");
    print_interesting_lines(&output);
    output
}

/// Checks the harness's verdict for each script (the paths' file names) in `output`, one by
/// one: Err names every script that did not pass, with its part of the guest console.
fn verdicts(output: &Output, scripts: &[&str]) -> Result<(), String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut failures = Vec::new();
    for (index, script) in scripts.iter().enumerate() {
        let name = Path::new(script).file_name().unwrap().to_string_lossy();
        if stderr.lines().any(|line| line == format!("ublk/vm/run: PASS ({name})")) {
            continue;
        }
        let verdict = stderr.lines().find(|line| line.starts_with(&format!("ublk/vm/run: FAIL ({name}"))).unwrap_or("no verdict line from ublk/vm/run");
        // This script's part of the console: from its start marker to the next script's.
        let start = format!("UBLK_MIRROR_VM_START={} ", index + 1);
        let next = format!("UBLK_MIRROR_VM_START={} ", index + 2);
        let console: Vec<&str> = stdout.lines().skip_while(|line| !line.contains(&start)).take_while(|line| !line.contains(&next)).collect();
        failures.push(format!("{name} failed: {verdict}\n{}", console.join("\n")));
    }
    if failures.is_empty() && !output.status.success() {
        failures.push(format!("every script passed, yet ublk/vm/run exited with {}:\n{stderr}", output.status));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n(harness stderr:)\n{stderr}", failures.join("\n\n")))
    }
}

/// Every script must pass: run natively one by one on a ublk host, else in one VM boot; a
/// failure names each script that failed.
fn assert_all_pass(scripts: &[&str], extra_programs: &str, vm_env: &[(&str, &str)]) {
    if host_has_ublk() {
        let failures: Vec<String> = scripts
            .iter()
            .filter_map(|script| {
                let output = run_natively(script);
                (!output.status.success()).then(|| {
                    format!("{script} failed ({}):\n{}\n{}", output.status, String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
                })
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    } else if let Err(failures) = verdicts(&run_in_vm(scripts, extra_programs, vm_env), scripts) {
        panic!("{failures}");
    }
}

/// The data-checking workload the recovery tests run in the guest (an example of this
/// package: `cargo test` builds it beside the binary).
fn fs_workload() -> String {
    let path = Path::new(env!("CARGO_BIN_EXE_ublk-mirror")).parent().unwrap().join("examples/fs_workload");
    assert!(path.exists(), "{} is missing: build it with `cargo build --examples`", path.display());
    path.display().to_string()
}

/// In one boot:
/// - ublk-filesystem.sh: ext4 on /dev/ublkbN with two queues and parallel writers, fstrim, raw
///   discard and write-zeroes reaching the journal, a replica byte-equal, fsck clean, same files.
/// - ublk-crash.sh: fsync'd files survive kill -9 of the server with `run --recover` under a
///   busy mount, and a plain restart.
/// - ublk-errors.sh: prerequisite and conflict errors (not root, id taken, nothing to recover,
///   bad queue count).
/// - ublk-disk-errors.sh: a disk error under the device reaches the guest's writer as ENOSPC,
///   then EIO; a restart after the fault serves everything fsync'd.
#[test]
fn ublk_filesystem_crash_recovery_and_errors() {
    assert_all_pass(&["ublk-filesystem.sh", "ublk-crash.sh", "ublk-errors.sh", "ublk-disk-errors.sh"], "blkdiscard", &[]);
}

/// In one boot:
/// - ublk-recovery-errors.sh: recoveries that cannot work give a clear error, no hang, the
///   device (and a later server) unaffected; a recovery that fails midway says what to do, and
///   `ublk delete` unblocks.
/// - ublk-markers.sh: `marker create --freeze` on ext4 over /dev/ublkbN: the replica's snapshot
///   at the marker, exported over NBD, is clean under e2fsck with nothing to replay; always
///   thawed.
/// - ublk-switchover.sh: `mirror switchover` with ext4 on /dev/ublkbN, both ends in the guest,
///   and back: the new primary's device is fsck clean with the same files, nothing resent.
#[test]
fn ublk_recovery_refusals_markers_and_switchover() {
    assert_all_pass(&["ublk-recovery-errors.sh", "ublk-markers.sh", "ublk-switchover.sh"], "qemu-img dumpe2fs timeout", &[]);
}

/// Recovery with 1, 2 and 4 queues (depth 64 and 128) under a busy mixed workload on ext4,
/// with a mirror: nothing lost, no kernel error, fsck clean, replica byte-equal. The guest
/// gets 4 CPUs: the ublk driver gives a device at most one queue per CPU.
#[test]
fn ublk_recovery_matrix_under_a_mixed_workload() {
    assert_all_pass(&["ublk-recovery.sh"], &fs_workload(), &[("UBLK_VM_SMP", "4")]);
}

/// The harness itself, in two boots of three scripts each: a failing script fails the run with
/// its status and its own FAIL verdict while the scripts around it pass, and what it left
/// behind (a process, a mount, its files, a kernel log line) is gone before the next script;
/// a guest that dies fails the run (125), the dying script without a verdict and the next one
/// not run. `verdicts`, which the tests above rely on, names exactly the scripts that failed.
#[test]
fn vm_harness_reports_failures() {
    if host_has_ublk() {
        return; // natively there is no harness in the way; the scripts' own status is the verdict
    }
    let work = tempfile::tempdir().unwrap();
    let script = |name: &str, text: &str| {
        let path = work.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let passes = script("passes.sh", "echo harness-test-log-line > /dev/kmsg\ntouch \"$WORK/mine\"\necho passing\n");
    let fails = script(
        "fails.sh",
        "sleep 600 &\nmkdir \"$WORK/mnt\" && mount -t tmpfs none \"$WORK/mnt\"\necho harness-test-log-line > /dev/kmsg\necho about to fail\nexit 7\n",
    );
    let clean = script(
        "finds-it-clean.sh",
        "set -e\n[ -z \"$(ls -A \"$WORK\")\" ] || { echo 'FAIL: WORK not fresh'; exit 1; }\n\
         [ \"$(ls /tmp)\" = \"$(basename \"$WORK\")\" ] || { ls /tmp; echo 'FAIL: earlier work dirs remain'; exit 1; }\n\
         if dmesg | grep harness-test-log-line; then echo 'FAIL: kernel log not cleared'; exit 1; fi\n\
         if pidof sleep; then echo 'FAIL: a process was left running'; exit 1; fi\n\
         if grep ' /tmp/' /proc/mounts; then echo 'FAIL: a mount was left'; exit 1; fi\n\
         echo clean\n",
    );
    let dies = script("dies.sh", "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger\nsleep 30\n");
    let harness = repository().join("ublk/vm/run");
    let binary = env!("CARGO_BIN_EXE_ublk-mirror");
    let run = |scripts: &[&str]| Command::new(&harness).args(scripts).env("UBLK_MIRROR_BIN", binary).env("UBLK_VM_TIMEOUT", "300").output().unwrap();

    let output = run(&[&passes, &fails, &clean]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    for verdict in ["PASS (passes.sh)", "FAIL (fails.sh exited 7)", "PASS (finds-it-clean.sh)"] {
        assert!(stderr.lines().any(|line| line == format!("ublk/vm/run: {verdict}")), "no '{verdict}' in:\n{stderr}");
    }
    let failures = verdicts(&output, &[&passes, &fails, &clean]).unwrap_err();
    assert!(failures.contains("fails.sh failed") && failures.contains("about to fail"), "{failures}");
    assert!(!failures.contains("passes.sh failed") && !failures.contains("finds-it-clean.sh failed"), "{failures}");
    assert!(verdicts(&output, &[&passes]).is_err(), "a non-zero exit is a failure even where the named scripts passed");

    let output = run(&[&passes, &dies, &clean]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    for verdict in ["PASS (passes.sh)", "FAIL (dies.sh: no verdict", "FAIL (finds-it-clean.sh: not run"] {
        assert!(stderr.lines().any(|line| line.starts_with(&format!("ublk/vm/run: {verdict}"))), "no '{verdict}' in:\n{stderr}");
    }
    let failures = verdicts(&output, &[&passes, &dies, &clean]).unwrap_err();
    assert!(failures.contains("dies.sh failed") && failures.contains("finds-it-clean.sh failed") && !failures.contains("passes.sh failed"), "{failures}");
}
