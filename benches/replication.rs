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
//! each drain to DIR/drain-<block size>-applier.data (or wan-...).
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
#[path = "replication/iops.rs"]
mod iops;
#[path = "../tests/common/relay.rs"]
mod relay;
#[path = "replication/resync.rs"]
mod resync;

use common::{fingerprint, run, Daemon};
use std::process::{Command, Stdio};
use std::sync::Arc;
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
        let drain = backlog_drain(&base, &own_disk.mount, "1m", 1 << 30, None);
        drain_rows("1M writes, applier's own disk", "1m", &drain, &mut rows);
        raw_quic_rows(&base, &own_disk.mount, Some(&drain), &mut rows);
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

/// The rows of one backlog drain: rates until received and until applied, the mirror's CPU.
fn drain_rows(label: &str, bs: &str, drain: &Drain, rows: &mut Vec<(String, String)>) {
    let rate = |secs: f64| format!("{:.0} MB/s, {:.0} records/s ({secs:.1} s)", drain.bytes as f64 / secs / 1e6, drain.records as f64 / secs);
    add(rows, (format!("backlog drain, {label}, {} MiB, received", drain.bytes >> 20), rate(drain.received_seconds)));
    add(rows, ("  ... and applied".into(), rate(drain.applied_seconds)));
    let cpu = if bs == "1m" { drain.cpu.per(drain.bytes >> 20, "MiB") } else { drain.cpu.per(drain.records, "record") };
    add(rows, ("  mirror CPU".into(), cpu));
}

/// The raw QUIC stream, the own-disk 1 MiB drain against it, and what this machine allows at
/// best: the raw stream's CPU plus the applier's two writes on `own_disk`.
fn raw_quic_rows(base: &Path, own_disk: &Path, own_disk_drain: Option<&Drain>, rows: &mut Vec<(String, String)>) {
    let quic = raw_quic(base, 1 << 30, 4 << 20, pinning(), None);
    add(rows, ("raw QUIC stream, 1 GiB, two processes".into(), quic.describe()));
    // The two file writes are measured before the drain and again after it: this VM's
    // cost of new pages (the replica image's) drifts, 1-4 ms per MiB within an hour, even
    // within a minute; the bound takes the cheaper of the two.
    let after = applier_writes_cpu(own_disk);
    let before = own_disk_drain.and_then(|drain| drain.writes_cpu_before);
    let writes = before.map_or(after, |before| before.min(after));
    if let Some(drain) = own_disk_drain {
        let (applier, raw) = (drain.cpu.applier / (drain.bytes >> 20).max(1) as f64, quic.cpu_per_mib.applier);
        add(
            rows,
            (
                "  applier CPU per MiB vs raw QUIC receiving".into(),
                format!(
                    "{:.2} ms vs {:.2} ms ({:.2}x; target 2x; bound, raw receiving + the two file writes: {:.2}x) (1M drain, own disk)",
                    applier * 1e3,
                    raw * 1e3,
                    applier / raw,
                    (raw + writes) / raw
                ),
            ),
        );
        let ratio = |secs: f64| drain.bytes as f64 / secs / 1e6 / quic.rate;
        add(
            rows,
            (
                "  1M drain, applier's own disk, vs raw QUIC".into(),
                format!("received {:.2}x, applied {:.2}x", ratio(drain.received_seconds), ratio(drain.applied_seconds)),
            ),
        );
    }
    let (shared, own_cpus) = quic.drain_bounds(writes);
    let measured = match before {
        Some(before) => format!("before the drain {:.1}, after it {:.1} us CPU per MiB", before * 1e6, after * 1e6),
        None => format!("{:.1} us CPU per MiB", after * 1e6),
    };
    add(rows, ("  applier's two file writes (own disk)".into(), measured));
    add(rows, ("  drain bound from CPU time, vs raw QUIC".into(), format!("{shared:.2}x sharing two CPUs, {own_cpus:.2}x with a CPU per end")));
}

/// The drains of the two-hosts mode: 4 KiB and 1 MiB backlogs with the applier's own disk,
/// the sender's cost per record and the raw QUIC stream beside them.
fn two_host_drain_rows(base: &Path, own_disk: &Path, rows: &mut Vec<(String, String)>) {
    let drain = backlog_drain(base, own_disk, "4k", 256 << 20, None);
    drain_rows("4K writes, applier's own disk", "4k", &drain, rows);
    sender_cost_row(base, &drain, rows);
    let drain = backlog_drain(base, own_disk, "1m", 1 << 30, None);
    drain_rows("1M writes, applier's own disk", "1m", &drain, rows);
    raw_quic_rows(base, own_disk, Some(&drain), rows);
}

/// The sender's CPU per 4 KiB record (the 4K backlog drain) against a raw QUIC stream's
/// sending cost per 4 KiB write (256 MiB in 4 KiB `write_all`s, same settings).
fn sender_cost_row(base: &Path, drain: &Drain, rows: &mut Vec<(String, String)>) {
    let quic = raw_quic(base, 256 << 20, 4096, pinning(), None);
    let raw = quic.cpu_per_mib.sender / 256.0;
    let sender = drain.cpu.sender / drain.records.max(1) as f64;
    add(
        rows,
        (
            "sender CPU per 4K record vs raw QUIC 4K writes".into(),
            format!("{:.1} us vs {:.1} us ({:.2}x; target 1.3x) (4K drain; raw stream {:.0} MB/s)", sender * 1e6, raw * 1e6, sender / raw, quic.rate),
        ),
    );
}

/// Row 4: the 1 MiB backlog drained through the relay at 50 ms RTT and BENCH_LINK_MBPS.
fn wan_drain(base: &Path) -> (String, String) {
    let link_mbps: u64 = std::env::var("BENCH_LINK_MBPS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let link = relay::Impairment::wan(Duration::from_millis(50), 0.0, Some(link_mbps * 1_000_000));
    let drain = backlog_drain(base, base, "1m", 1 << 30, Some(link));
    // Received (durable in the applier's journal) is what the link carried; applied adds the
    // applier's checkpoint cadence (a second) and the image's last fdatasync.
    let link = link_mbps as f64;
    let received = drain.bytes as f64 / drain.received_seconds / 1e6;
    let applied = drain.bytes as f64 / drain.applied_seconds / 1e6;
    (
        format!("backlog drain, 1M writes, 50 ms RTT, {link_mbps} MB/s link"),
        format!(
            "received {received:.1} MB/s ({:.2}x the link; {:.1} s), applied {applied:.1} MB/s ({:.2}x; {:.1} s); target received >= 0.95x",
            received / link,
            drain.received_seconds,
            applied / link,
            drain.applied_seconds
        ),
    )
}

/// The WAN row's bound: 1 GiB in one raw QUIC stream (the sender's TLS, transport and
/// congestion settings) through the same relay, from the connection's start.
fn wan_raw_quic(base: &Path) -> (String, String) {
    let link_mbps: u64 = std::env::var("BENCH_LINK_MBPS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let link = relay::Impairment::wan(Duration::from_millis(50), 0.0, Some(link_mbps * 1_000_000));
    let quic = raw_quic_via(base, 1 << 30, 4 << 20, false, None, Some(link));
    (
        "  raw QUIC stream, 1 GiB, same relay".to_string(),
        format!("{:.1} MB/s ({:.2}x the link): the transport's bound for the row above", quic.rate, quic.rate / link_mbps as f64),
    )
}

/// Adds a row to the final table and shows it at once (a later failure keeps what was measured).
fn add(rows: &mut Vec<(String, String)>, row: (String, String)) {
    eprintln!("{:<48} {}", row.0, row.1);
    rows.push(row);
}

/// How often the drain asks the volume for its mirror's checkpoints (the timing's resolution).
const STATUS_POLL: Duration = Duration::from_millis(20);

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

/// What a backlog drain measured: payload bytes and records of the backlog, seconds from
/// the sender's connection until the applier had received (durably journaled) and applied
/// (durable in the image) all of it.
struct Drain {
    bytes: u64,
    records: u64,
    received_seconds: f64,
    applied_seconds: f64,
    /// CPU time the drain took: the sender thread, and the whole applier process.
    cpu: MirrorCpu,
    /// For a 1 MiB drain without a relay: CPU seconds per MiB of the applier's two file writes
    /// on its disk ([`applier_writes_cpu`]), measured before the backlog was written.
    writes_cpu_before: Option<f64>,
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

/// Writes `total` bytes while the applier is down, then times the drain; through a relay
/// with `link` impairments when given.
fn backlog_drain(base: &Path, applier_base: &Path, bs: &str, total: u64, link: Option<relay::Impairment>) -> Drain {
    let port = free_port();
    let relay = link.map(|link| relay::Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), link, relay::Impairment { rate: None, ..link }, 50));
    let to = relay.as_ref().map_or(format!("127.0.0.1:{port}"), |r| r.address().to_string());
    let name = if relay.is_some() { format!("wan-{bs}") } else { format!("drain-{bs}") };
    let (vdir, adir) = mirrored_volume_to(base, applier_base, &name, "3G", &to);
    let socket = base.join("drain.sock");
    let listen = format!("127.0.0.1:{port}");
    // The new (empty) replica's initial synchronisation first, so what is timed below is the
    // journal backlog alone.
    let volume = serve_synchronised(&vdir, &adir, &socket, &listen);
    // Before the backlog is written, seconds before the drain: pages freed just before the
    // drain could be the ones it gets, still backed by this VM's host.
    let writes_cpu_before = (bs == "1m" && relay.is_none()).then(|| applier_writes_cpu(applier_base));
    // The backlog: written while no applier listens.
    let rw = if bs == "1m" { "write" } else { "randwrite" };
    // New random bytes for every write: fio's default reuses a few barely changed buffers,
    // which zstd (the default `auto` compression, engaged when the link limits) would shrink
    // to nothing; these rows measure incompressible data (row 6 measures compressible data).
    fio(&format!("nbd+unix:///bench?socket={}", socket.display()), rw, bs, &["--size=2g", &format!("--io_size={total}"), "--refill_buffers"]);
    let last = status(&vdir)["volume"]["last_lsn"].as_u64().unwrap();
    let applier = spawn_applier(&adir, &listen);
    // The clock starts when the sender is connected (its reconnect backoff, up to 5 s while
    // the applier was down, is not the drain's speed); records applied by then are not counted.
    let socket = vdir.join("control.sock");
    let connected = loop {
        let now = control_status(&socket);
        if now["mirrors"][0]["connected"] == true {
            break now;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let profile = DrainProfile::start(&name, applier.0.id());
    let started = Instant::now();
    let cpu_at_start = MirrorCpu::sample(volume.0.id(), applier.0.id());
    let start_applied = connected["mirrors"][0]["applied_lsn"].as_u64().unwrap_or(0);
    let deadline = started + Duration::from_secs(900);
    let mut received_seconds = None;
    let applied_seconds = loop {
        let now = control_status(&socket);
        let mirror = &now["mirrors"][0];
        if received_seconds.is_none() && mirror["received_lsn"].as_u64().unwrap_or(0) >= last {
            received_seconds = Some(started.elapsed().as_secs_f64());
        }
        if mirror["applied_lsn"].as_u64().unwrap_or(0) >= last {
            break started.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < deadline, "the backlog did not drain in 900 s");
        if std::env::var("BENCH_TRACE").is_ok() {
            eprintln!(
                "trace {:6.3} sent {:>10} received {} applied {} last {last} cwnd {} rtt {} udp {} lost {}",
                started.elapsed().as_secs_f64(),
                mirror["sent_bytes"],
                mirror["received_lsn"],
                mirror["applied_lsn"],
                mirror["link"]["congestion_window_bytes"],
                mirror["link"]["rtt_ms"],
                mirror["link"]["sent_udp_bytes"],
                mirror["link"]["lost_packets"]
            );
        }
        // Each status request costs the volume a thread and a JSON reply: every 5 ms that was
        // a fifth of the volume process's CPU during a drain (perf), taken from the sender.
        std::thread::sleep(STATUS_POLL);
    };
    let cpu = MirrorCpu::sample(volume.0.id(), applier.0.id()).since(cpu_at_start);
    drop(profile);
    if let Some(relay) = &relay {
        eprintln!("relay: {:?}", relay.stats);
    }
    let records = last - start_applied;
    let record_bytes = if bs == "1m" { 1 << 20 } else { 4096 };
    Drain { bytes: records * record_bytes, records, received_seconds: received_seconds.unwrap_or(applied_seconds), applied_seconds, cpu, writes_cpu_before }
}

/// With BENCH_PERF=DIR, a CPU profile of the applier process during a drain
/// (`perf record -e cpu-clock -g -p PID`), written to DIR/<name>-applier.data; stopped with
/// SIGINT when dropped. Nothing otherwise.
struct DrainProfile(Option<std::process::Child>);

impl DrainProfile {
    fn start(name: &str, applier: u32) -> DrainProfile {
        let Ok(dir) = std::env::var("BENCH_PERF") else { return DrainProfile(None) };
        let _ = std::fs::create_dir_all(&dir);
        let output = Path::new(&dir).join(format!("{name}-applier.data"));
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-g", "-p", &applier.to_string(), "-o"])
            .arg(&output)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("perf (apt-get install -y linux-perf)");
        eprintln!("  profiling the applier into {}", output.display());
        DrainProfile(Some(child))
    }
}

impl Drop for DrainProfile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// Status through the control socket (cheap enough to poll every few milliseconds).
fn control_status(socket: &Path) -> serde_json::Value {
    ublk_mirror::control::request(socket, "status").expect("status from the running volume")
}

/// The transport's ceiling: one QUIC stream with the sender's TLS and transport settings,
/// sender in this process, receiver in a child process (this same bench binary, started with
/// BENCH_QUIC_RECEIVER set), like the sender in `run` and the applier process. `pinned`: the
/// sending thread on CPU 0 and the receiver on CPU 1; `pace`: at most that many bytes/s.
fn raw_quic(base: &Path, total: u64, write_bytes: usize, pinned: bool, pace: Option<f64>) -> RawQuic {
    raw_quic_via(base, total, write_bytes, pinned, pace, None)
}

/// [`raw_quic`], `via` a relay with that impairment when given.
fn raw_quic_via(base: &Path, total: u64, write_bytes: usize, pinned: bool, pace: Option<f64>, via: Option<relay::Impairment>) -> RawQuic {
    use std::io::BufRead;
    use ublk_mirror::protocol::{tls, transport};
    let a = base.join("quic-a");
    let b = base.join("quic-b");
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
    ublk_mirror::identity::create(&a, "a").unwrap();
    ublk_mirror::identity::create(&b, "b").unwrap();
    let server_id = tls::Identity::load(&a).unwrap();
    let client_id = tls::Identity::load(&b).unwrap();
    let mut receiver = command_on(&std::env::current_exe().unwrap(), pinned.then_some(1))
        .env("BENCH_QUIC_RECEIVER", format!("{}|{}|{total}", a.display(), client_id.fingerprint))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(receiver.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let address: std::net::SocketAddr = line.trim().parse().expect("the receiver prints its address");
    let relay = via.map(|link| relay::Relay::start(address, link, relay::Impairment { rate: None, ..link }, 50));
    let address = relay.as_ref().map_or(address, |r| r.address());
    if pinned {
        pin_current_thread(Some(0));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sender_cpu_at_start = thread_cpu_seconds();
    let elapsed = runtime.block_on(async {
        let mut endpoint = transport::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        endpoint.set_default_client_config(
            transport::client_config(&client_id, &server_id.fingerprint, std::time::Duration::from_secs(15), transport::Congestion::default()).unwrap(),
        );
        let connection = endpoint.connect(address, "applier").unwrap().await.unwrap();
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        if std::env::var("BENCH_QUIC_TRACE").is_ok() {
            let connection = connection.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                for _ in 0..60 {
                    let s = connection.stats();
                    eprintln!(
                        "tx {:6.3} cwnd {:>9} rtt {:?} sent {:>10} lost {} events {} mtu {}",
                        t0.elapsed().as_secs_f64(),
                        s.path.cwnd,
                        s.path.rtt,
                        s.udp_tx.bytes,
                        s.path.lost_packets,
                        s.path.congestion_events,
                        s.path.current_mtu
                    );
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            });
        }
        let chunk = vec![0x5au8; write_bytes];
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            send.write_all(&chunk).await.unwrap();
            sent += chunk.len() as u64;
            if let Some(rate) = pace {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                if due > Instant::now() + Duration::from_millis(1) {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
        }
        let stats_before_close = connection.stats();
        // The receiver closes once it has read everything.
        connection.closed().await;
        if std::env::var("BENCH_ONLY").as_deref() == Ok("quic") {
            println!("sender path: {:?}", stats_before_close.path);
            println!("sender frames tx: {:?}", stats_before_close.frame_tx);
            println!("sender udp tx: {:?}", stats_before_close.udp_tx);
        }
        started.elapsed()
    });
    let sender_cpu = thread_cpu_seconds() - sender_cpu_at_start;
    if pinned {
        pin_current_thread(None);
    }
    let children_before = children_cpu_seconds();
    receiver.wait().unwrap();
    // The same measure as the mirror's CPU rows, for comparison: the sending thread, and the
    // whole receiving process (handshake included).
    let cpu = MirrorCpu { sender: sender_cpu, applier: children_cpu_seconds() - children_before };
    RawQuic { rate: total as f64 / elapsed.as_secs_f64() / 1e6, cpu_per_mib: cpu.scaled(1.0 / (total >> 20) as f64) }
}

/// The raw QUIC stream's rate (MB/s) and the CPU seconds per MiB of its two ends.
struct RawQuic {
    rate: f64,
    cpu_per_mib: MirrorCpu,
}

impl RawQuic {
    fn describe(&self) -> String {
        let (sender, receiver) = (self.cpu_per_mib.sender * 1e6, self.cpu_per_mib.applier * 1e6);
        format!("{:.0} MB/s; CPU per MiB: sender {sender:.1} us, receiver {receiver:.1} us", self.rate)
    }

    /// Upper bounds on a drain's rate against this stream, from CPU time alone: the mirror
    /// does at least what the raw stream does plus the applier's two file writes
    /// (`writes_per_mib`: its journal and its image; the sender's journal read and CRC checks
    /// are left out, so the bounds are generous). Returned: with both ends sharing this
    /// machine's two CPUs, and with a CPU for each end (as on two hosts).
    fn drain_bounds(&self, writes_per_mib: f64) -> (f64, f64) {
        let raw_wall_per_mib = 1.048576 / self.rate;
        let MirrorCpu { sender, applier: receiver } = self.cpu_per_mib;
        let shared = raw_wall_per_mib / ((sender + receiver + writes_per_mib) / 2.0);
        let own_cpus = raw_wall_per_mib / sender.max(receiver + writes_per_mib);
        (shared, own_cpus)
    }
}

/// CPU seconds per MiB that the applier's two file writes cost on the disk at `dir`, measured
/// on this thread: 1 GiB written in 1 MiB pieces into a new sparse file (the replica image
/// of a new mirror) and again over it (a recycled journal segment: its pages exist).
fn applier_writes_cpu(dir: &Path) -> f64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join("write-cost");
    let file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let started = thread_cpu_seconds();
    for pass in 0..2 {
        for i in 0..1024u64 {
            file.write_all_at(&chunk, i << 20).unwrap_or_else(|e| panic!("write pass {pass}: {e}"));
        }
    }
    let per_mib = (thread_cpu_seconds() - started) / 1024.0;
    drop(file);
    let _ = std::fs::remove_file(&path);
    per_mib
}

/// User + system CPU seconds of the calling thread.
fn thread_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_THREAD)
}

/// User + system CPU seconds of every child process waited for so far.
fn children_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_CHILDREN)
}

fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and has no other effect.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The receiving end of [`raw_quic`], run in the child process.
fn quic_receiver(spec: &str) {
    use ublk_mirror::protocol::{tls, transport};
    let mut parts = spec.split('|');
    let (dir, client_fp, total) = (parts.next().unwrap(), parts.next().unwrap().to_string(), parts.next().unwrap().parse::<u64>().unwrap());
    let server_id = tls::Identity::load(Path::new(dir)).unwrap();
    let server_config = transport::server_config(&server_id, Arc::new(move |fp: &str| fp == client_fp), std::time::Duration::from_secs(15)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let endpoint = transport::endpoint("127.0.0.1:0".parse().unwrap(), Some(server_config)).unwrap();
        println!("{}", endpoint.local_addr().unwrap());
        let connection = endpoint.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = connection.accept_bi().await.unwrap();
        let mut received = 0u64;
        let mut buffer = vec![0u8; 4 << 20];
        let trace = std::env::var("BENCH_QUIC_TRACE").is_ok();
        let started = Instant::now();
        let mut next_trace = 0u64;
        while received < total {
            match recv.read(&mut buffer).await.unwrap() {
                Some(n) => received += n as u64,
                None => break,
            }
            if trace && received >= next_trace {
                eprintln!("rx {:7.3} {:>6} MiB", started.elapsed().as_secs_f64(), received >> 20);
                next_trace += 4 << 20;
            }
        }
        if std::env::var("BENCH_ONLY").as_deref() == Ok("quic") {
            eprintln!("receiver path: {:?}", connection.stats().path);
            eprintln!("receiver udp rx: {:?}", connection.stats().udp_rx);
        }
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
}

/// What this disk gives a sequential buffered write made durable (the applier's pattern).
fn disk_write_rate(base: &Path) -> f64 {
    use std::io::Write;
    let path = base.join("disk-rate");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    let started = Instant::now();
    for _ in 0..256 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_data().unwrap();
    let rate = (1u64 << 30) as f64 / started.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(&path);
    rate
}

fn raw_tcp(total: u64) -> f64 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buffer = vec![0u8; 4 << 20];
        let mut received = 0u64;
        while received < total {
            let n = stream.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            received += n as u64;
        }
    });
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        stream.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    drop(stream);
    receiver.join().unwrap();
    total as f64 / started.elapsed().as_secs_f64() / 1e6
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
