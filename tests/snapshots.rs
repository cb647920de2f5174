//! Consistency points: markers at the source, the applier's snapshot of the replica at each
//! one (copy-on-write on ext4 and on a filesystem that fills up, reflink on XFS), groups of
//! volumes marked at one instant, read-only NBD exports read by qemu-img while replication
//! goes on, crashes of the applier while it preserves chunks, and the refusals.

mod common;
use common::nbd_client::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use ublk_mirror::applier::snapshot::SnapshotReader;
use ublk_mirror::layout::ReplicaDir;

const MIB: usize = 1 << 20;

/// An applier in `abase/applier` and volumes mirrored to it, each served over NBD.
struct Site {
    adir: PathBuf,
    applier_fp: String,
    port: u16,
    applier: Option<Applier>,
    volumes: Vec<Volume>,
}

struct Volume {
    dir: PathBuf,
    name: String,
    served: Option<Served>,
}

impl Site {
    fn new(abase: &Path) -> Site {
        let adir = abase.join("applier");
        let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
        assert!(output.status.success(), "{}", stderr(&output));
        let applier_fp = fingerprint_line(&stdout(&output));
        let port = free_udp_port();
        let applier = Applier::start(&adir, port);
        Site { adir, applier_fp, port, applier: Some(applier), volumes: Vec::new() }
    }

    /// Creates, mirrors and serves volume `name` in `vbase/name`; returns its index.
    fn add(&mut self, vbase: &Path, name: &str, size: &str) -> usize {
        let dir = vbase.join(name);
        let fp = fingerprint_line(&create_volume(&dir, name, size, &["--journal-size", "64M", "--segment-size", "4M"]));
        assert!(cli(&["applier", "allow", "--dir", self.adir.to_str().unwrap(), &fp]).status.success());
        let output = cli(&["mirror", "add", "--dir", dir.to_str().unwrap(), "--to", &format!("127.0.0.1:{}", self.port), "--fingerprint", &self.applier_fp]);
        assert!(output.status.success(), "{}", stderr(&output));
        let served = Served::start(&dir, &[]);
        wait_consistent(&dir);
        self.volumes.push(Volume { dir, name: name.to_string(), served: Some(served) });
        self.volumes.len() - 1
    }

    fn vdir(&self, index: usize) -> &Path {
        &self.volumes[index].dir
    }

    fn socket(&self, index: usize) -> PathBuf {
        self.volumes[index].served.as_ref().unwrap().socket.clone()
    }

    fn replica(&self, index: usize) -> ReplicaDir {
        ReplicaDir::new(replica_dir(&self.adir, &self.volumes[index].name))
    }

    fn restart_applier(&mut self, env: &[(&str, &str)]) {
        if let Some(mut applier) = self.applier.take() {
            applier.kill9();
        }
        self.applier = Some(Applier::start_with_env(&self.adir, self.port, env));
    }
}

/// The device as the test wrote it: every write applied to a reference copy too.
struct Writer {
    client: NbdClient,
    reference: Vec<u8>,
}

impl Writer {
    fn new(socket: &Path, export: &str, size: usize) -> Writer {
        Writer { client: NbdClient::connect(socket, export).expect("connect"), reference: vec![0u8; size] }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        assert_eq!(self.client.write(offset as u64, data), 0, "write at {offset}");
        self.reference[offset..offset + data.len()].copy_from_slice(data);
    }

    /// `count` writes of `length` bytes at seeded offsets (aligned to 4 KiB), filled with
    /// seeded bytes; then a flush.
    fn pattern(&mut self, seed: u64, count: usize, length: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..count {
            let offset = rng.gen_range(0..(self.reference.len() - length) / 4096) * 4096;
            let mut data = vec![0u8; length];
            rng.fill(&mut data[..]);
            self.write(offset, &data);
        }
        assert_eq!(self.client.flush(), 0);
    }
}

fn marker(dirs: &[&Path], name: &str) -> serde_json::Value {
    let mut args = vec!["marker", "create", "--name", name, "--json"];
    for dir in dirs {
        args.extend(["--dir", dir.to_str().unwrap()]);
    }
    let output = cli(&args);
    assert!(output.status.success(), "marker create {name}: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("marker create --json prints JSON")
}

fn snapshot_list(adir: &Path) -> serde_json::Value {
    let output = cli(&["applier", "snapshot", "list", "--dir", adir.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn snapshot_named<'a>(list: &'a serde_json::Value, volume: &str, name: &str) -> &'a serde_json::Value {
    list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["volume"] == volume && s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name} of {volume} in {list}"))
}

/// An `applier snapshot export` process; stopped with SIGTERM when dropped.
struct Export {
    child: Child,
    socket: PathBuf,
}

impl Export {
    fn start(adir: &Path, volume: &str, what: &[&str], socket: &Path) -> Export {
        let _ = std::fs::remove_file(socket);
        let mut args = vec!["applier", "snapshot", "export", "--dir", adir.to_str().unwrap(), "--volume", volume, "--nbd"];
        let address = format!("unix:{}", socket.display());
        args.push(&address);
        args.extend_from_slice(what);
        let log = std::fs::File::create(socket.with_extension("log")).unwrap();
        let mut child = Command::new(bin()).args(&args).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("export exited ({status}): {}", std::fs::read_to_string(socket.with_extension("log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "the export did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Export { child, socket: socket.to_path_buf() }
    }

    /// The whole export copied out by qemu-img.
    fn read_all(&self, volume: &str, scratch: &Path) -> Vec<u8> {
        let out = scratch.join("export-copy.img");
        let _ = std::fs::remove_file(&out);
        let uri = format!("nbd+unix:///{volume}?socket={}", self.socket.display());
        let output = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri, out.to_str().unwrap()]).output().expect("qemu-img");
        assert!(output.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&output.stderr));
        std::fs::read(&out).unwrap()
    }

    fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().unwrap();
        status.code()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: size");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: differs first at byte {at} (chunk {})", at / (64 << 10));
    }
}

fn read_snapshot(replica: &ReplicaDir, name: &str) -> Vec<u8> {
    let reader = SnapshotReader::open(replica, name).unwrap_or_else(|e| panic!("open snapshot {name}: {e}"));
    let mut data = vec![0u8; reader.size() as usize];
    for (index, piece) in data.chunks_mut(MIB).enumerate() {
        reader.read_at(piece, (index * MIB) as u64).unwrap();
    }
    data
}

/// A, marker m1, B, marker m2, C: each snapshot read back through the NBD export equals the
/// source after A and after A+B, while replication goes on; the replica head is all of it.
fn markers_and_exports_on(kind: &str, expected_kind: &str) {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(tmp.path(), kind, 1 << 30);
    let mut site = Site::new(&fs.mount);
    let v = site.add(tmp.path(), "vol0", "32M");
    let size = 32 * MIB;
    let mut writer = Writer::new(&site.socket(v), "vol0", size);
    writer.pattern(1, 200, 64 << 10);
    let after_a = writer.reference.clone();
    let m1 = marker(&[site.vdir(v)], "m1");
    let m1_lsn = m1["volumes"][0]["lsn"].as_u64().unwrap();
    assert!(m1["max_hold_us"].as_u64().unwrap() < 1_000_000, "a marker held writes for a second: {m1}");
    writer.pattern(2, 300, 4096);
    writer.pattern(3, 20, 256 << 10);
    let after_ab = writer.reference.clone();
    marker(&[site.vdir(v)], "m2");
    writer.pattern(4, 300, 8192);
    wait_caught_up(site.vdir(v));

    let list = snapshot_list(&site.adir);
    let s1 = snapshot_named(&list, "vol0", "m1");
    assert_eq!(s1["lsn"], m1_lsn, "the snapshot is at the marker's LSN");
    assert_eq!(s1["valid"], true);
    assert_eq!(s1["kind"], expected_kind, "{s1}");
    assert!(s1["group"].is_null());
    assert!(s1["created"].as_str().unwrap().ends_with('Z'));
    assert!(s1["size_bytes"].as_u64().unwrap() > 0, "m1 holds the chunks changed after it: {s1}");
    assert_eq!(snapshot_named(&list, "vol0", "m2")["valid"], true);

    // m1 exported and read while writes go on and replicate.
    let export = Export::start(&site.adir, "vol0", &["--snapshot", "m1"], &tmp.path().join("m1.sock"));
    let done = Arc::new(AtomicBool::new(false));
    let background = {
        let (socket, done) = (site.socket(v), done.clone());
        std::thread::spawn(move || {
            let mut client = NbdClient::connect(&socket, "vol0").unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut written = Vec::new();
            while !done.load(Ordering::Relaxed) && written.len() < 2000 {
                let offset = rng.gen_range(0..(32 * MIB - 4096) / 4096) * 4096;
                let data: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
                assert_eq!(client.write(offset as u64, &data), 0);
                written.push((offset, data));
            }
            assert_eq!(client.flush(), 0);
            written
        })
    };
    same(&export.read_all("vol0", tmp.path()), &after_a, "snapshot m1 read through NBD");
    // Writes to a read-only export fail with EPERM and change nothing.
    let mut client = NbdClient::connect(&export.socket, "vol0").expect("connect to the export");
    assert_eq!(client.write(0, &[0xAB; 4096]), 1, "a write to the read-only export must fail with EPERM");
    assert_eq!(client.read(0, 4096), after_a[..4096].to_vec());
    client.disconnect();
    done.store(true, Ordering::Relaxed);
    for (offset, data) in background.join().unwrap() {
        writer.reference[offset..offset + data.len()].copy_from_slice(&data);
    }
    same(&export.read_all("vol0", tmp.path()), &after_a, "snapshot m1 after more writes were applied");
    assert_eq!(export.stop(), Some(0));

    let export = Export::start(&site.adir, "vol0", &["--snapshot", "m2"], &tmp.path().join("m2.sock"));
    same(&export.read_all("vol0", tmp.path()), &after_ab, "snapshot m2 read through NBD");
    drop(export);

    wait_caught_up(site.vdir(v));
    let image = std::fs::read(site.replica(v).default_image()).unwrap();
    same(&image, &writer.reference, "the replica head");
    let latest = Export::start(&site.adir, "vol0", &["--latest"], &tmp.path().join("latest.sock"));
    same(&latest.read_all("vol0", tmp.path()), &writer.reference, "export --latest");
    assert_eq!(snapshot_list(&site.adir)["snapshots"].as_array().unwrap().len(), 3, "--latest holds a temporary snapshot while it runs");
    assert_eq!(latest.stop(), Some(0));
    assert_eq!(snapshot_list(&site.adir)["snapshots"].as_array().unwrap().len(), 2, "the temporary snapshot is deleted after the export");

    // The source's view: both markers applied by the mirror.
    // --all: the mirror has applied both, so the journal may already be trimmed past them.
    let output = cli(&["marker", "list", "--dir", site.vdir(v).to_str().unwrap(), "--all", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let markers: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let names: Vec<&str> = markers["markers"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["m1", "m2"]);
    assert!(markers["markers"].as_array().unwrap().iter().all(|m| m["mirrors"][0]["state"] == "applied"), "{markers}");
    let mirror = &status_json(site.vdir(v))["mirrors"][0];
    assert_eq!((mirror["markers_pending"].as_u64(), mirror["last_marker_applied"].as_str()), (Some(0), Some("m2")), "{mirror}");
    assert_eq!(applier_status(&site.adir)["replicas"][0]["snapshots"], 2);

    let output = cli(&["applier", "snapshot", "delete", "--dir", site.adir.to_str().unwrap(), "--volume", "vol0", "--snapshot", "m1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let list = snapshot_list(&site.adir);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "{list}");
    same(&read_snapshot(&site.replica(v), "m2"), &after_ab, "m2 after m1 was deleted");
    drop(site);
}

#[test]
fn copy_on_write_snapshots_on_ext4_read_back_exactly_through_nbd() {
    markers_and_exports_on("ext4", "cow");
}

#[test]
fn reflink_snapshots_on_xfs_read_back_exactly_through_nbd() {
    markers_and_exports_on("xfs", "reflink");
}

/// Counters written to volume 1 then volume 2 (and the other way round), group markers
/// taken meanwhile: every group snapshot is one instant of both.
#[test]
fn group_markers_cut_every_member_at_one_instant() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::new(tmp.path());
    let v1 = site.add(tmp.path(), "g1", "8M");
    let v2 = site.add(tmp.path(), "g2", "8M");
    let mut marks = Vec::new();
    let mut holds = Vec::new();
    for (order, first_then_second) in [("forward", (v1, v2)), ("backward", (v2, v1))] {
        let stop = Arc::new(AtomicBool::new(false));
        let counting = {
            let (a, b, stop) = (site.socket(first_then_second.0), site.socket(first_then_second.1), stop.clone());
            let (name_a, name_b) = (site.volumes[first_then_second.0].name.clone(), site.volumes[first_then_second.1].name.clone());
            std::thread::spawn(move || {
                let mut first = NbdClient::connect(&a, &name_a).unwrap();
                let mut second = NbdClient::connect(&b, &name_b).unwrap();
                let mut counter = 0u64;
                while !stop.load(Ordering::Relaxed) && counter < 1_000_000 {
                    counter += 1;
                    let block = counter.to_le_bytes().repeat(512);
                    // Acknowledged on the first volume before it is written to the second.
                    assert_eq!(first.write(0, &block), 0);
                    assert_eq!(second.write(0, &block), 0);
                }
                counter
            })
        };
        for n in 0..8 {
            std::thread::sleep(Duration::from_millis(150));
            let name = format!("{order}{n}");
            let created = marker(&[site.vdir(v1), site.vdir(v2)], &name);
            assert_eq!(created["group"], name, "an ad hoc group is named after its marker");
            holds.push(created["max_hold_us"].as_u64().unwrap());
            marks.push((name, order));
        }
        stop.store(true, Ordering::Relaxed);
        let counted = counting.join().unwrap();
        assert!(counted > 16, "the writer barely ran ({counted} writes)");
    }
    wait_caught_up(site.vdir(v1));
    wait_caught_up(site.vdir(v2));
    let list = snapshot_list(&site.adir);
    for (name, order) in &marks {
        let counter = |index: usize| u64::from_le_bytes(read_snapshot(&site.replica(index), name)[..8].try_into().unwrap());
        let (c1, c2) = (counter(v1), counter(v2));
        let (first, second) = if *order == "forward" { (c1, c2) } else { (c2, c1) };
        assert!(second <= first && first <= second + 1, "group snapshot {name} mixes instants: written first {first}, second {second}");
        let group = list["groups"].as_array().unwrap().iter().find(|g| g["name"] == *name).unwrap_or_else(|| panic!("no group {name}: {list}"));
        assert_eq!(group["complete"], true, "{group}");
        assert_eq!(group["members"].as_object().unwrap().len(), 2);
    }
    holds.sort_unstable();
    eprintln!("group marker hold over 2 volumes: median {} us, max {} us", holds[holds.len() / 2], holds[holds.len() - 1]);
    assert!(*holds.last().unwrap() < 1_000_000, "a group marker held writes for over a second");
}

/// The applier killed (SIGKILL, and aborted right before a chunk map commit) while it copies
/// chunks for a snapshot: after recovery every snapshot still reads exactly its marker's
/// state. Each round takes a new marker, so there are chunks to preserve every time.
#[test]
fn snapshots_stay_exact_when_the_applier_dies_while_preserving() {
    let tmp = tempfile::tempdir().unwrap();
    // ext4: the copy-on-write path whatever the host's filesystem.
    let fs = LoopFs::new(tmp.path(), "ext4", 1 << 30);
    let mut site = Site::new(&fs.mount);
    let v = site.add(tmp.path(), "vol0", "16M");
    let mut writer = Writer::new(&site.socket(v), "vol0", 16 * MIB);
    writer.pattern(10, 256, 64 << 10);
    let failpoint_file = tmp.path().join("fire");
    let mut states = Vec::new();
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let name = format!("m{seed}");
        states.push((name.clone(), writer.reference.clone()));
        marker(&[site.vdir(v)], &name);
        // Seed 3: abort exactly between a chunk's data and its mapping's commit.
        if seed == 3 {
            let spec = format!("snapshot-preserve-before-map-sync={}", failpoint_file.display());
            site.restart_applier(&[("UBLK_MIRROR_FAILPOINTS", spec.as_str())]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let socket = site.socket(v);
        let background = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut client = NbdClient::connect(&socket, "vol0").unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + seed);
                let mut written = Vec::new();
                // Bounded well below the journal (64 MiB), so the mirror never falls out of it and
                // every marker reaches the replica record by record.
                while !stop.load(Ordering::Relaxed) && written.len() < 6000 {
                    let offset = rng.gen_range(0..(16 * MIB - 4096) / 4096) * 4096;
                    let data = vec![rng.gen::<u8>(); 4096];
                    assert_eq!(client.write(offset as u64, &data), 0);
                    written.push((offset, data));
                }
                assert_eq!(client.flush(), 0);
                written
            })
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        if seed == 3 {
            std::fs::write(&failpoint_file, b"").unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while site.applier.as_mut().unwrap().child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(site.adir.with_extension("log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!("the failpoint did not fire; applier log, newest first:\n{}\nstatus {}", tail.join("\n"), status_json(site.vdir(v)));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_file(&failpoint_file);
        }
        site.restart_applier(&[]);
        stop.store(true, Ordering::Relaxed);
        for (offset, data) in background.join().unwrap() {
            writer.reference[offset..offset + data.len()].copy_from_slice(&data);
        }
        wait_caught_up(site.vdir(v));
        let list = snapshot_list(&site.adir);
        for (name, state) in &states {
            assert_eq!(snapshot_named(&list, "vol0", name)["valid"], true, "seed {seed}: {name}");
            same(&read_snapshot(&site.replica(v), name), state, &format!("seed {seed}: snapshot {name} after the applier died"));
        }
    }
    let image = std::fs::read(site.replica(v).default_image()).unwrap();
    same(&image, &writer.reference, "the replica head");
    drop(site);
}

/// The snapshot store on a filesystem that fills up: the snapshot is marked invalid with
/// the reason, replication goes on, the replica equals the source.
#[test]
fn a_full_snapshot_store_invalidates_the_snapshot_not_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::new(tmp.path());
    let v = site.add(tmp.path(), "vol0", "16M");
    let mut writer = Writer::new(&site.socket(v), "vol0", 16 * MIB);
    writer.pattern(20, 16, 4096);
    wait_caught_up(site.vdir(v));
    let snapshots = site.replica(v).snapshots();
    std::fs::create_dir_all(&snapshots).unwrap();
    let small = LoopFs::new(tmp.path(), "tmpfs", 1 << 20);
    let mount_point = small.mount.clone();
    let status = Command::new("mount").args(["--bind", mount_point.to_str().unwrap(), snapshots.to_str().unwrap()]).status().unwrap();
    assert!(status.success(), "bind mount the small filesystem over the snapshots directory");
    marker(&[site.vdir(v)], "m1");
    writer.pattern(21, 400, 4096);
    wait_caught_up(site.vdir(v));
    let list = snapshot_list(&site.adir);
    let s1 = snapshot_named(&list, "vol0", "m1");
    assert_eq!(s1["valid"], false, "{s1}");
    let reason = s1["invalid_reason"].as_str().unwrap();
    assert!(reason.contains("No space left") || reason.contains("space"), "the reason names the cause: {reason}");
    // The applier's status counts it (the metric ublk_mirror_replica_snapshots_invalid).
    let status = applier_status(&site.adir);
    assert_eq!(status["replicas"][0]["snapshots_invalid"], 1, "{status}");
    let image = std::fs::read(site.replica(v).default_image()).unwrap();
    same(&image, &writer.reference, "the replica after the snapshot store filled");
    let output = cli(&[
        "applier",
        "snapshot",
        "export",
        "--dir",
        site.adir.to_str().unwrap(),
        "--volume",
        "vol0",
        "--snapshot",
        "m1",
        "--nbd",
        &format!("unix:{}", tmp.path().join("x.sock").display()),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("is invalid"), "{}", stderr(&output));
    if let Some(mut applier) = site.applier.take() {
        applier.kill9();
    }
    let _ = Command::new("umount").arg(&snapshots).status();
    drop(small);
}

/// Markers taken by themselves: `[markers] every` in volume.toml, and `marker schedule` for
/// a group declared in a groups file.
#[test]
fn scheduled_markers_for_a_volume_and_for_a_group() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::new(tmp.path());
    let v1 = site.add(tmp.path(), "s1", "8M");
    let v2 = site.add(tmp.path(), "s2", "8M");
    // The volume's own schedule (read when `run` starts).
    let config_path = site.vdir(v1).join("volume.toml");
    let mut config = std::fs::read_to_string(&config_path).unwrap();
    config.push_str("\n[markers]\nevery = \"10s\"\nprefix = \"hourly\"\n");
    std::fs::write(&config_path, config).unwrap();
    let mut served = site.volumes[v1].served.take().unwrap();
    served.terminate();
    site.volumes[v1].served = Some(Served::start(site.vdir(v1), &[]));
    let groups = tmp.path().join("groups.toml");
    std::fs::write(
        &groups,
        format!(
            "format_version = 1\n[group.pair]\nvolumes = [\"{}\", \"{}\"]\nevery = \"10s\"\nprefix = \"grp\"\n",
            site.vdir(v1).display(),
            site.vdir(v2).display()
        ),
    )
    .unwrap();
    let mut scheduler =
        Command::new(bin()).args(["marker", "schedule", "--group", "pair", "--groups", groups.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let names = |dir: &Path| -> Vec<String> {
        // --all: a marker the mirror applied may be trimmed from the journal before we look.
        let output = cli(&["marker", "list", "--dir", dir.to_str().unwrap(), "--all", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        list["markers"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    loop {
        let (first, second) = (names(site.vdir(v1)), names(site.vdir(v2)));
        let own = first.iter().any(|n| n.starts_with("hourly-"));
        let grouped = first.iter().find(|n| n.starts_with("grp-")).filter(|n| second.contains(n));
        if own && grouped.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "scheduled markers did not appear: {first:?} {second:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = Command::new("kill").args(["-TERM", &scheduler.id().to_string()]).status();
    assert!(scheduler.wait().unwrap().success(), "marker schedule exits 0 on SIGTERM");
    let output = cli(&["marker", "create", "--group", "pair", "--groups", groups.to_str().unwrap(), "--name", "by-hand", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(created["group"], "pair");
    assert_eq!(created["volumes"].as_array().unwrap().len(), 2);
}

/// Bad input: a clear error and nothing changed.
#[test]
fn bad_marker_and_snapshot_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::new(tmp.path());
    let v = site.add(tmp.path(), "vol0", "8M");
    let vdir = site.vdir(v).to_str().unwrap().to_string();
    let adir = site.adir.to_str().unwrap().to_string();
    let refused = |args: &[&str], expected: &str| {
        let output = cli(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr(&output).contains(expected), "{args:?}: expected {expected:?} in: {}", stderr(&output));
    };
    refused(&["marker", "create", "--dir", &vdir, "--name", "../etc"], "may hold only letters");
    marker(&[site.vdir(v)], "once");
    refused(&["marker", "create", "--dir", &vdir, "--name", "once"], "already has a marker named \"once\"");
    // A volume without mirrors, and one that is not running.
    let lonely = tmp.path().join("lonely");
    create_volume(&lonely, "lonely", "8M", &[]);
    refused(&["marker", "create", "--dir", lonely.to_str().unwrap(), "--name", "x"], "is not running");
    let served = Served::start(&lonely, &[]);
    refused(&["marker", "create", "--dir", lonely.to_str().unwrap(), "--name", "x"], "has no mirrors");
    drop(served);
    refused(&["marker", "create", "--dir", &vdir, "--dir", lonely.to_str().unwrap(), "--name", "x"], "is not running");
    // Groups files.
    let groups = tmp.path().join("groups.toml");
    std::fs::write(&groups, format!("format_version = 1\n[group.solo]\nvolumes = [\"{vdir}\"]\n")).unwrap();
    refused(&["marker", "create", "--group", "solo", "--groups", groups.to_str().unwrap()], "at least two volumes");
    std::fs::write(&groups, "format_version = 1\n").unwrap();
    refused(&["marker", "create", "--group", "nosuch", "--groups", groups.to_str().unwrap()], "declares no group \"nosuch\"");
    // Snapshots.
    wait_caught_up(site.vdir(v));
    let socket = format!("unix:{}", tmp.path().join("e.sock").display());
    refused(&["applier", "snapshot", "export", "--dir", &adir, "--volume", "vol0", "--snapshot", "nosuch", "--nbd", &socket], "no snapshot \"nosuch\"");
    refused(&["applier", "snapshot", "export", "--dir", &adir, "--volume", "nosuch", "--snapshot", "once", "--nbd", &socket], "holds no replica of nosuch");
    refused(
        &["applier", "snapshot", "export", "--dir", &adir, "--volume", "vol0", "--snapshot", "once", "--nbd", "tcp:0.0.0.0:10809"],
        "not a loopback address",
    );
    refused(&["applier", "snapshot", "delete", "--dir", &adir, "--volume", "vol0", "--snapshot", "nosuch"], "no snapshot \"nosuch\"");
    refused(&["applier", "snapshot", "delete", "--dir", &adir, "--volume", "vol0", "--snapshot", "a/b"], "may hold only letters");
    // An exported snapshot cannot be deleted.
    let export = Export::start(&site.adir, "vol0", &["--snapshot", "once"], &tmp.path().join("held.sock"));
    refused(&["applier", "snapshot", "delete", "--dir", &adir, "--volume", "vol0", "--snapshot", "once"], "is being exported");
    drop(export);
    let list = snapshot_list(&site.adir);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "nothing changed: {list}");
    assert_eq!(snapshot_named(&list, "vol0", "once")["valid"], true);
}
