//! Failback and switchover benchmark (`cargo bench --bench failover`): prints a table,
//! asserts nothing but that the steps work.
//!
//! A 2 GiB volume full of data (every 1 MiB chunk distinct) is mirrored to an applier on
//! loopback (the initial synchronisation is the **full copy** row). The link dies, the source
//! writes 1% of the volume (64 KiB random writes, in its first half) that never reach the
//! replica, then dies; the replica is promoted and the new primary writes another 1% (in the
//! second half). Failback to the old
//! source is then measured two ways: with the dirty maps (`volume demote`, the new primary's
//! mirror resyncs the union of both sides' changed regions) and with a **full hash scan**
//! (the old source's image attached as a replica: every chunk hashed on both sides, the
//! differing ones sent), from the new primary's start until its mirror has applied
//! everything. Last, a planned `mirror switchover` back over the drained mirror: the
//! command's time, how long writes were held, and until the old source serves again.
//!
//! BENCH_GIB sets the volume size in GiB (default 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fingerprint, run, Daemon};

const BIN: &str = env!("CARGO_BIN_EXE_ublk-mirror");
const MIB: u64 = 1 << 20;

fn main() {
    let gib: u64 = std::env::var("BENCH_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let size = gib << 30;
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-failover");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    println!("Failover ({} CPUs), a {gib} GiB volume on loopback QUIC", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));

    // The source, full of data, mirrored to B's applier.
    let filled = base.join("a-data.img");
    fill(&filled, size);
    let vdir = base.join("a").join("vol0");
    let volume_fp = fingerprint(&run(&[
        "volume",
        "create",
        "--dir",
        s(&vdir),
        "--name",
        "vol0",
        "--size",
        &format!("{gib}G"),
        "--backing",
        s(&filled),
        "--journal-size",
        "512M",
    ]));
    let adir = base.join("b").join("applier");
    let applier_fp = fingerprint(&run(&["applier", "init", "--dir", s(&adir)]));
    run(&["applier", "allow", "--dir", s(&adir), &volume_fp]);
    let port = free_udp_port();
    run(&["mirror", "add", "--dir", s(&vdir), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", &applier_fp]);
    let mut applier = Some(applier_start(&adir, port));
    let started = Instant::now();
    let mut a_run = Some(serve(&vdir));
    wait_applied(&vdir, "mirror", Duration::from_secs(900));
    let full_copy = (started.elapsed(), mirror(&vdir, "mirror")["sent_bytes"].as_u64().unwrap_or(0));

    // Online verify of the synchronised replica: both sides hash every chunk.
    let cpu_before = (cpu_seconds(a_run.as_ref().unwrap()), cpu_seconds(applier.as_ref().unwrap()));
    let output = Command::new(BIN).args(["mirror", "verify", "--dir", s(&vdir), "--json"]).output().unwrap();
    assert!(output.status.success(), "verify: {}", String::from_utf8_lossy(&output.stderr));
    let verified: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let verified = &verified["mirrors"][0];
    let verify_cpu = (cpu_seconds(a_run.as_ref().unwrap()) - cpu_before.0, cpu_seconds(applier.as_ref().unwrap()) - cpu_before.1);
    let verify = (verified["compared_bytes"].as_u64().unwrap(), verified["duration_seconds"].as_f64().unwrap());

    // The link dies; A writes 1% that B never gets, then dies; B is promoted and writes 1%.
    let percent = size / 100;
    drop(applier.take());
    fio_writes(&base, &vdir, size, percent, 1);
    kill9(a_run.take().unwrap());
    let applier_b = applier_start(&adir, port);
    let bdir = base.join("b").join("vol0");
    let promoted = run(&["applier", "replica", "promote", "--dir", s(&adir), "--volume", "vol0", "--to", s(&bdir)]);
    let b_fp = fingerprint(&promoted);
    let b_run = serve(&bdir);
    fio_writes(&base, &bdir, size, percent, 2);
    drop(b_run);
    // A comes back, is refused as stale, stops; its image is copied for the hash-scan row.
    let a_again = serve(&vdir);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mirror(&vdir, "mirror")["last_error"].as_str().unwrap_or_default().contains("is stale") {
        assert!(Instant::now() < deadline, "A was not refused as stale");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("  the old source was refused: {}", mirror(&vdir, "mirror")["last_error"].as_str().unwrap_or_default());
    drop(a_again);
    let copy = base.join("a-copy.img");
    let status = Command::new("cp").args(["--sparse=always", s(&filled), s(&copy)]).status().unwrap();
    assert!(status.success());

    // Failback with the maps.
    let a_adir = base.join("a").join("applier");
    let a_applier_fp = fingerprint(&run(&["applier", "init", "--dir", s(&a_adir)]));
    let demoted = run(&["volume", "demote", "--dir", s(&vdir), "--applier", s(&a_adir)]);
    println!("  {}", demoted.lines().nth(2).unwrap_or_default().trim());
    run(&["applier", "allow", "--dir", s(&a_adir), &b_fp]);
    let a_port = free_udp_port();
    let _a_applier = applier_start(&a_adir, a_port);
    run(&["mirror", "add", "--dir", s(&bdir), "--to", &format!("127.0.0.1:{a_port}"), "--fingerprint", &a_applier_fp]);
    let started = Instant::now();
    let b_run = serve(&bdir);
    wait_applied(&bdir, "mirror", Duration::from_secs(900));
    let maps = (started.elapsed(), mirror(&bdir, "mirror")["sent_bytes"].as_u64().unwrap_or(0));
    drop(b_run);

    // Failback with a full hash scan: the old image (before the demote) attached as a replica.
    let c_adir = base.join("c").join("applier");
    let c_applier_fp = fingerprint(&run(&["applier", "init", "--dir", s(&c_adir)]));
    run(&["applier", "allow", "--dir", s(&c_adir), &b_fp]);
    run(&["applier", "replica", "add", "--dir", s(&c_adir), "--volume", "vol0", "--image", s(&copy)]);
    let c_port = free_udp_port();
    let _c_applier = applier_start(&c_adir, c_port);
    run(&["mirror", "add", "--dir", s(&bdir), "--name", "hashscan", "--to", &format!("127.0.0.1:{c_port}"), "--fingerprint", &c_applier_fp]);
    let started = Instant::now();
    let b_run = serve(&bdir);
    wait_applied(&bdir, "hashscan", Duration::from_secs(900));
    let scan = (started.elapsed(), mirror(&bdir, "hashscan")["sent_bytes"].as_u64().unwrap_or(0));
    wait_applied(&bdir, "mirror", Duration::from_secs(120));

    // A planned switchover back to A over the drained mirror.
    let started = Instant::now();
    let output = run(&[
        "mirror",
        "switchover",
        "--dir",
        s(&bdir),
        "--name",
        "mirror",
        "--applier",
        s(&adir),
        "--applier-address",
        &format!("127.0.0.1:{port}"),
        "--json",
    ]);
    let command = started.elapsed();
    let report: serde_json::Value = serde_json::from_str(&output).unwrap();
    let to = PathBuf::from(report["switched_over"]["to"].as_str().unwrap());
    let held = Duration::from_micros(report["switched_over"]["held_us"].as_u64().unwrap_or(0));
    drop(b_run);
    let a_served = serve(&to);
    let serving = started.elapsed();
    drop(a_served);
    drop(applier_b);

    println!();
    println!("Failback after 1% of the volume changed on each side ({} MiB + {} MiB of 64 KiB random writes)", percent / MIB, percent / MIB);
    println!("{:<44} {:>14} {:>10} {:>14}", "", "sent", "time", "bytes vs copy");
    let row = |label: &str, (time, bytes): (Duration, u64)| {
        println!("{label:<44} {:>10.1} MiB {:>8.1} s {:>13.3}x", bytes as f64 / MIB as f64, time.as_secs_f64(), bytes as f64 / full_copy.1.max(1) as f64);
    };
    row("full copy (the initial synchronisation)", full_copy);
    row("full hash scan (old image attached, compared)", scan);
    row("dirty maps (volume demote, bitmap merge)", maps);
    println!("(both ends and the link share this machine's CPUs: the copy and the scan are bound by QUIC and BLAKE3 on them)");
    println!();
    println!();
    let gib_compared = verify.0 as f64 / (1u64 << 30) as f64;
    println!(
        "mirror verify of the synchronised replica: {:.0} MiB compared in {:.2} s = {:.0} MB/s hashed on each side (source and applier hash the same bytes at once); CPU {:.2} s/GiB at the source, {:.2} s/GiB at the applier",
        verify.0 as f64 / MIB as f64,
        verify.1,
        verify.0 as f64 / verify.1.max(1e-9) / 1e6,
        verify_cpu.0 / gib_compared.max(1e-9),
        verify_cpu.1 / gib_compared.max(1e-9)
    );
    println!(
        "switchover over a drained mirror: command {:.2} s (writes held {:.0} ms); the old source serving {:.2} s after the command began",
        command.as_secs_f64(),
        held.as_secs_f64() * 1000.0,
        serving.as_secs_f64()
    );
}

/// User plus system CPU seconds a process has used so far (`/proc/PID/stat`).
fn cpu_seconds(daemon: &Daemon) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.0.id())).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses: utime is the
    // 12th, stime the 13th of them.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / ticks
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A file of `size` bytes whose every 1 MiB chunk is distinct (pseudo-random).
fn fill(path: &Path, size: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut chunk = vec![0u8; MIB as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, word) in chunk.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&(x ^ i as u64).to_le_bytes());
    }
    for n in 0..size / MIB {
        chunk[..8].copy_from_slice(&n.to_le_bytes());
        file.write_all(&chunk).unwrap();
    }
    file.flush().unwrap();
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn applier_start(dir: &Path, port: u16) -> Daemon {
    let _ = std::fs::remove_file(dir.join("control.sock"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
    let child = Command::new(BIN)
        .args(["applier", "run", "--dir", s(dir), "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_file(&dir.join("control.sock"));
    Daemon(child)
}

/// `run` serving NBD on `DIR.sock`, ready.
fn serve(dir: &Path) -> Daemon {
    let socket = dir.with_extension("sock");
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
    let child =
        Command::new(BIN).args(["run", "--dir", s(dir), "--nbd", &format!("unix:{}", socket.display())]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() || !dir.join("control.sock").exists() {
        assert!(Instant::now() < deadline, "run {} did not start", dir.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    Daemon(child)
}

fn kill9(mut daemon: Daemon) {
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    // Reaped: nothing left for its drop to stop.
    std::mem::forget(daemon);
}

fn wait_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&run(&["status", "--dir", s(dir), "--json"])).unwrap()
}

fn mirror(dir: &Path, name: &str) -> serde_json::Value {
    status(dir)["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or_default()
}

/// Waits until mirror `name` is consistent and has applied everything.
fn wait_applied(dir: &Path, name: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let status = status(dir);
        let last = status["volume"]["last_lsn"].clone();
        let m = status["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or_default();
        if m["consistent"] == true && m["connected"] == true && m["applied_lsn"] == last {
            return;
        }
        assert!(Instant::now() < deadline, "mirror {name} did not catch up: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `bytes` of 64 KiB random writes (64 KiB aligned) through the volume's NBD export (fio),
/// in the first half of the volume for `seed` 1, the second for 2.
fn fio_writes(base: &Path, dir: &Path, size: u64, bytes: u64, seed: u64) {
    let served = serve_if_needed(dir);
    let uri = format!("nbd+unix:///vol0?socket={}", dir.with_extension("sock").display());
    let status = Command::new("fio")
        .args([
            "--name=writes",
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            &format!("--io_size={bytes}"),
            // The two sides write disjoint halves (fio's offsets repeat from run to run).
            &format!("--offset={}", (seed - 1) * (size / 2)),
            &format!("--size={}", size / 2),
            "--iodepth=4",
            "--end_fsync=1",
            &format!("--output={}", base.join("fio.out").display()),
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run fio");
    assert!(status.success(), "fio failed");
    drop(served);
}

/// `run` for `dir` unless one already serves it (its NBD socket answers).
fn serve_if_needed(dir: &Path) -> Option<Daemon> {
    if std::os::unix::net::UnixStream::connect(dir.with_extension("sock")).is_ok() {
        None
    } else {
        Some(serve(dir))
    }
}
