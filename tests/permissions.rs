//! Least privilege on disk (issue 20 item 1, docs/security.md): everything a volume and an
//! applier keep is their owner's only (directories 0700, files and sockets 0600), a looser
//! directory is tightened by the next process that serves it (and the log names each change),
//! and a `--backing` store keeps its own mode.

mod common;
use common::nbd_client::*;
use common::*;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every directory, regular file and socket below `root` (and `root`), symlinks not followed.
fn walk(root: &Path) -> Vec<(PathBuf, std::fs::FileType)> {
    let mut found = vec![(root.to_path_buf(), std::fs::symlink_metadata(root).unwrap().file_type())];
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        // A running process renames and removes files meanwhile (`*.tmp`, recycled segments).
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            let kind = meta.file_type();
            if kind.is_dir() {
                pending.push(path.clone());
            }
            found.push((path, kind));
        }
    }
    found
}

/// Asserts the rule on every entry; returns the paths seen (relative to `root`) so a caller
/// can check the walk saw what it means to cover.
fn assert_private(root: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    for (path, kind) in walk(root) {
        let relative = path.strip_prefix(root).unwrap().display().to_string();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let actual = meta.permissions().mode() & 0o7777;
        if kind.is_dir() {
            assert_eq!(actual, 0o700, "directory {} is {actual:04o}", path.display());
        } else if kind.is_file() || kind.is_socket() {
            assert_eq!(actual, 0o600, "{} is {actual:04o}", path.display());
        } else {
            // The journal's link when placed elsewhere: its target is checked on its own.
            assert!(kind.is_symlink(), "{} is neither a directory, a file, a socket nor a link", path.display());
        }
        seen.push(relative);
    }
    seen
}

fn assert_saw(seen: &[String], wanted: &[&str], what: &str) {
    for want in wanted {
        assert!(seen.iter().any(|path| path == want || path.starts_with(&format!("{want}/")) || path.ends_with(want)), "{what}: no {want} among {seen:?}");
    }
}

#[test]
fn a_mirrored_volume_its_replica_and_a_snapshot_are_private_to_root() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    let adir = tmp.path().join("applier");
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    let port = free_udp_port();
    let _applier = Applier::start(&adir, port);
    let fp = fingerprint_line(&create_volume(&vdir, "vol0", "8M", &["--journal-size", "16M", "--segment-size", "4M"]));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &fp]).status.success());
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", &applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    let served = Served::start(&vdir, &[]);
    wait_consistent(&vdir);

    // Data, a marker (a snapshot at the applier), then writes over it so the snapshot
    // preserves chunks.
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.write(0, &vec![0xa5; 256 << 10]), 0);
    assert_eq!(client.flush(), 0);
    let output = cli(&["marker", "create", "--dir", vdir.to_str().unwrap(), "--name", "m1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(client.write(0, &vec![0x5a; 256 << 10]), 0);
    assert_eq!(client.flush(), 0);
    wait_caught_up(&vdir);
    let replica = replica_dir(&adir, "vol0");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica.join("snapshots/m1").is_dir() {
        assert!(Instant::now() < deadline, "no snapshot m1 in {}", replica.display());
        std::thread::sleep(Duration::from_millis(50));
    }

    let seen = assert_private(&vdir);
    assert_saw(
        &seen,
        &["", "data.img", "state.json", "volume.toml", "identity/key.pem", "identity/cert.pem", "journal", ".seg", "mirrors", "control.sock", "lock"],
        "volume",
    );
    let seen = assert_private(&adir);
    assert_saw(&seen, &["", "allowed", "applier.toml", "identity/key.pem", "control.sock", "replicas", "replica.json", "data.img", "snapshots/m1"], "applier");
    // The NBD socket is where the operator put it, and it is root's alone: NBD has no
    // authentication.
    assert_eq!(mode(&served.socket), 0o600, "NBD socket");
    client.disconnect();
}

#[test]
fn a_loose_volume_directory_is_tightened_by_run_and_the_log_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    let journals = tmp.path().join("journals");
    std::fs::create_dir(&journals).unwrap();
    let placed = journals.join("vol0");
    create_volume(&vdir, "vol0", "8M", &["--journal-size", "16M", "--segment-size", "4M", "--journal-dir", placed.to_str().unwrap()]);
    assert_private(&vdir);
    assert_private(&placed);
    // As main used to leave them (and as mkdir, cp or an unpacked backup still can).
    for dir in [&vdir, &placed] {
        for (path, kind) in walk(dir).into_iter().filter(|(_, kind)| !kind.is_symlink()) {
            chmod(&path, if kind.is_dir() { 0o755 } else { 0o644 });
        }
    }

    let mut served = Served::start(&vdir, &[]);
    assert_eq!(served.terminate(), Some(0));
    assert_private(&vdir);
    assert_private(&placed);
    let log = served.log_text();
    for path in [vdir.clone(), vdir.join("data.img"), vdir.join("state.json"), placed.clone()] {
        assert!(
            log.lines().any(|line| line.contains("tightened permissions") && line.contains(&format!("path={} old=", path.display()))),
            "the log names {}: {log}",
            path.display()
        );
    }
    assert!(log.contains("old=0644") && log.contains("new=0600") && log.contains("old=0755") && log.contains("new=0700"), "{log}");

    // Once private, a restart has nothing to say.
    let mut served = Served::start(&vdir, &[]);
    assert_eq!(served.terminate(), Some(0));
    let second: String = served.log_text().lines().skip(log.lines().count()).collect::<Vec<_>>().join("\n");
    assert!(!second.contains("tightened permissions"), "{second}");
}

#[test]
fn applier_init_and_applier_run_make_a_loose_applier_directory_private() {
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("applier");
    // `applier init` in a directory made beforehand (mkdir's 0755) makes it private.
    std::fs::create_dir(&adir).unwrap();
    chmod(&adir, 0o755);
    assert!(cli(&["applier", "init", "--dir", adir.to_str().unwrap()]).status.success());
    assert_private(&adir);
    chmod(&adir, 0o755);
    chmod(&adir.join("replicas"), 0o777);
    chmod(&adir.join("applier.toml"), 0o644);
    let mut applier = Applier::start(&adir, free_udp_port());
    applier.kill9();
    assert_private(&adir);
    let log = std::fs::read_to_string(adir.with_extension("log")).unwrap();
    assert!(log.contains(&format!("path={} old=0644 new=0600", adir.join("applier.toml").display())) && log.contains("tightened permissions"), "{log}");
}

#[test]
fn volume_create_makes_given_directories_private_and_a_backing_store_keeps_its_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    std::fs::create_dir(&vdir).unwrap();
    chmod(&vdir, 0o755);
    let backing = tmp.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    chmod(&backing, 0o644);
    // A journal directory given empty (a mount point) is made private too.
    let journal = tmp.path().join("journal-mount");
    std::fs::create_dir(&journal).unwrap();
    chmod(&journal, 0o755);
    create_volume(
        &vdir,
        "vol0",
        "8M",
        &["--journal-size", "16M", "--segment-size", "4M", "--backing", backing.to_str().unwrap(), "--journal-dir", journal.to_str().unwrap()],
    );
    assert_private(&vdir);
    assert_private(&journal);
    let mut served = Served::start(&vdir, &[]);
    assert_eq!(served.terminate(), Some(0));
    assert_eq!(mode(&backing), 0o644, "the administrator's backing store keeps its mode");
    let log = served.log_text();
    assert!(log.contains("backing store is accessible by every local user") && log.contains(&backing.display().to_string()), "{log}");
}

#[test]
fn installed_files_stay_readable_under_the_private_umask() {
    // The binary runs under umask 0077; what `install-units` puts in place is read by
    // systemd, udev and users, and the state directories are private.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let output = cli(&["install-units", "--root", root.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    for (path, want) in [
        ("etc", 0o755),
        ("etc/systemd/system", 0o755),
        ("etc/systemd/system/ublk-mirror@.service", 0o644),
        ("usr/local/bin", 0o755),
        ("usr/local/bin/ublk-mirror", 0o755),
        ("var/lib", 0o755),
        ("var/lib/ublk-mirror", 0o700),
        ("var/lib/ublk-mirror-applier", 0o700),
    ] {
        assert_eq!(mode(&root.join(path)), want, "{path}");
    }
}
