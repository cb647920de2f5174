//! Snapshot benchmark (`cargo bench --bench snapshots`): prints two tables, asserts nothing.
//!
//! 1. The applier's apply throughput (records received, journaled and applied to the replica
//!    image, then an image checkpoint) for 4 KiB random and 1 MiB random writes, with no
//!    snapshot, one live snapshot and eight (the copy-on-write cost: each first write to a
//!    64 KiB chunk after a snapshot copies the chunk into every live snapshot's store first).
//!    In-process (the library's `Replica`, as the daemon drives it), on this machine's
//!    filesystem (copy-on-write snapshots) and, when root can make one, on an XFS loop
//!    filesystem with reflink (snapshots are clones: no copy).
//! 2. The hold time of a group marker over 2 and 8 volumes while each takes 4 KiB random
//!    writes (fio, nbd engine): p50, p99 and max of the longest member hold per marker, and
//!    of every member's hold.
//!
//! BENCH_MARKERS sets the markers per group size (default 40).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fingerprint, run, Daemon};

use rand::{Rng, SeedableRng};
use ublk_mirror::applier::replica::Replica;
use ublk_mirror::extent::Extent;
use ublk_mirror::journal::RecordKind;
use ublk_mirror::marker::Marker;
use ublk_mirror::protocol::wire::{Hello, ReceivedRecord, WireGeneration, PROTOCOL_VERSION};

const BIN: &str = env!("CARGO_BIN_EXE_ublk-mirror");
const DEVICE: u64 = 256 << 20;

fn main() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-snapshots");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    println!("Snapshots ({} CPUs)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!();
    println!("1. Applier apply throughput, {} MiB replica (records journaled, applied, checkpointed)", DEVICE >> 20);
    println!("{:<34} {:>10} {:>12} {:>12} {:>12}", "", "snapshots", "MB/s", "records/s", "vs none");
    apply_table(&base.join("default-fs"), "this machine's filesystem (cow)");
    match XfsMount::new(&base) {
        Some(xfs) => apply_table(&xfs.mount.join("x"), "XFS with reflink (clones)"),
        None => println!("{:<34} XFS loop filesystem not available (needs root, losetup and mkfs.xfs)", "XFS with reflink (clones)"),
    }
    println!();
    println!("2. Group marker hold under 4 KiB random writes on every member (fio, nbd engine, QD4, 2 MB/s each)");
    println!("{:<12} {:>8} {:>36} {:>36}", "members", "markers", "longest member hold p50/p99/max us", "every member's hold p50/p99/max us");
    for members in [2usize, 8] {
        hold_row(&base.join(format!("group-{members}")), members);
    }
}

fn hello(size: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        volume_uuid: [7; 16],
        volume_name: "bench".into(),
        size,
        generation: [8; 16],
        first_lsn: 1,
        history: vec![WireGeneration { id: [8; 16], parent: None, branch_lsn: 0, created_us: 0 }],
        last_lsn: 0,
    }
}

fn record(lsn: u64, kind: RecordKind, extent: Extent, payload: Vec<u8>) -> ReceivedRecord {
    ReceivedRecord { lsn, kind, flags: 0, extent, timestamp_us: 0, payload: payload.into() }
}

/// A replica filled with data (so preserving copies real chunks), `snapshots` markers applied.
fn prepared(dir: &Path, snapshots: usize) -> (Replica, u64) {
    let _ = std::fs::remove_dir_all(dir);
    let mut replica = Replica::create(dir, &hello(DEVICE), None, None).unwrap();
    replica.sync_start().unwrap();
    replica.sync_done(0, 0).unwrap();
    let mut lsn = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for batch in 0..DEVICE / (16 << 20) {
        let records: Vec<ReceivedRecord> = (0..16u64)
            .map(|i| {
                lsn += 1;
                let mut data = vec![0u8; 1 << 20];
                rng.fill(&mut data[..]);
                record(lsn, RecordKind::Write, Extent::new((batch * 16 + i) << 20, 1 << 20), data)
            })
            .collect();
        replica.receive(&records).unwrap();
        replica.apply_received(&records).unwrap();
    }
    replica.checkpoint().unwrap();
    for n in 0..snapshots {
        lsn += 1;
        let marker = Marker::single(&format!("s{n}")).encode();
        let records = [record(lsn, RecordKind::Marker, Extent::default(), marker)];
        replica.receive(&records).unwrap();
        replica.apply_received(&records).unwrap();
    }
    replica.checkpoint().unwrap();
    (replica, lsn)
}

/// Seconds to receive, apply and checkpoint `count` writes of `length` bytes at random
/// aligned offsets, `per_batch` records per batch (as the daemon gets them).
fn timed_apply(replica: &mut Replica, mut lsn: u64, count: usize, length: u64, per_batch: usize) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let data = vec![0x5a; length as usize];
    let started = Instant::now();
    let mut left = count;
    while left > 0 {
        let n = left.min(per_batch);
        let records: Vec<ReceivedRecord> = (0..n)
            .map(|_| {
                lsn += 1;
                let offset = rng.gen_range(0..DEVICE / length) * length;
                record(lsn, RecordKind::Write, Extent::new(offset, length), data.clone())
            })
            .collect();
        replica.receive(&records).unwrap();
        replica.apply_received(&records).unwrap();
        if rng.gen_ratio(1, 16) {
            replica.checkpoint().unwrap();
        }
        left -= n;
    }
    replica.checkpoint().unwrap();
    started.elapsed().as_secs_f64()
}

fn apply_table(dir: &Path, label: &str) {
    for (pattern, count, length, per_batch) in [("4 KiB random", 20_000usize, 4096u64, 256usize), ("1 MiB random", 512, 1 << 20, 16)] {
        let mut baseline = None;
        for snapshots in [0usize, 1, 8] {
            let (mut replica, lsn) = prepared(dir, snapshots);
            let seconds = timed_apply(&mut replica, lsn, count, length, per_batch);
            let bytes = count as f64 * length as f64;
            let rate = bytes / seconds / 1e6;
            let base = *baseline.get_or_insert(rate);
            println!("{:<34} {:>10} {:>12.1} {:>12.0} {:>11.2}x", format!("{label}, {pattern}"), snapshots, rate, count as f64 / seconds, rate / base);
            drop(replica);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// An XFS filesystem with reflink on a loop device, for the clone path.
struct XfsMount {
    mount: PathBuf,
    device: String,
}

impl XfsMount {
    fn new(base: &Path) -> Option<XfsMount> {
        let image = base.join("xfs.img");
        std::fs::File::create(&image).ok()?.set_len(2 << 30).ok()?;
        let output = Command::new("losetup").args(["-f", "--show", image.to_str()?]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        let device = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let mount = base.join("xfs");
        std::fs::create_dir_all(&mount).ok()?;
        let made = Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1", &device]).status().map(|s| s.success()).unwrap_or(false)
            && Command::new("mount").args([&device, mount.to_str()?]).status().map(|s| s.success()).unwrap_or(false);
        if !made {
            let _ = Command::new("losetup").args(["-d", &device]).status();
            return None;
        }
        Some(XfsMount { mount, device })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn spawn(args: &[&str], ready: &Path) -> Daemon {
    let child = Command::new(BIN).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "{args:?} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn percentiles(mut values: Vec<u64>) -> String {
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    format!("{}/{}/{}", at(0.5), at(0.99), values[values.len() - 1])
}

fn hold_row(base: &Path, members: usize) {
    let _ = std::fs::remove_dir_all(base);
    std::fs::create_dir_all(base).unwrap();
    let adir = base.join("applier");
    let applier_fp = fingerprint(&run(&["applier", "init", "--dir", adir.to_str().unwrap()]));
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _applier = spawn(&["applier", "run", "--dir", adir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")], &adir.join("control.sock"));
    let mut daemons = Vec::new();
    let mut dirs = Vec::new();
    let mut writers = Vec::new();
    for n in 0..members {
        let dir = base.join(format!("v{n}"));
        let name = format!("v{n}");
        let fp = fingerprint(&run(&["volume", "create", "--dir", dir.to_str().unwrap(), "--name", &name, "--size", "256M", "--journal-size", "64M"]));
        run(&["applier", "allow", "--dir", adir.to_str().unwrap(), &fp]);
        run(&["mirror", "add", "--dir", dir.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", &applier_fp]);
        let socket = base.join(format!("v{n}.sock"));
        daemons.push(spawn(&["run", "--dir", dir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())], &dir.join("control.sock")));
        let uri = format!("nbd+unix:///{name}?socket={}", socket.display());
        writers.push(
            Command::new("fio")
                .args([
                    "--name=marker-load",
                    "--thread",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=4",
                    "--size=256m",
                    "--time_based",
                    "--runtime=600",
                    "--rate=2m",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("fio"),
        );
        dirs.push(dir);
    }
    std::thread::sleep(Duration::from_secs(2));
    let count: usize = std::env::var("BENCH_MARKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let mut longest = Vec::new();
    let mut every = Vec::new();
    for n in 0..count {
        let mut args = vec!["marker".to_string(), "create".into(), "--name".into(), format!("m{n}"), "--json".into()];
        for dir in &dirs {
            args.extend(["--dir".to_string(), dir.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let created: serde_json::Value = serde_json::from_str(&run(&args)).unwrap();
        longest.push(created["max_hold_us"].as_u64().unwrap());
        every.extend(created["volumes"].as_array().unwrap().iter().map(|v| v["hold_us"].as_u64().unwrap()));
        std::thread::sleep(Duration::from_millis(100));
    }
    for mut writer in writers {
        let _ = writer.kill();
        let _ = writer.wait();
    }
    println!("{:<12} {:>8} {:>36} {:>36}", members, count, percentiles(longest), percentiles(every));
    drop(daemons);
}
