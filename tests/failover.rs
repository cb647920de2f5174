//! Failover: a replica promoted to a volume (its latest state or a snapshot) that `run`
//! serves with a new generation; the old source refused as stale, or as split brain when
//! it went on writing after the promote; refusals that change nothing; a promote that
//! crashed, finished by running it again. Real binaries, QUIC on loopback, NBD clients.

mod common;
use common::nbd_client::*;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;
const SIZE: usize = 32 * MIB;

/// Volume A mirrored to an applier (B's host), served over NBD.
struct Pair {
    vdir: PathBuf,
    adir: PathBuf,
    port: u16,
    applier: Option<Applier>,
    served: Option<Served>,
}

impl Pair {
    fn new(base: &Path) -> Pair {
        let (pair, mirror_add) = Pair::unmirrored(base);
        mirror_add(&[]);
        let served = Served::start(&pair.vdir, &[]);
        wait_consistent(&pair.vdir);
        Pair { served: Some(served), ..pair }
    }

    /// An applier in `base/b/applier` (started) that allows volume `base/a/vol0` (made, not
    /// served), and the `mirror add` of the volume to it (with extra arguments).
    fn unmirrored(base: &Path) -> (Pair, impl Fn(&[&str])) {
        let adir = base.join("b").join("applier");
        let applier_fp = init_applier(&adir);
        let port = free_udp_port();
        let applier = Applier::start(&adir, port);
        let vdir = base.join("a").join("vol0");
        let fp = fingerprint_line(&create_volume(&vdir, "vol0", "32M", &["--journal-size", "64M", "--segment-size", "4M"]));
        assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &fp]).status.success());
        let mirror_add = {
            let vdir = vdir.clone();
            move |extra: &[&str]| {
                let address = format!("127.0.0.1:{port}");
                let mut args = vec!["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &address, "--fingerprint", &applier_fp];
                args.extend_from_slice(extra);
                let output = cli(&args);
                assert!(output.status.success(), "{}", stderr(&output));
            }
        };
        (Pair { vdir, adir, port, applier: Some(applier), served: None }, mirror_add)
    }

    fn socket(&self) -> PathBuf {
        self.served.as_ref().unwrap().socket.clone()
    }

    fn promote(&self, to: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut args = vec!["applier", "replica", "promote", "--dir", self.adir.to_str().unwrap(), "--volume", "vol0", "--to", to.to_str().unwrap()];
        args.extend_from_slice(extra);
        std::process::Command::new(bin()).args(&args).envs(env.iter().copied()).output().unwrap()
    }

    fn replica_status(&self) -> serde_json::Value {
        applier_status(&self.adir)["replicas"][0].clone()
    }

    fn wait_disconnected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.replica_status()["connected"] == true {
            assert!(Instant::now() < deadline, "the applier still shows the source connected");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The device as the test wrote it.
struct Writer {
    client: NbdClient,
    reference: Vec<u8>,
}

impl Writer {
    fn new(socket: &Path, reference: Vec<u8>) -> Writer {
        Writer { client: NbdClient::connect(socket, "vol0").expect("connect"), reference }
    }

    fn pattern(&mut self, seed: u64, count: usize, length: usize) {
        self.pattern_aligned(seed, count, length, 4096)
    }

    /// `count` writes of `length` bytes at seeded offsets, multiples of `align`; a flush.
    fn pattern_aligned(&mut self, seed: u64, count: usize, length: usize, align: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..count {
            let offset = rng.gen_range(0..(self.reference.len() - length) / align) * align;
            let mut data = vec![0u8; length];
            rng.fill(&mut data[..]);
            assert_eq!(self.client.write(offset as u64, &data), 0, "write at {offset}");
            self.reference[offset..offset + length].copy_from_slice(&data);
        }
        assert_eq!(self.client.flush(), 0);
    }

    fn assert_equal(&mut self, what: &str) {
        for start in (0..self.reference.len()).step_by(MIB) {
            assert!(self.client.read(start as u64, MIB as u32) == self.reference[start..start + MIB], "{what}: differs in the MiB at {start}");
        }
    }
}

fn assert_fingerprint(line: &str) {
    assert!(line.len() == 71 && line.starts_with("sha256:") && line[7..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{line:?}");
}

/// Waits (bounded) until the mirror's last error contains `needle`; returns it.
fn wait_mirror_error(vdir: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_json(vdir);
        let error = status["mirrors"][0]["last_error"].as_str().unwrap_or_default().to_string();
        if error.contains(needle) {
            return error;
        }
        assert!(Instant::now() < deadline, "the mirror never reported {needle:?}: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_promoted_replica_serves_a_new_generation_and_the_old_source_is_refused_as_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(1, 200, 64 << 10);
    let caught_up = wait_caught_up(&pair.vdir);
    let a_last = caught_up["volume"]["last_lsn"].as_u64().unwrap();
    let a_generation = caught_up["volume"]["generation"].as_str().unwrap().to_string();
    let bdir = tmp.path().join("b").join("vol0");

    // While the source is connected: refused without --force, and nothing changes.
    let refused = pair.promote(&bdir, &[], &[]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("is connected") && stderr(&refused).contains("--force"), "{}", stderr(&refused));
    assert!(!bdir.exists(), "a refused promote made nothing");
    assert_eq!(pair.replica_status()["promoted_to"], serde_json::Value::Null);

    // The disaster: the source dies.
    let a_reference = a.reference.clone();
    drop(a);
    pair.served.as_mut().unwrap().kill9();
    pair.wait_disconnected();
    let output = pair.promote(&bdir, &[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("no copy"), "{text}");
    let fingerprint = fingerprint_line(&text);
    assert_fingerprint(&fingerprint);
    assert_eq!(pair.replica_status()["promoted_to"], bdir.to_str().unwrap());
    let again = pair.promote(&tmp.path().join("elsewhere"), &[], &[]);
    assert!(!again.status.success() && stderr(&again).contains("already promoted"), "{}", stderr(&again));

    // B serves the promoted volume: the source's data, a new generation whose parent is A's.
    let b_served = Served::start(&bdir, &[]);
    let status = status_json(&bdir);
    let volume = &status["volume"];
    assert_eq!(volume["fingerprint"], fingerprint.as_str());
    assert_eq!(volume["role"], "primary");
    assert_ne!(volume["generation"], a_generation.as_str());
    let generations = volume["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 2, "{status}");
    assert_eq!(generations[0]["id"], a_generation.as_str());
    assert_eq!(generations[1]["parent"], a_generation.as_str());
    assert_eq!(generations[1]["branch_lsn"].as_u64(), Some(a_last));
    assert_eq!(volume["last_lsn"].as_u64(), Some(a_last), "the journal continues the numbering");
    let mut b = Writer::new(&b_served.socket, a_reference.clone());
    b.assert_equal("the promoted volume against the source");
    b.pattern(2, 128, 64 << 10); // 8 MiB more, at B
    b.assert_equal("the promoted volume after writes");
    let b_last = status_json(&bdir)["volume"]["last_lsn"].as_u64().unwrap();
    assert_eq!(b_last, a_last + 128);

    // A comes back: refused as stale, with the counts; nothing changes on either side.
    pair.served = Some(Served::start(&pair.vdir, &[]));
    let error = wait_mirror_error(&pair.vdir, "128 records (");
    assert!(error.contains("is stale"), "{error}");
    assert!(error.contains("wrote nothing after LSN") && error.contains("128 records (8.0M at most) since") && error.contains("volume demote"), "{error}");
    assert_eq!(status_json(&pair.vdir)["volume"]["last_lsn"].as_u64(), Some(a_last));
    assert_eq!(status_json(&bdir)["volume"]["last_lsn"].as_u64(), Some(b_last));
    Writer::new(&pair.socket(), a_reference).assert_equal("the old source, untouched");
    let log = std::fs::read_to_string(pair.adir.with_extension("log")).unwrap();
    assert!(log.contains("refused a source") && log.contains("was promoted"), "the applier says why too");
    drop(b_served);
    drop(pair.applier.take());
}

#[test]
fn a_snapshot_is_promoted_and_an_inconsistent_replica_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(3, 100, 64 << 10);
    let output = cli(&["marker", "create", "--dir", pair.vdir.to_str().unwrap(), "--name", "m1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let at_marker = a.reference.clone();
    a.pattern(4, 100, 64 << 10);
    wait_caught_up(&pair.vdir);
    drop(a);
    assert_eq!(pair.served.as_mut().unwrap().terminate(), Some(0));
    pair.wait_disconnected();

    let bdir = tmp.path().join("b").join("vol0");
    let missing = pair.promote(&bdir, &["--snapshot", "nope"], &[]);
    assert!(!missing.status.success() && stderr(&missing).contains("no snapshot nope"), "{}", stderr(&missing));
    let output = pair.promote(&bdir, &["--snapshot", "m1", "--json"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let promoted: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(promoted["snapshot"], "m1");
    assert!(promoted["copied_bytes"].as_u64().unwrap() > 0, "copy-on-write chunks were written back: {promoted}");
    let served = Served::start(&bdir, &[]);
    Writer::new(&served.socket, at_marker).assert_equal("the promoted snapshot");
    let marker_lsn = status_json(&bdir)["volume"]["generations"][1]["branch_lsn"].as_u64().unwrap();
    assert_eq!(marker_lsn, promoted["branch_lsn"].as_u64().unwrap());
    drop(served);

    // A replica still in its initial synchronisation (slowed to 2 MiB/s) when its source
    // dies is not consistent: refused, with the reason; nothing made.
    let base = tmp.path().join("second");
    let second = Pair::new_unsynced(&base);
    let refused = second.promote(&base.join("b").join("vol0"), &[], &[]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("not consistent") && stderr(&refused).contains("no valid snapshot"), "{}", stderr(&refused));
    assert!(!base.join("b").join("vol0").exists());
}

impl Pair {
    /// A volume with 24 MiB of data whose mirror is added with a 2 MiB/s limit and whose
    /// source is killed a second into the initial synchronisation.
    fn new_unsynced(base: &Path) -> Pair {
        let (pair, mirror_add) = Pair::unmirrored(base);
        {
            let served = Served::start(&pair.vdir, &[]);
            Writer::new(&served.socket, vec![0u8; SIZE]).pattern(5, 96, 256 << 10);
        }
        mirror_add(&["--max-rate", "2M"]);
        let mut served = Served::start(&pair.vdir, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while pair.replica_status()["connected"] != true {
            assert!(Instant::now() < deadline, "the source never connected");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
        served.kill9();
        pair.wait_disconnected();
        assert_eq!(pair.replica_status()["consistent"], false);
        pair
    }
}

#[test]
fn split_brain_is_refused_on_both_sides_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(6, 100, 64 << 10);
    let branch = wait_caught_up(&pair.vdir)["volume"]["last_lsn"].as_u64().unwrap();
    let bdir = tmp.path().join("b").join("vol0");
    // Promoted while A runs (--force): A is disconnected and goes on writing.
    let output = pair.promote(&bdir, &["--force"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    std::thread::sleep(Duration::from_millis(50));
    let at_branch = a.reference.clone();
    a.pattern(7, 40, 64 << 10);
    let b_served = Served::start(&bdir, &[]);
    let mut b = Writer::new(&b_served.socket, at_branch);
    b.assert_equal("B holds A's state at the branch, not A's writes since");
    b.pattern(8, 30, 64 << 10);

    let error = wait_mirror_error(&pair.vdir, "30 records (");
    assert!(error.starts_with("refused by the applier: split brain"), "{error}");
    assert!(error.contains(&format!("40 records (2.5M) after LSN {branch}")) && error.contains("40 of them after the promote"), "{error}");
    assert!(error.contains("30 records (1.9M at most) since") && error.contains("--discard-local-changes"), "{error}");
    let log = std::fs::read_to_string(pair.adir.with_extension("log")).unwrap();
    assert!(log.contains("refused a source"), "the applier refuses too");
    a.assert_equal("A after the refusal");
    b.assert_equal("B after the refusal");
    assert_eq!(status_json(&bdir)["volume"]["last_lsn"].as_u64(), Some(branch + 30));

    // Resolved by choosing B: A's changes go, but only with --discard-local-changes.
    drop(a);
    let mut pair = pair;
    assert_eq!(pair.served.as_mut().unwrap().terminate(), Some(0));
    let a_adir = tmp.path().join("a").join("applier");
    let a_applier_fp = init_applier(&a_adir);
    let demote = |extra: &[&str]| {
        let mut args = vec!["volume", "demote", "--dir", pair.vdir.to_str().unwrap(), "--applier", a_adir.to_str().unwrap()];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let refused = demote(&[]);
    assert!(
        !refused.status.success() && stderr(&refused).contains("split brain") && stderr(&refused).contains("--discard-local-changes"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(status_json(&pair.vdir)["volume"]["role"], "primary", "a refused demote changes nothing");
    let output = demote(&["--discard-local-changes"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("40 records"), "{}", stdout(&output));
    let b_fingerprint = status_json(&bdir)["volume"]["fingerprint"].as_str().unwrap().to_string();
    let (_status, _b_served, b, _a_applier) = fail_back(&a_adir, &a_applier_fp, &b_fingerprint, &bdir, b_served, b);
    let backing = status_json(&pair.vdir)["volume"]["backing"].as_str().unwrap().to_string();
    assert!(std::fs::read(&backing).unwrap() == b.reference, "A converged to B");
}

#[test]
fn a_promote_that_crashed_is_finished_by_running_it_again() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(9, 100, 64 << 10);
    wait_caught_up(&pair.vdir);
    let reference = a.reference.clone();
    drop(a);
    assert_eq!(pair.served.as_mut().unwrap().terminate(), Some(0));
    // The promote runs in the command itself when no applier runs.
    pair.applier.take().unwrap().kill9();
    let bdir = tmp.path().join("b").join("vol0");
    for point in ["promote-before-volume", "promote-before-done"] {
        let crashed = pair.promote(&bdir, &[], &[("UBLK_MIRROR_FAILPOINTS", point)]);
        assert!(!crashed.status.success(), "{point}: the failpoint aborts");
        let other = pair.promote(&tmp.path().join("other"), &[], &[]);
        assert!(!other.status.success() && stderr(&other).contains("begun and not finished"), "{point}: {}", stderr(&other));
        // The replica takes nothing meanwhile: the source is refused.
        let applier = Applier::start(&pair.adir, pair.port);
        let mut served = Served::start(&pair.vdir, &[]);
        wait_mirror_error(&pair.vdir, "was promoted");
        served.terminate();
        drop(applier);
    }
    let output = pair.promote(&bdir, &[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_fingerprint(&fingerprint_line(&stdout(&output)));
    let served = Served::start(&bdir, &[]);
    Writer::new(&served.socket, reference).assert_equal("the volume a crashed promote made");
}

#[test]
fn failback_resyncs_only_what_either_side_changed_and_undoes_the_old_sources_unreplicated_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(10, 200, 64 << 10);
    wait_caught_up(&pair.vdir);
    // The link dies (the applier with it); A writes 20 records that never reach B, then dies.
    pair.applier.take().unwrap().kill9();
    a.pattern_aligned(11, 20, 64 << 10, 64 << 10);
    drop(a);
    pair.served.as_mut().unwrap().kill9();
    pair.applier = Some(Applier::start(&pair.adir, pair.port));
    let bdir = tmp.path().join("b").join("vol0");
    let output = pair.promote(&bdir, &[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let b_fingerprint = fingerprint_line(&stdout(&output));
    let b_served = Served::start(&bdir, &[]);
    let at_branch: Vec<u8> = {
        let mut client = NbdClient::connect(&b_served.socket, "vol0").unwrap();
        (0..SIZE).step_by(MIB).flat_map(|start| client.read(start as u64, MIB as u32)).collect()
    };
    let mut b = Writer::new(&b_served.socket, at_branch);
    // 64 KiB writes on 64 KiB boundaries: each changes one region of the maps.
    b.pattern_aligned(12, 128, 64 << 10, 64 << 10);

    // A comes back: stale, with its 20 unreplicated records counted, all from before the promote.
    pair.served = Some(Served::start(&pair.vdir, &[]));
    let error = wait_mirror_error(&pair.vdir, "is stale");
    assert!(error.contains("wrote 20 records (1.2M)") && error.contains("all before the promote"), "{error}");
    assert_eq!(pair.served.as_mut().unwrap().terminate(), Some(0));

    // Demote A to a replica on its own host: the count is reported before anything is undone.
    let a_adir = tmp.path().join("a").join("applier");
    let a_applier_fp = init_applier(&a_adir);
    let output = cli(&["volume", "demote", "--dir", pair.vdir.to_str().unwrap(), "--applier", a_adir.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["local_records"].as_u64(), Some(20), "{report}");
    assert_eq!(report["after_promote"].as_u64(), Some(0), "{report}");
    assert_eq!(status_json(&pair.vdir)["volume"]["role"], "demoted");
    assert_run_refused(&pair.vdir, "was demoted");

    // B mirrors to A's applier: a failback resync of the regions either side changed.
    let (status, _b_served, mut b, _a_applier) = fail_back(&a_adir, &a_applier_fp, &b_fingerprint, &bdir, b_served, b);
    let sent = status["mirrors"][0]["sent_bytes"].as_u64().unwrap();
    let changed_regions = (128 + 20) * (64 << 10);
    eprintln!("failback sent {sent} bytes for at most {changed_regions} bytes of changed regions (volume {SIZE})");
    assert!(sent <= changed_regions as u64 + MIB as u64, "the failback sent {sent} bytes: more than the changed regions");
    let backing = status_json(&pair.vdir)["volume"]["backing"].as_str().unwrap().to_string();
    let image = std::fs::read(&backing).unwrap();
    assert!(image == b.reference, "A's image equals B byte for byte after the failback");
    assert!(!replica_dir(&a_adir, "vol0").join("local-changes.dirty").exists(), "the local changes were replaced");
    // And it follows B from now on.
    b.pattern(13, 10, 64 << 10);
    wait_caught_up(&bdir);
    assert!(std::fs::read(&backing).unwrap() == b.reference);
}

/// B (the promoted volume, served by `b_served`, written through `b`) mirrors to A's
/// applier in `a_adir`: the failback. Returns B's status once it caught up, B's new server and
/// writer.
fn fail_back(a_adir: &Path, a_applier_fp: &str, b_fingerprint: &str, bdir: &Path, b_served: Served, b: Writer) -> (serde_json::Value, Served, Writer, Applier) {
    assert!(cli(&["applier", "allow", "--dir", a_adir.to_str().unwrap(), b_fingerprint]).status.success());
    let a_port = free_udp_port();
    let a_applier = Applier::start(a_adir, a_port);
    let output = cli(&["mirror", "add", "--dir", bdir.to_str().unwrap(), "--to", &format!("127.0.0.1:{a_port}"), "--fingerprint", a_applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    // A mirror added starts with the next `run`.
    let reference = b.reference.clone();
    drop(b);
    let mut b_served = b_served;
    assert_eq!(b_served.terminate(), Some(0));
    let b_served = Served::start(bdir, &[]);
    let b = Writer::new(&b_served.socket, reference);
    let status = wait_caught_up(bdir);
    (status, b_served, b, a_applier)
}

/// Waits (bounded) until `served`'s process has exited by itself.
fn wait_exit(served: &mut Served, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `run` refuses the volume in `vdir`, saying `why`.
fn assert_run_refused(vdir: &Path, why: &str) {
    let refused = std::process::Command::new(bin()).args(["run", "--dir", vdir.to_str().unwrap(), "--nbd", "unix:/nonexistent/x.sock"]).output().unwrap();
    assert!(!refused.status.success() && stderr(&refused).contains(why), "run was not refused ({why}): {}", stderr(&refused));
}

/// Makes an applier directory; returns its fingerprint.
fn init_applier(adir: &Path) -> String {
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    fingerprint_line(&stdout(&output))
}

#[test]
fn a_planned_switchover_resends_nothing_and_the_same_command_swaps_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(20, 100, 64 << 10);
    let reference = a.reference.clone();
    drop(a);
    let a_adir = tmp.path().join("a").join("applier");
    init_applier(&a_adir);
    let a_port = free_udp_port();
    let output = cli(&[
        "mirror",
        "switchover",
        "--dir",
        pair.vdir.to_str().unwrap(),
        "--applier",
        a_adir.to_str().unwrap(),
        "--applier-address",
        &format!("127.0.0.1:{a_port}"),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("switchover: {report}");
    assert_eq!(report["demoted"]["local_records"].as_u64(), Some(0));
    let to = PathBuf::from(report["switched_over"]["to"].as_str().unwrap());
    assert_eq!(to, pair.adir.join("volumes").join("vol0"));
    // A's `run` stopped by itself.
    wait_exit(pair.served.as_mut().unwrap(), "run did not stop after the switchover");
    assert_eq!(status_json(&pair.vdir)["volume"]["role"], "demoted");

    // The new primary serves the same data and mirrors back: nothing is resent.
    let _a_applier = Applier::start(&a_adir, a_port);
    let b_served = Served::start(&to, &[]);
    let mut b = Writer::new(&b_served.socket, reference);
    b.assert_equal("the new primary after the switchover");
    let status = wait_caught_up_or_idle(&to);
    assert_eq!(status["mirrors"][0]["sent_bytes"].as_u64(), Some(0), "nothing resent after the switch: {status}");
    b.pattern(21, 16, 64 << 10);
    let status = wait_caught_up(&to);
    assert_eq!(status["mirrors"][0]["resync_sent_bytes"].as_u64().unwrap_or(0), 0, "{status}");
    let backing = status_json(&pair.vdir)["volume"]["backing"].as_str().unwrap().to_string();
    assert!(std::fs::read(&backing).unwrap() == b.reference, "the old source follows the new primary");

    // Back: the same command the other way; A's own directory is the primary again.
    let reference = b.reference.clone();
    drop(b);
    let output = cli(&[
        "mirror",
        "switchover",
        "--dir",
        to.to_str().unwrap(),
        "--applier",
        pair.adir.to_str().unwrap(),
        "--applier-address",
        &format!("127.0.0.1:{}", pair.port),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let back: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(PathBuf::from(back["switched_over"]["to"].as_str().unwrap()), pair.vdir, "{back}");
    let mut b_served = b_served;
    wait_exit(&mut b_served, "the new primary's run did not stop after switching back");
    let status = status_json(&pair.vdir);
    assert_eq!(status["volume"]["role"], "primary");
    assert_eq!(status["volume"]["generations"].as_array().unwrap().len(), 3, "{status}");
    pair.served = Some(Served::start(&pair.vdir, &[]));
    let mut a = Writer::new(&pair.socket(), reference);
    a.assert_equal("A after switching back");
    let status = wait_caught_up_or_idle(&pair.vdir);
    assert_eq!(status["mirrors"][0]["sent_bytes"].as_u64(), Some(0), "nothing resent after switching back: {status}");
    a.pattern(22, 8, 64 << 10);
    wait_caught_up(&pair.vdir);
}

/// Waits (bounded) until the volume's only mirror is connected and consistent and has
/// applied everything (which may be nothing).
fn wait_caught_up_or_idle(volume: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = status_json(volume);
        let mirror = &status["mirrors"][0];
        if mirror["connected"] == true && mirror["consistent"] == true && mirror["applied_lsn"] == status["volume"]["last_lsn"] {
            return status;
        }
        assert!(Instant::now() < deadline, "mirror never settled: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn crashes_during_demote_and_switchover_leave_states_the_commands_continue_from() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    a.pattern(30, 60, 64 << 10);
    let reference = a.reference.clone();
    drop(a);
    // The applier dies while it promotes for a switchover, before it answers.
    pair.applier.take().unwrap().kill9();
    pair.applier = Some(Applier::start_with_env(&pair.adir, pair.port, &[("UBLK_MIRROR_FAILPOINTS", "switchover-before-answer")]));
    wait_caught_up(&pair.vdir);
    let a_adir = tmp.path().join("a").join("applier");
    init_applier(&a_adir);
    let a_port = free_udp_port();
    let switchover = |dir: &Path, adir: &Path, port: u16| {
        cli(&["mirror", "switchover", "--dir", dir.to_str().unwrap(), "--applier", adir.to_str().unwrap(), "--applier-address", &format!("127.0.0.1:{port}")])
    };
    let output = switchover(&pair.vdir, &a_adir, a_port);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("fenced"), "the source does not know the outcome, so it is fenced: {}", stderr(&output));
    // Fenced: a write fails, a read still works.
    let mut client = NbdClient::connect(&pair.socket(), "vol0").unwrap();
    assert_ne!(client.write(0, &[1u8; 4096]), 0, "a fenced volume takes no write");
    assert!(client.read(0, 4096) == reference[..4096]);
    drop(client);
    assert_eq!(pair.served.as_mut().unwrap().terminate(), Some(0));
    // The applier had promoted: its status says so; the source is demoted by hand, and a
    // crash inside the demote is finished by running it again.
    pair.applier.take().unwrap().kill9();
    let replica = applier_status(&pair.adir)["replicas"][0].clone();
    let to = PathBuf::from(replica["promoted_to"].as_str().expect("the replica was promoted"));
    let demote = |env: &[(&str, &str)]| {
        std::process::Command::new(bin())
            .args(["volume", "demote", "--dir", pair.vdir.to_str().unwrap(), "--applier", a_adir.to_str().unwrap()])
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    assert!(!demote(&[("UBLK_MIRROR_FAILPOINTS", "demote-before-replica")]).status.success());
    assert_run_refused(&pair.vdir, "was demoted");
    let output = demote(&[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("undone     nothing"), "{}", stdout(&output));
    // The new primary serves the data and mirrors to the old source's applier once told to.
    let fingerprint = status_json(&to)["volume"]["fingerprint"].as_str().unwrap().to_string();
    assert!(cli(&["applier", "allow", "--dir", a_adir.to_str().unwrap(), &fingerprint]).status.success());
    let a_applier_fp = applier_status(&a_adir)["fingerprint"].as_str().unwrap().to_string();
    let output = cli(&["mirror", "add", "--dir", to.to_str().unwrap(), "--to", &format!("127.0.0.1:{a_port}"), "--fingerprint", &a_applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    let _a_applier = Applier::start(&a_adir, a_port);
    let served = Served::start(&to, &[]);
    let mut b = Writer::new(&served.socket, reference);
    b.assert_equal("the promoted volume");
    b.pattern(31, 8, 64 << 10);
    let status = wait_caught_up(&to);
    assert_eq!(status["mirrors"][0]["resync_sent_bytes"].as_u64().unwrap_or(0), 0, "{status}");
    let backing = status_json(&pair.vdir)["volume"]["backing"].as_str().unwrap().to_string();
    assert!(std::fs::read(&backing).unwrap() == b.reference);
}

#[test]
fn a_dead_backing_store_is_restored_from_the_replica_and_the_journal_redone() {
    require_tool("mkfs.ext4", "e2fsprogs");
    let tmp = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(tmp.path());
    // An ext4 filesystem with files, written through the export.
    let files = tmp.path().join("files");
    std::fs::create_dir(&files).unwrap();
    for i in 0..20 {
        std::fs::write(files.join(format!("f{i}")), vec![i as u8; 100_000 + i * 777]).unwrap();
    }
    let fs_image = tmp.path().join("fs.img");
    std::fs::write(&fs_image, vec![0u8; SIZE]).unwrap();
    let mkfs = std::process::Command::new("mkfs.ext4").args(["-q", "-F", "-d", files.to_str().unwrap(), fs_image.to_str().unwrap()]).output().unwrap();
    assert!(mkfs.status.success(), "{}", String::from_utf8_lossy(&mkfs.stderr));
    let mut a = Writer::new(&pair.socket(), vec![0u8; SIZE]);
    let bytes = std::fs::read(&fs_image).unwrap();
    for start in (0..SIZE).step_by(MIB) {
        assert_eq!(a.client.write(start as u64, &bytes[start..start + MIB]), 0);
    }
    a.reference.copy_from_slice(&bytes);
    assert_eq!(a.client.flush(), 0);
    wait_caught_up(&pair.vdir);
    // The applier goes away; ten more writes (in the filesystem's free space at its end) stay
    // in A's journal only. Then A stops and its backing store dies.
    pair.applier.take().unwrap().kill9();
    let mut rng = rand::rngs::StdRng::seed_from_u64(40);
    for _ in 0..10 {
        let offset = rng.gen_range(28 * MIB / 4096..(SIZE - 65536) / 4096) * 4096;
        let mut data = vec![0u8; 65536];
        rng.fill(&mut data[..]);
        assert_eq!(a.client.write(offset as u64, &data), 0);
        a.reference[offset..offset + 65536].copy_from_slice(&data);
    }
    assert_eq!(a.client.flush(), 0);
    let reference = a.reference.clone();
    drop(a);
    assert_eq!(pair.served.as_mut().unwrap().terminate(), Some(0));
    let backing = PathBuf::from(status_json(&pair.vdir)["volume"]["backing"].as_str().unwrap());
    std::fs::remove_file(&backing).unwrap();

    pair.applier = Some(Applier::start(&pair.adir, pair.port));
    let fingerprint = applier_status(&pair.adir)["fingerprint"].as_str().unwrap().to_string();
    let output = cli(&[
        "volume",
        "restore",
        "--dir",
        pair.vdir.to_str().unwrap(),
        "--from",
        &format!("127.0.0.1:{}", pair.port),
        "--fingerprint",
        &fingerprint,
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let restored: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("restore: {restored}");
    assert_eq!(restored["redone_records"].as_u64(), Some(10), "{restored}");
    assert!(restored["chunks_fetched"].as_u64().unwrap() < 32, "zero chunks are not fetched: {restored}");
    assert!(std::fs::read(&backing).unwrap() == reference, "the restored volume holds every acknowledged write");
    let copy = tmp.path().join("check.img");
    std::fs::copy(&backing, &copy).unwrap();
    let fsck = std::process::Command::new("e2fsck").args(["-fn", copy.to_str().unwrap()]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    // Running it again is harmless (what the replica lacks is fetched and redone again); then
    // the volume serves and mirrors as before.
    let output = cli(&[
        "volume",
        "restore",
        "--dir",
        pair.vdir.to_str().unwrap(),
        "--from",
        &format!("127.0.0.1:{}", pair.port),
        "--fingerprint",
        &fingerprint,
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    pair.served = Some(Served::start(&pair.vdir, &[]));
    Writer::new(&pair.socket(), reference).assert_equal("the restored volume, served");
    wait_caught_up(&pair.vdir);
}
