//! Rows 3 and 7 of the replication bench: fio bursts through NBD with a live mirror against
//! the same volume with none, and how long the mirror needs to catch up after each burst.
//!
//! Row 3 runs 4 KiB random writes at QD32 wherever the scheduler puts things (or as
//! BENCH_PIN says): once with the applier's files on a disk of their own (a tmpfs directory:
//! this machine has one disk), once on the volume's disk, and a calibration burst beside a
//! busy loop at idle priority. Row 7 simulates two hosts on this one machine: fio and the
//! volume process share CPU 0 (the source host), the applier has CPU 1 and a tmpfs directory
//! (the replica host); the bursts without a mirror are pinned the same way. The volume is
//! pre-filled and the replica seeded with a copy of it, so the mirror is in sync before the
//! burst without 2 GiB crossing loopback first (see `seed`). It runs 4 KiB
//! random writes QD32 and 1 MiB sequential writes, target 0.9x with a live mirror and the
//! replica caught up within 2 s of the burst's end.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{add, mirror_wait, mirrored_volume, pinning, run, spawn_on, status, MirrorCpu};

/// Where the processes of a burst run: the source's CPU (fio and the volume process) and the
/// replica's (the applier); `None` lets the scheduler choose.
#[derive(Clone, Copy)]
pub struct Placement {
    pub source: Option<usize>,
    pub replica: Option<usize>,
}

impl Placement {
    /// Two hosts simulated: the source on CPU 0, the replica on CPU 1.
    pub const TWO_HOSTS: Placement = Placement { source: Some(0), replica: Some(1) };

    /// As BENCH_PIN says: two hosts simulated when it is 1, anywhere otherwise.
    pub fn from_env() -> Placement {
        if pinning() {
            Placement::TWO_HOSTS
        } else {
            Placement { source: None, replica: None }
        }
    }
}

/// What a burst writes: fio's `rw` and block size, and for how long.
#[derive(Clone, Copy)]
pub struct Load {
    pub rw: &'static str,
    pub bs: &'static str,
    pub seconds: u64,
    /// Fill the whole backing store with data before the volume starts, then drop it from
    /// the page cache: a volume in use, whose pages are not all cached. (Otherwise the
    /// burst writes into a new sparse file, allocating blocks as it goes.)
    pub prefilled: bool,
}

impl Load {
    fn label(&self) -> String {
        match self.rw {
            "randwrite" => format!("NBD {} randwrite QD32 {}s", self.bs.to_uppercase(), self.seconds),
            _ => format!("NBD {} seq write QD32 {}s", self.bs.to_uppercase(), self.seconds),
        }
    }

    /// "52210 IOPS" for small blocks, "612 MB/s" for large ones.
    fn rate(&self, burst: &Burst) -> (f64, &'static str) {
        if self.bs == "4k" {
            (burst.iops, "IOPS")
        } else {
            (burst.bandwidth / 1e6, "MB/s")
        }
    }
}

/// Row 3: 4K random writes, no mirror against a live one (alternating), catch-up times, the
/// calibration row and the same-disk row.
pub fn rows(base: &Path, own_disk: &Path, seconds: u64, rows: &mut Vec<(String, String)>) {
    let load = Load { rw: "randwrite", bs: "4k", seconds, prefilled: false };
    let placement = Placement::from_env();
    let without_mean = compare(base, own_disk, load, placement, "applier's own disk", rows);
    // Calibration: the same burst without a mirror while one busy loop runs at idle priority
    // (SCHED_IDLE: it only ever gets CPU time nothing else wants). What it costs is what any
    // background work costs this pipeline on this machine, however low its priority.
    let hog = IdleHog::start();
    let hogged = burst(base, base, false, load, placement).iops;
    drop(hog);
    add(rows, (format!("{}, no mirror, idle-priority busy loop", load.label()), format!("{hogged:.0} IOPS ({:.2}x)", hogged / without_mean)));
    let same_disk = burst(base, base, true, load, placement);
    add(
        rows,
        (format!("{}, live mirror, applier on the same disk", load.label()), format!("{:.0} IOPS ({:.2}x)", same_disk.iops, same_disk.iops / without_mean)),
    );
    if let Some(CatchUp { behind, seconds: took, .. }) = same_disk.catch_up {
        add(rows, ("  catch-up after that burst".into(), format!("{took:.2} s ({behind} records behind when it ended)")));
    }
}

/// Row 7: two hosts simulated (see the module's comment), 4K random and 1M sequential writes.
pub fn two_host_rows(base: &Path, own_disk: &Path, seconds: u64, rows: &mut Vec<(String, String)>) {
    // BENCH_BS=4k or 1m runs one of the two.
    let only = std::env::var("BENCH_BS").ok();
    for (rw, bs) in [("randwrite", "4k"), ("write", "1m")].into_iter().filter(|(_, bs)| only.as_deref().is_none_or(|only| only == *bs)) {
        compare(base, own_disk, Load { rw, bs, seconds, prefilled: true }, Placement::TWO_HOSTS, "two hosts simulated, pre-filled", rows);
    }
}

/// Bursts without a mirror and with a live one (the applier under `own_disk`), alternating
/// BENCH_ROUNDS times (default 2); adds the means, the ratio against its 0.9x target and each
/// catch-up. Returns the mean without a mirror.
fn compare(base: &Path, own_disk: &Path, load: Load, placement: Placement, setting: &str, rows: &mut Vec<(String, String)>) -> f64 {
    // The bursts alternate (none, mirror; mirror, none; ...) and start after a `sync`: on this
    // shared one-disk VM a single 30 s burst varies by +-10% with the page cache's state, which
    // is as large as the effect measured.
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2).max(1);
    let (mut without, mut with, mut catch_ups) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for mirrored in if round % 2 == 0 { [false, true] } else { [true, false] } {
            let burst = burst(base, own_disk, mirrored, load, placement);
            let (rate, unit) = load.rate(&burst);
            eprintln!("  {} round {}: {} {rate:.0} {unit}", load.label(), round + 1, if mirrored { "live mirror" } else { "no mirror" });
            if mirrored {
                with.push(rate)
            } else {
                without.push(rate)
            }
            catch_ups.extend(burst.catch_up);
        }
    }
    let unit = load.rate(&Burst { iops: 0.0, bandwidth: 0.0, catch_up: None, raw: None }).1;
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let spread = |values: &[f64]| format!("{:.0}-{:.0}", values.iter().cloned().fold(f64::MAX, f64::min), values.iter().cloned().fold(0.0, f64::max));
    let without_mean = mean(&without);
    add(rows, (format!("{}, no mirror, {setting}", load.label()), format!("{without_mean:.0} {unit} (mean of {rounds}: {})", spread(&without))));
    add(
        rows,
        (
            format!("{}, live mirror, {setting}", load.label()),
            format!("{:.0} {unit} ({:.2}x; target 0.9x; mean of {rounds}: {})", mean(&with), mean(&with) / without_mean, spread(&with)),
        ),
    );
    // With what the mirror cost per record (per MiB for large blocks), burst and catch-up
    // together (with the applier on a host of its own, only the sender's share is taken from
    // the source).
    // The machine's bound on this row: the burst without a mirror beside a raw QUIC stream
    // carrying what the live mirror sent (CPU 0 to CPU 1, as the mirror). On two real hosts
    // the receiving end's work and memory would not touch the source's CPU and page
    // allocator; here they share one VM.
    let mut raw = None;
    if placement.replica.is_some() {
        let live_bytes_per_second = mean(&with) * if load.bs == "4k" { 4096.0 } else { 1e6 };
        let beside = burst_beside(base, own_disk, false, load, placement, Some(live_bytes_per_second));
        let rate = load.rate(&beside).0;
        add(
            rows,
            (
                format!("{}, no mirror, raw QUIC stream of the mirror's bytes beside", load.label()),
                format!("{rate:.0} {unit} ({:.2}x: this machine's bound for the live mirror's ratio)", rate / without_mean),
            ),
        );
        raw = beside.raw;
    }
    for CatchUp { behind, state, seconds: took, cpu, records } in &catch_ups {
        let cost = if load.bs == "4k" { cpu.per(*records, "record") } else { cpu.per((records * block_bytes(load.bs)) >> 20, "MiB") };
        add(
            rows,
            (
                "  catch-up after that burst".into(),
                format!(
                    "{took:.2} s (target 2 s; {behind} records behind when it ended, mirror {state}{}); mirror CPU {cost} ({records} records)",
                    if state == "replicating" { "" } else { ": the journal let go of it, the catch-up is a resync" }
                ),
            ),
        );
    }
    if let Some(raw) = raw {
        add(rows, cpu_against_raw(own_disk, load, &catch_ups, &raw));
    }
    without_mean
}

/// The mirror's CPU per record (4 KiB) or per MiB (1 MiB writes) over the live bursts and
/// their catch-ups, against the raw QUIC stream's for the same bytes: the sender against the
/// raw sender (target 1.3x), the applier against the raw receiver (target 2x). Beside the
/// applier's ratio, its bound on this machine: the raw receive plus the two file writes every
/// applied byte costs (its journal and its image) on the replica's disk, measured here.
/// Both overwrite pages that exist (recycled journal segments, the seeded image), as in the
/// bursts: on this VM a first touch of a page costs several times more (free page reporting).
fn cpu_against_raw(own_disk: &Path, load: Load, catch_ups: &[CatchUp], raw: &super::RawQuic) -> (String, String) {
    let (unit, bytes) = if load.bs == "4k" { ("record", 4096.0) } else { ("MiB", 1048576.0) };
    let units: f64 = catch_ups.iter().map(|c| c.records as f64 * block_bytes(load.bs) as f64 / bytes).sum();
    let sender = catch_ups.iter().map(|c| c.cpu.sender).sum::<f64>() / units.max(1.0) * 1e6;
    let applier = catch_ups.iter().map(|c| c.cpu.applier).sum::<f64>() / units.max(1.0) * 1e6;
    let per_unit = bytes / 1048576.0 * 1e6;
    let (raw_sender, raw_receiver) = (raw.cpu_per_mib.sender * per_unit, raw.cpu_per_mib.applier * per_unit);
    let writes = rewrites_cpu(own_disk) * per_unit;
    (
        format!("  {} mirror CPU per {unit} against raw QUIC", load.label()),
        format!(
            "sender {sender:.1} us vs {raw_sender:.1} us ({:.2}x; target 1.3x), applier {applier:.1} us vs {raw_receiver:.1} us ({:.2}x; target 2x; \
             bound: raw receive + journal and image writes on the replica's disk, {:.1} us, {:.2}x)",
            sender / raw_sender,
            applier / raw_receiver,
            raw_receiver + writes,
            (raw_receiver + writes) / raw_receiver
        ),
    )
}

fn block_bytes(bs: &str) -> u64 {
    if bs == "1m" {
        1 << 20
    } else {
        4096
    }
}

/// CPU seconds per MiB of two 1 MiB overwrites (journal and image) of existing pages of a file
/// under `dir`, measured on this thread over 256 MiB written twice.
fn rewrites_cpu(dir: &Path) -> f64 {
    super::raw::two_writes_cpu(dir, 256, true)
}

/// One fio burst: its IOPS and bytes/s, and with a mirror what followed it.
pub struct Burst {
    pub iops: f64,
    pub bandwidth: f64,
    pub catch_up: Option<CatchUp>,
    /// The raw QUIC stream that ran beside the burst, if one did.
    raw: Option<super::RawQuic>,
}

/// After a burst with a live mirror: records the mirror was behind when the burst ended, the
/// seconds it took to apply them, and the mirror's CPU time from the burst's start until it
/// had caught up, with the records written meanwhile.
pub struct CatchUp {
    pub behind: u64,
    /// The mirror's state when the burst ended: `tracking` or `resyncing` if the journal let
    /// go of it (it fell behind by more than the journal holds) and the catch-up is a resync.
    pub state: String,
    pub seconds: f64,
    pub cpu: MirrorCpu,
    pub records: u64,
}

/// A fio burst through NBD on a new volume, with a live mirror when `mirrored` (the
/// applier's directory under `applier_base`), its processes placed as `placement` says.
pub fn burst(base: &Path, applier_base: &Path, mirrored: bool, load: Load, placement: Placement) -> Burst {
    burst_beside(base, applier_base, mirrored, load, placement, None)
}

/// [`burst`], with a raw QUIC stream of `stream` bytes/s running beside fio (its sender on
/// the source's CPU, its receiver on the replica's) when given.
fn burst_beside(base: &Path, applier_base: &Path, mirrored: bool, load: Load, placement: Placement, stream: Option<f64>) -> Burst {
    let name = if !mirrored {
        "none"
    } else if applier_base == base {
        "live-same-disk"
    } else {
        "live-own-disk"
    };
    let (vdir, adir, port) = mirrored_volume(base, applier_base, name, "1G");
    if !mirrored {
        run(&["mirror", "remove", "--dir", vdir.to_str().unwrap()]);
    }
    if load.prefilled {
        prefill(&vdir.join("data.img"));
        if mirrored {
            seed(&vdir.join("data.img"), &adir);
        }
    }
    let applier = mirrored.then(|| {
        spawn_on(&["applier", "run", "--dir", adir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")], &adir.join("control.sock"), placement.replica)
    });
    let socket = base.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let nbd = format!("unix:{}", socket.display());
    let volume = spawn_on(&["run", "--dir", vdir.to_str().unwrap(), "--nbd", &nbd], &vdir.join("control.sock"), placement.source);
    if mirrored {
        // The burst starts once the new replica's initial synchronisation is over.
        super::wait_synchronised(&vdir);
    }
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(1));
    let first_lsn = status(&vdir)["volume"]["last_lsn"].as_u64().unwrap_or(0);
    let cpu_at_start = applier.as_ref().map(|applier| MirrorCpu::sample(volume.0.id(), applier.0.id()));
    let uri = format!("nbd+unix:///bench?socket={}", socket.display());
    // BENCH_PERF_REPLICA=1: the replica's CPU (the applier) instead of the source's.
    let profiled = if std::env::var("BENCH_PERF_REPLICA").is_ok() { placement.replica } else { placement.source };
    let profile = Profile::start(profiled, &format!("{name}-{}", load.bs), load.seconds);
    let streaming = stream.map(|rate| {
        let base = base.to_path_buf();
        let total = (rate * load.seconds as f64) as u64;
        // Written in the burst's block size, as the mirror's payloads are.
        let write_bytes = block_bytes(load.bs) as usize;
        std::thread::spawn(move || super::raw_quic(&base, total, write_bytes, true, Some(rate)))
    });
    let fio = super::common::fio_on(placement.source, base, &uri, load.rw, load.bs, 32, load.seconds, &[]);
    drop(profile);
    let raw = streaming.map(|streaming| streaming.join().expect("the raw QUIC stream beside the burst"));
    if let Some(raw) = &raw {
        eprintln!("  raw QUIC stream beside the burst: {}", raw.describe());
    }
    let (Some(applier), Some(cpu_at_start)) = (&applier, cpu_at_start) else { return Burst { iops: fio.iops, bandwidth: fio.bandwidth, catch_up: None, raw } };
    let ended = Instant::now();
    let at_end = status(&vdir);
    let last = at_end["volume"]["last_lsn"].as_u64().unwrap();
    let behind = last - at_end["mirrors"][0]["applied_lsn"].as_u64().unwrap();
    let state = at_end["mirrors"][0]["state"].as_str().unwrap_or("unknown").to_string();
    mirror_wait(&vdir);
    let seconds = ended.elapsed().as_secs_f64();
    let cpu = MirrorCpu::sample(volume.0.id(), applier.0.id()).since(cpu_at_start);
    Burst { iops: fio.iops, bandwidth: fio.bandwidth, catch_up: Some(CatchUp { behind, state, seconds, cpu, records: last - first_lsn }), raw: None }
}

/// Writes every byte of the (not yet running) volume's backing file with fresh random data
/// in 4 KiB buffered writes and makes it durable, leaving it in the page cache in 4 KiB
/// folios: as the backing file of a volume in service (buffered backing writes keep what
/// they wrote cached), and the same for both bursts of a comparison. A cold file made every
/// first write of a page allocate one, and on this VM a page the kernel has handed back to
/// the host (free page reporting, 2 s after it was freed) costs about 12 us to touch again
/// (`copy_folio_from_iter_atomic`; measured with plain `pwrite`s: 3.2 ms per MiB against
/// 0.16 for cached pages). That cost fell unevenly on the bursts: more of it on the slower
/// one, the live mirror's, whose writes are a larger share of first touches.
fn prefill(backing: &Path) {
    let size = std::fs::metadata(backing).unwrap_or_else(|e| panic!("{}: {e}", backing.display())).len();
    let file = format!("--filename={}", backing.display());
    let status = Command::new("fio")
        .args(["--name=prefill", "--ioengine=psync", &file, "--rw=write", "--bs=4k", &format!("--size={size}"), "--refill_buffers", "--end_fsync=1"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("fio (apt-get install -y fio)");
    assert!(status.success(), "fio could not fill {}", backing.display());
}

/// Gives the applier a copy of the pre-filled backing file as the replica (`applier replica
/// add`), so the initial synchronisation compares hashes and sends nothing: the burst starts
/// from a mirror in sync, as a long-established one is. Copying 2 GiB through loopback QUIC
/// first left this VM's page allocations slow for a while, whatever wrote afterwards (fio
/// psync 4 KiB writes to an unrelated file: 195k IOPS before, 112k after), which would be
/// charged to the live mirror. The copy is made with O_DIRECT for the same reason: `cp`
/// filled and then freed 2 GiB of page cache before the live burst only (its backing file's
/// writes then cost 18% of the source's CPU in `copy_folio_from_iter_atomic`, against 3% in
/// the burst without a mirror).
fn seed(backing: &Path, adir: &Path) {
    let image = adir.join("seed.img");
    let copied = Command::new("dd")
        .arg(format!("if={}", backing.display()))
        .arg(format!("of={}", image.display()))
        .args(["bs=1M", "iflag=direct", "oflag=direct", "conv=fsync", "status=none"])
        .status();
    assert!(copied.is_ok_and(|s| s.success()), "could not copy {} to {} with O_DIRECT (dd)", backing.display(), image.display());
    run(&["applier", "replica", "add", "--dir", adir.to_str().unwrap(), "--volume", "bench", "--image", image.to_str().unwrap()]);
}

/// With BENCH_PERF=DIR, a CPU profile of the source's CPU (`perf record -e cpu-clock -g`) for
/// the middle of a burst, written to DIR/<volume>-<block size>.data (read it with
/// `perf report -i FILE --sort comm,sym`); nothing otherwise.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(cpu: Option<usize>, name: &str, burst_seconds: u64) -> Profile {
        let Ok(dir) = std::env::var("BENCH_PERF") else { return Profile(None) };
        let _ = std::fs::create_dir_all(&dir);
        let output = Path::new(&dir).join(format!("{name}.data"));
        let mut perf = Command::new("perf");
        perf.args(["record", "-q", "-e", "cpu-clock", "-g", "-o"]).arg(&output);
        match cpu {
            Some(cpu) => perf.args(["-C", &cpu.to_string()]),
            None => perf.arg("-a"),
        };
        // Skip the burst's first 2 s (fio connecting, the queue filling) and stop 2 s early.
        let seconds = burst_seconds.saturating_sub(2).max(3);
        perf.args(["--delay", "2000", "--", "sleep", &seconds.to_string()]);
        let child = perf.stdout(std::process::Stdio::null()).spawn().expect("perf (apt-get install -y linux-perf)");
        eprintln!("  profiling into {}", output.display());
        Profile(Some(child))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// A thread spinning at SCHED_IDLE until dropped.
struct IdleHog {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdleHog {
    fn start() -> IdleHog {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: plain syscall on the calling thread with a valid parameter struct.
                let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                assert_eq!(set, 0, "sched_setscheduler(SCHED_IDLE): {}", std::io::Error::last_os_error());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }
        });
        IdleHog { stop, thread: Some(thread) }
    }
}

impl Drop for IdleHog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
