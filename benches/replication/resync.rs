//! Row 5 of the replication bench: journal overflow and resync.
//!
//! - The guest's write latency while a mirror that is away makes the journal overflow and
//!   switches to tracking: fio 4 KiB random writes at QD1 through NBD, twice the journal,
//!   p99 and max completion latency, against the same run with no mirror.
//! - A 256 MiB dirty set after an outage, resynced through the relay capped at 50 MB/s
//!   while a writer goes on at 10 MB/s: seconds until the replica is consistent again
//!   against the minimum, dirty bytes / the spare link rate.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, mirrored_volume_to, relay, run, spawn, status};

const LINK: u64 = 50_000_000;
const WRITER: u64 = 10_000_000;
const DIRTY: u64 = 256 << 20;

/// fio's completion latency of a job: (p99, max) in microseconds.
fn fio_latency(uri: &str, rw: &str, bs: &str, depth: u32, extra: &[&str], json: &Path) -> (f64, f64) {
    let mut args = vec![
        "--name=bench".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={depth}"),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
        format!("--output={}", json.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let ok = Command::new("fio").args(&args).stdout(Stdio::null()).status().expect("fio (apt-get install -y fio)").success();
    assert!(ok, "fio failed");
    let output: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let clat = &output["jobs"][0]["write"]["clat_ns"];
    (clat["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1e3, clat["max"].as_f64().unwrap_or(0.0) / 1e3)
}

/// The rows.
pub fn rows(base: &Path, applier_base: &Path, rows: &mut Vec<(String, String)>) {
    let (mirrored, plain) = (switch_latency(base, applier_base, true), switch_latency(base, applier_base, false));
    rows.push((
        "4K QD1 writes across the switch to tracking".into(),
        format!("p99 {:.0} us, max {:.1} ms; no mirror: p99 {:.0} us, max {:.1} ms", mirrored.0, mirrored.1 / 1e3, plain.0, plain.1 / 1e3),
    ));
    let (seconds, dirty) = resync_time(base, applier_base);
    let minimum = dirty as f64 / (LINK - WRITER) as f64;
    rows.push((
        format!("resync of {} MiB dirty, {} MB/s link, writer at {} MB/s", dirty >> 20, LINK / 1_000_000, WRITER / 1_000_000),
        format!("{seconds:.1} s to consistent (minimum {minimum:.1} s: dirty / spare link rate; {:.2}x)", minimum / seconds),
    ));
}

/// A volume with a 64 MiB journal whose mirror's applier is down (or no mirror): fio writes
/// twice the journal at QD1; returns its (p99, max) latency in microseconds.
fn switch_latency(base: &Path, applier_base: &Path, mirrored: bool) -> (f64, f64) {
    let name = if mirrored { "switch-mirrored" } else { "switch-plain" };
    let (vdir, _adir) = mirrored_volume_to(base, applier_base, name, "64M", &format!("127.0.0.1:{}", free_port()));
    if !mirrored {
        run(&["mirror", "remove", "--dir", vdir.to_str().unwrap()]);
    }
    let socket = base.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let _volume = spawn(&["run", "--dir", vdir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())], &vdir.join("control.sock"));
    let uri = format!("nbd+unix:///bench?socket={}", socket.display());
    let latency = fio_latency(&uri, "randwrite", "4k", 1, &["--size=1g", "--io_size=128m", "--fsync=64"], &base.join("switch.json"));
    if mirrored {
        let state = status(&vdir)["mirrors"][0]["state"].clone();
        assert_eq!(state, "tracking", "the mirror switched to tracking during the run");
    }
    latency
}

/// The resync of a 256 MiB dirty set; returns (seconds to consistent, dirty bytes).
fn resync_time(base: &Path, applier_base: &Path) -> (f64, u64) {
    let port = free_port();
    let link = relay::Impairment { rate: Some(LINK), queue: Duration::from_millis(200), ..relay::Impairment::clean() };
    let relay = relay::Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), link, relay::Impairment::clean(), 51);
    let (vdir, adir) = mirrored_volume_to(base, applier_base, "resync", "64M", &relay.address().to_string());
    let socket = base.join("resync.sock");
    let _ = std::fs::remove_file(&socket);
    let _applier = spawn(&["applier", "run", "--dir", adir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")], &adir.join("control.sock"));
    let _volume = spawn(&["run", "--dir", vdir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())], &vdir.join("control.sock"));
    let uri = format!("nbd+unix:///bench?socket={}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(300);
    while status(&vdir)["mirrors"][0]["consistent"] != true {
        assert!(Instant::now() < deadline, "the initial synchronisation did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The outage: 256 MiB written sequentially in 1 MiB writes, four times the journal.
    relay.partition(true);
    super::fio(&uri, "write", "1m", &["--size=256m", "--io_size=256m", "--end_fsync=1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let dirty = loop {
        let mirror = status(&vdir)["mirrors"][0].clone();
        if mirror["state"] == "tracking" && mirror["dirty_bytes"].as_u64().unwrap_or(0) >= DIRTY / 2 {
            break mirror["dirty_bytes"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "the mirror did not track: {mirror}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Healed, with a writer at 10 MB/s (64 KiB random writes over the volume) throughout.
    relay.partition(false);
    let mut writer = Command::new("fio")
        .args([
            "--name=resync-writer",
            // One process: killing it stops the job (a forked job would outlive its parent).
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            "--size=2g",
            "--time_based",
            "--runtime=600",
            &format!("--rate={WRITER}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let seconds = loop {
        let mirror = status(&vdir)["mirrors"][0].clone();
        if mirror["state"] == "replicating" {
            break started.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < deadline, "the resync did not finish in 600 s: {mirror}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The writer's runtime is only an upper bound: it stops here.
    let _ = writer.kill();
    let _ = writer.wait();
    (seconds, dirty)
}
