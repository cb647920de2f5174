//! Replication benchmark (`cargo bench --bench replication`): prints a table, asserts nothing.
//!
//! On loopback, in one run:
//! 1. Backlog drain: a volume writes a backlog while its applier is down; then the applier
//!    starts and we time until it has received everything (durable in the applier's journal:
//!    the source's journal is drained and may be trimmed) and until it has applied everything
//!    (durable in the replica image), for 1 MiB and 4 KiB writes; once more for 1 MiB with the
//!    applier's files on a disk of their own (see below).
//! 2. The transport's ceiling for the same bytes between the same kind of endpoints: one raw
//!    QUIC stream (same TLS and transport settings as the sender, receiver in a second
//!    process) with the CPU time of each end, and one plain TCP stream; and the disk's durable
//!    sequential write rate. From the raw stream's CPU time and what the applier's two file
//!    writes (journal, image) cost on its disk, upper bounds on the drain against the raw
//!    stream: a mirror does at least the raw stream's work plus those writes, so sharing two
//!    CPUs it cannot beat (raw CPU + writes) / 2 per MiB, and with a CPU per end it cannot
//!    beat the applier's raw-receive + writes. They say what this machine allows at best.
//! 3. fio 4 KiB random writes at QD32 through NBD with one live mirror against the same
//!    volume with none, and the time the mirror needs to catch up after that burst; once with
//!    the applier's files on a disk of their own, once on the volume's disk. This machine has
//!    one disk, so "a disk of their own" is a tmpfs directory, standing in for the replica
//!    host's disk; the applier still shares the two CPUs with the source and fio.
//!    A calibration row runs the burst without a mirror beside one busy loop at idle
//!    priority: the cost of any background CPU work to this pipeline on this machine.
//!    Drains and live bursts also report the mirror's CPU time per record (per MiB for 1 MiB
//!    writes): the volume's sender thread, which is what a mirror costs the source host, and
//!    the applier process, which on a real deployment runs on the replica host.
//! 4. The 1 MiB backlog drained through the impairment relay (tests/common/relay.rs) at
//!    50 ms RTT without loss, capped at BENCH_LINK_MBPS MB/s (default 50), against that
//!    capacity; beside it a raw QUIC stream of the same 1 GiB through the same relay (the
//!    transport's own start-up and per-packet overhead, the bound this row can reach).
//! 5. Journal overflow (`replication/resync.rs`): write latency across the switch of an
//!    absent mirror to tracking against no mirror, and a 256 MiB dirty set resynced through
//!    the relay at 50 MB/s while a writer goes on at 10 MB/s, against the minimum time.
//! 6. Compression (`replication/compression.rs`): a compressible 256 MiB backlog (a tar of
//!    /usr/share/doc and /usr/lib) drained through the relay at 50 ms RTT and 50 MB/s with
//!    compression off and auto: drain rate against the link, ratio, source CPU per MiB.
//! 7. Two hosts simulated (`replication/iops.rs`): fio and the volume process on CPU 0, the
//!    applier on CPU 1 with a tmpfs directory; NBD 4 KiB random writes QD32 and 1 MiB
//!    sequential writes into a pre-filled volume whose replica is seeded with a copy (the
//!    mirror starts in sync), live mirror against none (target 0.9x),
//!    catch-up (target 2 s); the sender's CPU per 4 KiB record against a raw QUIC stream's
//!    (target 1.3x) and the applier's per MiB against the raw receiver's (target 2x).
//!
//! BENCH_ONLY=two-hosts runs only row 7; with BENCH_BS=4k or 1m only that burst, without
//! the drains. BENCH_PERF=DIR writes a CPU profile of the source's CPU during each burst
//! (`perf record -e cpu-clock -g`) to DIR/<volume>-<block size>.data (with
//! BENCH_PERF_REPLICA=1 the replica's CPU instead), and one of the applier process during
//! each drain to DIR/drain-<block size>-applier.data (and the volume's to ...-volume.data;
//! wan-... through the relay). BENCH_ONLY=drain BENCH_BS=4k: the 4 KiB drain and the
//! sender's cost per record instead. A profiled run's CPU rows include perf's own cost (far
//! more with BENCH_PERF_GRAPH=dwarf): take figures from runs without BENCH_PERF.
//! BENCH_SECONDS sets the fio bursts (default 30), BENCH_ROUNDS how many times the bursts
//! without a mirror and with one (applier's own disk) alternate (default 2; means reported). BENCH_ONLY=quic measures only the raw
//! QUIC stream (for investigating the transport ceiling), BENCH_ONLY=wan only row 4, BENCH_ONLY=iops only the NBD rows, BENCH_ONLY=resync only row 5 (with BENCH_RESYNC=whole only its loopback resync of a volume written whole), BENCH_ONLY=compression only row 6 (with BENCH_COMPRESSION=ext4 only its ext4 image rows),
//! BENCH_ONLY=drain only the own-disk 1 MiB drain, the raw QUIC stream and the bounds (the
//! drain target's ratio; the applier's two file writes are measured before the drain and
//! after it, as this VM's cost of new pages drifts, and the bound takes the cheaper). BENCH_PIN=1 gives each end a CPU of its own, as on two hosts
//! (volumes and the raw QUIC sender on CPU 0, appliers and the raw receiver on CPU 1).
//! BENCH_ONLY=quic-wan runs only the raw QUIC stream through the WAN relay. BENCH_TRACE=1
//! prints each drain's progress as the status polls see it (`trace` lines), BENCH_QUIC_TRACE=1
//! the raw stream's congestion window, RTT and losses (`tx`) and its arrivals (`rx`).

use std::path::{Path, PathBuf};
mod common;
#[path = "replication/compression.rs"]
mod compression;
#[path = "replication/drain.rs"]
mod drain;
#[path = "replication/iops.rs"]
mod iops;
#[path = "replication/raw.rs"]
mod raw;
#[path = "../tests/common/relay.rs"]
mod relay;
#[path = "replication/resync.rs"]
mod resync;

use common::{fingerprint, run, Daemon};
use drain::{backlog_drain, drain_rows, raw_quic_rows, sender_cost_row, two_host_drain_rows, wan_drain, wan_raw_quic};
use raw::{disk_write_rate, quic_receiver, raw_quic, raw_tcp, RawQuic};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ublk-mirror");

// The same allocator as the binary, so the in-process QUIC baseline runs like the sender.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Ok(spec) = std::env::var("BENCH_QUIC_RECEIVER") {
        return quic_receiver(&spec);
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("quic") {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-quic");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        println!("raw QUIC stream, 1 GiB: {}", raw_quic(&base, 1 << 30, 4 << 20, pinning(), None).describe());
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("quic-wan") {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-quic");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let (what, value) = wan_raw_quic(&base);
        println!("{what}: {value}");
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("wan") {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-wan");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mut rows = Vec::new();
        add(&mut rows, wan_drain(&base));
        add(&mut rows, wan_raw_quic(&base));
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-replication");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("drain") {
        // The ratio that the drain target is about, alone: the 1 MiB backlog with the
        // applier's own disk, and the raw QUIC stream right after it.
        let own_disk = RamDisk::new();
        let mut rows = Vec::new();
        if std::env::var("BENCH_BS").as_deref() == Ok("4k") {
            // The sender's cost per record instead: the 4 KiB backlog, on the same disk.
            let drain = backlog_drain(&base, &base, "4k", 256 << 20, None);
            drain_rows("4K writes", "4k", &drain, &mut rows);
            sender_cost_row(&base, &drain, &mut rows);
        } else {
            let drain = backlog_drain(&base, &own_disk.mount, "1m", 1 << 30, None);
            drain_rows("1M writes, applier's own disk", "1m", &drain, &mut rows);
            raw_quic_rows(&base, &own_disk.mount, Some(&drain), &mut rows);
        }
        for (what, value) in &rows {
            println!("{what:<48} {value}");
        }
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("resync") {
        let own_disk = RamDisk::new();
        let mut rows = Vec::new();
        resync::rows(&base, &own_disk.mount, &mut rows);
        for (what, value) in &rows {
            println!("{what:<48} {value}");
        }
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("compression") {
        let mut rows = Vec::new();
        compression::rows(&base, &mut rows);
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("two-hosts") {
        let own_disk = RamDisk::new();
        let mut rows = Vec::new();
        iops::two_host_rows(&base, &own_disk.mount, seconds, &mut rows);
        // BENCH_BS picks bursts to investigate: the drains are left out.
        if std::env::var("BENCH_BS").is_err() {
            two_host_drain_rows(&base, &own_disk.mount, &mut rows);
        }
        for (what, value) in &rows {
            println!("{what:<48} {value}");
        }
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("iops") {
        let own_disk = RamDisk::new();
        let mut rows = Vec::new();
        iops::rows(&base, &own_disk.mount, seconds, &mut rows);
        iops::two_host_rows(&base, &own_disk.mount, seconds, &mut rows);
        for (what, value) in &rows {
            println!("{what:<48} {value}");
        }
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    println!("ublk-mirror replication benchmark (loopback; one run)");
    let mut rows: Vec<(String, String)> = Vec::new();

    let own_disk = RamDisk::new();
    let mut own_disk_drain = None;
    for (label, bs, total, applier_base) in
        [("1M writes", "1m", 1u64 << 30, &base), ("4K writes", "4k", 256u64 << 20, &base), ("1M writes, applier's own disk", "1m", 1u64 << 30, &own_disk.mount)]
    {
        let drain = backlog_drain(&base, applier_base, bs, total, None);
        drain_rows(label, bs, &drain, &mut rows);
        if bs == "4k" {
            sender_cost_row(&base, &drain, &mut rows);
        }
        if applier_base == &own_disk.mount {
            own_disk_drain = Some(drain);
        }
    }
    add(&mut rows, wan_drain(&base));
    add(&mut rows, wan_raw_quic(&base));
    compression::rows(&base, &mut rows);
    raw_quic_rows(&base, &own_disk.mount, own_disk_drain.as_ref(), &mut rows);
    let tcp = raw_tcp(1 << 30);
    add(&mut rows, ("plain TCP stream, 1 GiB".into(), format!("{tcp:.0} MB/s")));
    iops::rows(&base, &own_disk.mount, seconds, &mut rows);
    iops::two_host_rows(&base, &own_disk.mount, seconds, &mut rows);
    resync::rows(&base, &own_disk.mount, &mut rows);
    let disk = disk_write_rate(&base);
    add(
        &mut rows,
        (
            "disk: 1 GiB buffered write + fdatasync".into(),
            format!("{disk:.0} MB/s: an applier on this disk writes every byte twice (journal, image), so applied <= {:.0} MB/s", disk / 2.0),
        ),
    );
    drop(own_disk);

    println!();
    for (what, value) in &rows {
        println!("{what:<48} {value}");
    }
    println!();
    println!("targets: backlog drain >= 0.9x the raw QUIC stream; IOPS with a live mirror >= 0.9x without");
    let _ = std::fs::remove_dir_all(&base);
}

/// Adds a row to the final table and shows it at once (a later failure keeps what was measured).
fn add(rows: &mut Vec<(String, String)>, row: (String, String)) {
    eprintln!("{:<48} {}", row.0, row.1);
    rows.push(row);
}

/// BENCH_PIN=1: each end of the mirror gets a CPU of its own, as on two hosts: volumes (and
/// the raw QUIC sender) on CPU 0, appliers (and the raw QUIC receiver) on CPU 1.
fn pinning() -> bool {
    std::env::var("BENCH_PIN").as_deref() == Ok("1")
}

/// A command running `program`, on `cpu` alone (through taskset) when given.
fn command_on(program: &Path, cpu: Option<usize>) -> Command {
    let Some(cpu) = cpu else { return Command::new(program) };
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

/// Restricts the calling thread (and threads it starts later) to `cpu`, or lets it run
/// anywhere again with `None`.
fn pin_current_thread(cpu: Option<usize>) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads the set we pass.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpu.map_or(0..libc::CPU_SETSIZE as usize, |cpu| cpu..cpu + 1) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(result, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

/// Starts `ublk-mirror ARGS` and waits for `ready` to appear; placed as BENCH_PIN says (an
/// applier on the replica's CPU, anything else on the source's).
fn spawn(args: &[&str], ready: &Path) -> Daemon {
    let placement = iops::Placement::from_env();
    spawn_on(args, ready, if args.first() == Some(&"applier") { placement.replica } else { placement.source })
}

/// [`spawn`] on `cpu` alone when given.
fn spawn_on(args: &[&str], ready: &Path, cpu: Option<usize>) -> Daemon {
    let child = command_on(Path::new(BIN), cpu).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "{args:?} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

/// Starts the applier in `adir`, listening on `listen` (HOST:PORT).
fn spawn_applier(adir: &Path, listen: &str) -> Daemon {
    spawn(&["applier", "run", "--dir", adir.to_str().unwrap(), "--listen", listen], &adir.join("control.sock"))
}

/// Serves `vdir` over NBD on the Unix socket `socket` and runs its applier (`adir`, on
/// `listen`) until the new replica's initial synchronisation is over, so what a row times
/// next is its own work. The applier is stopped again; the running volume is returned.
fn serve_synchronised(vdir: &Path, adir: &Path, socket: &Path, listen: &str) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let volume = spawn(&["run", "--dir", vdir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())], &vdir.join("control.sock"));
    let _applier = spawn_applier(adir, listen);
    wait_synchronised(vdir);
    volume
}

/// Waits (at most 300 s) until the first mirror of `vdir` is consistent: its replica's
/// initial synchronisation is over.
fn wait_synchronised(vdir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while status(vdir)["mirrors"][0]["consistent"] != true {
        assert!(Instant::now() < deadline, "the initial synchronisation did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A volume with a mirror configured to an applier at a fresh port, the applier's directory
/// under `applier_base`; returns (vdir, adir, port).
fn mirrored_volume(base: &Path, applier_base: &Path, name: &str, journal: &str) -> (PathBuf, PathBuf, u16) {
    let port = free_port();
    let (vdir, adir) = mirrored_volume_to(base, applier_base, name, journal, &format!("127.0.0.1:{port}"));
    (vdir, adir, port)
}

/// A volume whose mirror sends to `address` (the applier, or a relay in front of it).
fn mirrored_volume_to(base: &Path, applier_base: &Path, name: &str, journal: &str, address: &str) -> (PathBuf, PathBuf) {
    let vdir = base.join(format!("{name}-vol"));
    let adir = applier_base.join(format!("{name}-applier"));
    let _ = std::fs::remove_dir_all(&vdir);
    let _ = std::fs::remove_dir_all(&adir);
    // Preallocated, as a volume in service has long made its segments: a fresh journal
    // zero-fills each new segment during the measured writes (two hosts, 1 MiB, one run
    // each: no mirror 609 MB/s fresh against 748 MB/s preallocated, live 360 against 514).
    let volume_fp = fingerprint(&run(&[
        "volume",
        "create",
        "--dir",
        vdir.to_str().unwrap(),
        "--name",
        "bench",
        "--size",
        "2G",
        "--journal-size",
        journal,
        "--preallocate-journal",
    ]));
    let applier_fp = fingerprint(&run(&["applier", "init", "--dir", adir.to_str().unwrap()]));
    // The replica's journal preallocated too, as a replica in service has it (its files are
    // kept across the initial sync's journal replacement): a drain into fresh segment files
    // pays for zero-filling them on the applier's CPU.
    let config = adir.join("applier.toml");
    let text = std::fs::read_to_string(&config).expect("applier.toml");
    std::fs::write(&config, format!("{text}\npreallocate_journals = true\n")).expect("write applier.toml");
    run(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]);
    // Coalescing off: these volumes measure raw record throughput and cost per record
    // (coalescing is measured by tests/coalescing.rs on an overwrite backlog).
    run(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", address, "--fingerprint", &applier_fp, "--coalesce", "off"]);
    (vdir, adir)
}

/// Waits until the mirror applied everything journaled so far (`mirror wait` polls the
/// control socket every 50 ms; cheaper than spawning `status` in a loop).
fn mirror_wait(vdir: &Path) {
    run(&["mirror", "wait", "--dir", vdir.to_str().unwrap(), "--timeout", "900"]);
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&run(&["status", "--dir", dir.to_str().unwrap(), "--json"])).unwrap()
}

fn fio(uri: &str, rw: &str, bs: &str, extra: &[&str]) {
    let mut args = vec![
        "--name=bench".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        "--iodepth=32".into(),
        "--randrepeat=0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let status = Command::new("fio").args(&args).stdout(Stdio::null()).status().expect("fio (apt-get install -y fio)");
    assert!(status.success());
}

/// CPU seconds of the mirror's two ends: the volume's sender thread (what the mirror costs
/// the source host) and the applier process (the replica host's cost).
#[derive(Clone, Copy, Default)]
struct MirrorCpu {
    sender: f64,
    applier: f64,
}

impl MirrorCpu {
    fn sample(volume_pid: u32, applier_pid: u32) -> MirrorCpu {
        let sender = std::fs::read_dir(format!("/proc/{volume_pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .find(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.starts_with("sender-")))
            .map_or(0.0, |task| cpu_seconds(&task.path().join("stat")));
        MirrorCpu { sender, applier: cpu_seconds(Path::new(&format!("/proc/{applier_pid}/stat"))) }
    }

    fn scaled(self, factor: f64) -> MirrorCpu {
        MirrorCpu { sender: self.sender * factor, applier: self.applier * factor }
    }

    fn since(self, earlier: MirrorCpu) -> MirrorCpu {
        MirrorCpu { sender: self.sender - earlier.sender, applier: self.applier - earlier.applier }
    }

    /// "per record: sender 5.9 us, applier 12.8 us" (`unit`: record or MiB).
    fn per(self, count: u64, unit: &str) -> String {
        let each = |seconds: f64| seconds / count.max(1) as f64 * 1e6;
        format!("per {unit}: sender {:.1} us, applier {:.1} us", each(self.sender), each(self.applier))
    }
}

/// utime + stime of a /proc stat file, in seconds (0 if it cannot be read).
fn cpu_seconds(stat: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else { return 0.0 };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = text.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / per_second
}

/// Status through the control socket (cheap enough to poll every few milliseconds).
fn control_status(socket: &Path) -> serde_json::Value {
    ublk_mirror::control::request(socket, "status").expect("status from the running volume")
}

/// A directory in /dev/shm (tmpfs): a disk of its own for the applier on a machine with one
/// disk, standing in for the replica host's disk in a real deployment. (ext4 on a RAM-backed
/// loop device was tried first: its loop and journal threads took more of the two CPUs than
/// the applier itself.) Removed when dropped.
struct RamDisk {
    mount: PathBuf,
}

impl RamDisk {
    fn new() -> RamDisk {
        let mount = PathBuf::from(format!("/dev/shm/ublk-mirror-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&mount);
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("{}: {e} (the applier's own disk is a tmpfs directory)", mount.display()));
        RamDisk { mount }
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.mount);
    }
}
