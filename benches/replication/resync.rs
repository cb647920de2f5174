//! Row 5 of the replication bench: journal overflow and resync.
//!
//! - The guest's write latency while a mirror that is away makes the journal overflow and
//!   switches to tracking: fio 4 KiB random writes at QD1 through NBD, twice the journal,
//!   p99 and max completion latency, against the same run with no mirror.
//! - A 256 MiB dirty set after an outage, resynced through the relay capped at 50 MB/s
//!   while a writer goes on at 10 MB/s: seconds until the replica is consistent again
//!   against the minimum, dirty bytes / the spare link rate.
//! - A 2 GiB volume written whole during an outage, resynced over loopback with no limit:
//!   seconds and MB/s, beside what the applier's disk takes for the same bytes (stage
//!   written, read back, image written, with O_DIRECT).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, mirrored_volume_to, relay, run, spawn, status};

const LINK: u64 = 50_000_000;
const WRITER: u64 = 10_000_000;
const DIRTY: u64 = 256 << 20;
/// The bench volumes' size (`mirrored_volume_to`), written whole for the loopback resync.
const WHOLE: u64 = 2 << 30;

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
    // BENCH_RESYNC=whole: only the loopback resync of a volume written whole.
    if std::env::var("BENCH_RESYNC").as_deref() != Ok("whole") {
        latency_and_link_rows(base, applier_base, rows);
    }
    whole_volume_row(base, rows);
}

/// The switch to tracking's latency and the resync through the relay at 50 MB/s.
fn latency_and_link_rows(base: &Path, applier_base: &Path, rows: &mut Vec<(String, String)>) {
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

/// The loopback resync of a volume written whole.
fn whole_volume_row(base: &Path, rows: &mut Vec<(String, String)>) {
    // The applier on the machine's disk, not the tmpfs stand-in: on tmpfs every byte staged
    // and copied allocates a page, and a page first touched costs this VM more than the copy
    // (the same resync took 23.7 s there against 9.9 s on the disk).
    let (seconds, dirty, raw) = whole_volume_resync(base, base);
    let value = format!(
        "{seconds:.1} s to consistent, {:.0} MB/s of the device (its disk I/O alone at the applier, with O_DIRECT: {raw:.1} s)",
        WHOLE as f64 / seconds / 1e6
    );
    eprintln!("resync of a 2 GiB volume written whole, loopback: {value}");
    rows.push((format!("resync of {} MiB dirty (a 2 GiB volume written whole), loopback, no limit", dirty >> 20), value));
}

/// A 2 GiB volume written whole while its applier is down, then resynced over loopback
/// without a limit: (seconds from the reconnection to consistent, dirty bytes, seconds this machine's disks take to
/// write the stage, read it and write the image once, with O_DIRECT: the resync's own I/O).
fn whole_volume_resync(base: &Path, applier_base: &Path) -> (f64, u64, f64) {
    let port = free_port();
    let (vdir, adir) = mirrored_volume_to(base, applier_base, "resync-whole", "256M", &format!("127.0.0.1:{port}"));
    let socket = base.join("resync-whole.sock");
    let listen = format!("127.0.0.1:{port}");
    let _volume = super::serve_synchronised(&vdir, &adir, &socket, &listen);
    let uri = format!("nbd+unix:///bench?socket={}", socket.display());
    super::fio(&uri, "write", "1m", &[&format!("--size={WHOLE}"), "--end_fsync=1"]);
    let dirty = status(&vdir)["mirrors"][0]["dirty_bytes"].as_u64().unwrap_or(0);
    let _applier = super::spawn_applier(&adir, &listen);
    // From the connection on (the sender's reconnect backoff is not the resync's pace).
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&vdir)["mirrors"][0]["connected"] != true {
        assert!(Instant::now() < deadline, "the mirror did not reconnect in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let seconds = loop {
        let mirror = status(&vdir)["mirrors"][0].clone();
        if mirror["state"] == "replicating" && mirror["consistent"] == true {
            break started.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < deadline, "the resync did not finish in 600 s: {mirror}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The resync's own disk I/O at the applier, measured alone: write the stage, read it
    // back, write the image (dd with O_DIRECT, 4 MiB blocks).
    let scratch = applier_base.join("resync-disk-bound");
    let dd = |args: &[&str]| {
        let ok = Command::new("dd").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        assert!(ok, "dd {args:?} failed");
    };
    let (file, other) = (format!("of={}", scratch.display()), format!("of={}.2", scratch.display()));
    let timed = Instant::now();
    dd(&["if=/dev/zero", &file, "bs=4M", &format!("count={}", WHOLE >> 22), "oflag=direct"]);
    dd(&[&format!("if={}", scratch.display()), &other, "bs=4M", "iflag=direct", "oflag=direct"]);
    let raw = timed.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&scratch);
    let _ = std::fs::remove_file(format!("{}.2", scratch.display()));
    (seconds, dirty, raw)
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
    let _applier = super::spawn_applier(&adir, &format!("127.0.0.1:{port}"));
    let _volume = spawn(&["run", "--dir", vdir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())], &vdir.join("control.sock"));
    let uri = format!("nbd+unix:///bench?socket={}", socket.display());
    super::wait_synchronised(&vdir);
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
