//! A journal on its own filesystem (`volume create --journal-dir`, `applier.toml`
//! `journal_dir`): served, recovered and shown by status; refused with a clear error and
//! nothing changed when its directory is missing (unmounted), read-only, not its own, or
//! shared; an applier keeping its replicas' journals there through a switchover and back.
//! "Another filesystem" is a real tmpfs mounted for the test (needs root).

mod common;
use common::nbd_client::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Volume arguments small enough for a test tmpfs.
fn journal_args(journal_dir: &Path) -> Vec<String> {
    ["--journal-size", "16M", "--segment-size", "4M", "--journal-dir", s(journal_dir)].iter().map(|a| a.to_string()).collect()
}

fn create_placed(vdir: &Path, name: &str, journal_dir: &Path) -> String {
    let args = journal_args(journal_dir);
    create_volume(vdir, name, "16M", &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A command that must fail saying `why`; returns its stderr.
fn refused(args: &[&str], why: &str) -> String {
    let output = cli(args);
    let text = stderr(&output);
    assert!(!output.status.success() && text.contains(why), "{args:?} was not refused with {why:?}: {text}");
    text
}

fn run_refused(vdir: &Path, why: &str) -> String {
    refused(&["run", "--dir", s(vdir), "--nbd", "unix:/nonexistent/x.sock"], why)
}

/// Every file below `dir` with its bytes (symlinks as their targets), to show nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let (path, kind) = (entry.path(), entry.file_type().unwrap());
            if kind.is_symlink() {
                found.push((path.clone(), std::fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes()));
            } else if kind.is_dir() {
                stack.push(path);
            } else {
                found.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    found.sort();
    found
}

fn write_pattern(client: &mut NbdClient, reference: &mut [u8], seed: u64, count: usize, length: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..count {
        let offset = rng.gen_range(0..(reference.len() - length) / 4096) * 4096;
        let mut data = vec![0u8; length];
        rng.fill(&mut data[..]);
        assert_eq!(client.write(offset as u64, &data), 0, "write at {offset}");
        reference[offset..offset + length].copy_from_slice(&data);
    }
    assert_eq!(client.flush(), 0);
}

fn assert_equal(client: &mut NbdClient, reference: &[u8], what: &str) {
    for start in (0..reference.len()).step_by(MIB) {
        assert!(client.read(start as u64, MIB as u32) == reference[start..start + MIB], "{what}: differs in the MiB at {start}");
    }
}

fn segments_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".seg")).count()
}

fn remount(fs: &LoopFs, option: &str) {
    let status = Command::new("mount").args(["-o", &format!("remount,{option}"), s(&fs.mount)]).status().unwrap();
    assert!(status.success(), "remount {option} {}", fs.mount.display());
}

#[test]
fn a_journal_on_a_tmpfs_serves_writes_recovers_and_status_shows_where_it_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(tmp.path(), "tmpfs", 64 << 20);
    let (vdir, journal) = (tmp.path().join("vol0"), fs.mount.join("vol0-journal"));
    let created = create_placed(&vdir, "vol0", &journal);
    assert!(created.contains(&format!("in {}", journal.display())), "{created}");
    assert_eq!(std::fs::read_link(vdir.join("journal")).unwrap(), journal, "VDIR/journal links to the placed directory");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&journal).unwrap().permissions().mode() & 0o777, 0o700);
    let owner: serde_json::Value = serde_json::from_slice(&std::fs::read(journal.join("journal-owner.json")).unwrap()).unwrap();
    let config = std::fs::read_to_string(vdir.join("volume.toml")).unwrap();
    assert_eq!(owner["volume"], "vol0");
    assert!(config.contains(owner["uuid"].as_str().unwrap()), "{owner} {config}");
    assert_eq!(owner["vdir"].as_str(), Some(s(&vdir)));

    let mut served = Served::start(&vdir, &[]);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    let mut reference = vec![0u8; SIZE];
    write_pattern(&mut client, &mut reference, 1, 200, 64 << 10);
    let status = status_json(&vdir);
    assert_eq!(status["journal"]["dir"].as_str(), Some(s(&journal)), "{status}");
    assert_eq!(status["journal"]["separate_filesystem"], true, "{status}");
    assert!(segments_in(&journal) >= 2, "the segments are on the tmpfs");
    // The writes are in the placed journal, acknowledged before the backing store has them:
    // a kill -9 and a restart recover them from there.
    served.kill9();
    drop(client);
    let text = stdout(&cli(&["status", "--dir", s(&vdir)]));
    assert!(text.contains(&format!("journal  in {} (separate filesystem)", journal.display())), "{text}");
    let served = Served::start(&vdir, &[]);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_equal(&mut client, &reference, "after a kill -9 and a restart");
    write_pattern(&mut client, &mut reference, 2, 50, 4096);
    assert_equal(&mut client, &reference, "after more writes");

    // A volume with its journal at home says so.
    let home = tmp.path().join("home");
    create_volume(&home, "home", "16M", &["--journal-size", "16M", "--segment-size", "4M"]);
    let status = status_json(&home);
    assert_eq!(status["journal"]["dir"].as_str(), Some(s(&home.join("journal"))), "{status}");
    assert_eq!(status["journal"]["separate_filesystem"], false, "{status}");
}

#[test]
fn a_journal_directory_that_is_missing_unwritable_foreign_or_taken_is_refused_and_nothing_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(tmp.path(), "tmpfs", 96 << 20);
    let (v1, j1) = (tmp.path().join("v1"), fs.mount.join("j1"));
    let (v2, j2) = (tmp.path().join("v2"), fs.mount.join("j2"));
    create_placed(&v1, "v1", &j1);
    create_placed(&v2, "v2", &j2);

    // At create: a relative path, a non-empty directory, another volume's, a missing parent.
    let v3 = tmp.path().join("v3");
    let create = |journal: &str| {
        vec!["volume", "create", "--dir", s(&v3), "--name", "v3", "--size", "16M", "--journal-size", "16M", "--journal-dir", journal]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let args = create("relative/j");
    refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), "must be an absolute path");
    let full = fs.mount.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let args = create(s(&full));
    refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), "is not empty");
    let args = create(s(&j1));
    let text = refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), "it holds the journal of volume v1");
    assert!(text.contains("is not empty"), "{text}");
    let args = create(s(&fs.mount.join("no/such")));
    refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), "its parent does not exist");
    assert!(!v3.exists(), "a refused create leaves no volume directory");
    assert!(std::fs::read_dir(&full).unwrap().count() == 1 && segments_in(&j1) >= 1);

    // v2's link swapped to v1's journal: refused by run and status, nothing changed.
    let link = v2.join("journal");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&j1, &link).unwrap();
    let (before_v2, before_j1) = (snapshot(&v2), snapshot(&j1));
    let text = run_refused(&v2, &format!("{} holds the journal of volume v1 (uuid ", j1.display()));
    assert!(text.contains("not of volume v2"), "{text}");
    refused(&["status", "--dir", s(&v2)], "holds the journal of volume v1");
    assert_eq!((snapshot(&v2), snapshot(&j1)), (before_v2, before_j1), "a refusal changes nothing");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&j2, &link).unwrap();

    // No owner file: not taken for this volume's journal.
    let owner = std::fs::read(j2.join("journal-owner.json")).unwrap();
    std::fs::remove_file(j2.join("journal-owner.json")).unwrap();
    run_refused(&v2, "has no owner file journal-owner.json");
    std::fs::write(j2.join("journal-owner.json"), owner).unwrap();

    // Read-only (root ignores mode bits, not a read-only mount).
    remount(&fs, "ro");
    let before = snapshot(&v1);
    run_refused(&v1, &format!("journal directory {} of volume v1 is not writable", j1.display()));
    refused(&["status", "--dir", s(&v1)], "is not writable");
    assert_eq!(snapshot(&v1), before);
    remount(&fs, "rw");
    let served = Served::start(&v1, &[]);
    drop(served);

    // The filesystem not mounted: the directory is gone.
    let mount = fs.mount.clone();
    drop(fs);
    assert!(!j1.exists(), "the tmpfs is unmounted");
    let before = snapshot(&v1);
    run_refused(&v1, &format!("journal directory {} of volume v1 does not exist: is its filesystem mounted?", j1.display()));
    refused(&["status", "--dir", s(&v1), "--json"], "is its filesystem mounted?");
    refused(&["journal", "dump", "--dir", s(&v1)], "is its filesystem mounted?");
    assert_eq!(snapshot(&v1), before, "a refusal changes nothing");
    assert!(std::fs::read_dir(&mount).unwrap().next().is_none(), "nothing was made on the mount point");
}

/// `applier init` and `journal_dir` in its applier.toml; returns the applier's fingerprint.
fn init_applier(adir: &Path, journal_dir: &Path) -> String {
    let output = cli(&["applier", "init", "--dir", s(adir)]);
    assert!(output.status.success(), "{}", stderr(&output));
    std::fs::create_dir_all(journal_dir).unwrap();
    let config = adir.join("applier.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("journal_dir = \"{}\"\n{text}", journal_dir.display())).unwrap();
    fingerprint_line(&stdout(&output))
}

#[test]
fn replicas_journals_on_another_filesystem_follow_a_switchover_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    // Replicas' journals use 64 MiB segments: room for three and one being replaced.
    let fs = LoopFs::new(tmp.path(), "tmpfs", 768 << 20);
    // A: the volume (journal on the tmpfs) and, later, an applier; B: an applier.
    let (a_vdir, a_journal) = (tmp.path().join("a").join("vol0"), fs.mount.join("a-vol0"));
    let (a_adir, b_adir) = (tmp.path().join("a").join("applier"), tmp.path().join("b").join("applier"));
    let (a_replicas, b_replicas) = (fs.mount.join("a-replicas"), fs.mount.join("b-replicas"));
    let b_fp = init_applier(&b_adir, &b_replicas);
    init_applier(&a_adir, &a_replicas);
    let (a_port, b_port) = (free_udp_port(), free_udp_port());
    let b_applier = Applier::start(&b_adir, b_port);
    let fp = fingerprint_line(&create_placed(&a_vdir, "vol0", &a_journal));
    assert!(cli(&["applier", "allow", "--dir", s(&b_adir), &fp]).status.success());
    let b_address = format!("127.0.0.1:{b_port}");
    assert!(cli(&["mirror", "add", "--dir", s(&a_vdir), "--to", &b_address, "--fingerprint", &b_fp]).status.success());
    let a_served = Served::start(&a_vdir, &[]);
    wait_consistent(&a_vdir);
    let mut client = NbdClient::connect(&a_served.socket, "vol0").unwrap();
    let mut reference = vec![0u8; SIZE];
    write_pattern(&mut client, &mut reference, 10, 100, 64 << 10);
    wait_caught_up(&a_vdir);
    // B's replica journal is on the tmpfs (the initial synchronisation restarted it there).
    // (kept by source: `journal_dir/SOURCE/NAME`, as the replica is `replicas/SOURCE/NAME`).
    let b_replica = replica_dir(&b_adir, "vol0");
    let b_journal = b_replicas.join(b_replica.strip_prefix(b_adir.join("replicas")).unwrap());
    assert_eq!(std::fs::read_link(b_replica.join("journal")).unwrap(), b_journal);
    assert!(segments_in(&b_journal) >= 1);
    let beside = |suffix: &str| b_journal.with_file_name(format!("vol0.{suffix}"));
    assert!(!b_replica.join("journal.new").exists() && !beside("new").exists() && !beside("resetting").exists());
    drop(client);

    // Switchover to B: A becomes a replica of applier A, its journal on the tmpfs too.
    let output = cli(&["mirror", "switchover", "--dir", s(&a_vdir), "--applier", s(&a_adir), "--applier-address", &format!("127.0.0.1:{a_port}"), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let b_vdir = PathBuf::from(report["switched_over"]["to"].as_str().unwrap());
    let mut a_served = a_served;
    let _ = a_served.terminate();
    let a_replica = a_adir.join("replicas").join("vol0");
    assert_eq!(std::fs::read_link(a_replica.join("journal")).unwrap(), a_replicas.join("vol0"), "the demoted volume's replica journal is placed");
    let _a_applier = Applier::start(&a_adir, a_port);
    let b_served = Served::start(&b_vdir, &[]);
    let mut client = NbdClient::connect(&b_served.socket, "vol0").unwrap();
    assert_equal(&mut client, &reference, "the new primary");
    write_pattern(&mut client, &mut reference, 11, 30, 64 << 10);
    wait_caught_up(&b_vdir);
    drop(client);

    // And back: A is the primary again, its journal replaced where it lives (the link stays).
    let output = cli(&["mirror", "switchover", "--dir", s(&b_vdir), "--applier", s(&b_adir), "--applier-address", &b_address, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut b_served = b_served;
    let _ = b_served.terminate();
    assert_eq!(std::fs::read_link(a_vdir.join("journal")).unwrap(), a_journal);
    assert!(!a_vdir.join("journal.new").exists() && !fs.mount.join("a-vol0.new").exists());
    let a_served = Served::start(&a_vdir, &[]);
    let status = status_json(&a_vdir);
    assert_eq!((status["volume"]["role"].as_str(), status["journal"]["dir"].as_str()), (Some("primary"), Some(s(&a_journal))), "{status}");
    assert_eq!(status["journal"]["separate_filesystem"], true);
    let mut client = NbdClient::connect(&a_served.socket, "vol0").unwrap();
    assert_equal(&mut client, &reference, "A after switching back");
    write_pattern(&mut client, &mut reference, 12, 20, 64 << 10);
    wait_caught_up(&a_vdir);
    drop((client, a_served, b_applier));
}
