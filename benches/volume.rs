//! Volume benchmark (`cargo bench --bench volume`): prints a table, asserts nothing.
//!
//! 1. Journal append throughput (group commit, recycled segments) against a plain sequential
//!    O_DIRECT write of the same bytes to a preallocated file, on the same file system, and
//!    beside it the journal's own I/O without the journal (buffered writes + fdatasync); the
//!    payloads copied into the journal's batch buffer, and handed over by reference as the
//!    volume hands over its write requests.
//! 2. fio (nbd engine) through `ublk-mirror run --nbd` against `qemu-nbd` serving a raw file of
//!    the same size: 4 KiB random writes at QD32 (a short burst and a run long enough to fill
//!    the pending window) and 1 MiB sequential writes.
//!
//! 3. Where the journal lives, all with the same durability (fio `end_fsync=1`: the job ends
//!    with a flush both servers make durable): NBD 1 MiB sequential and 4 KiB random writes
//!    with the journal in the volume directory (the disk that holds the backing store) and
//!    placed on another filesystem (`volume create --journal-dir`; a tmpfs stands in for a
//!    dedicated device on a single-disk machine: it measures what taking the journal off the
//!    backing store's disk buys, not an SSD), against `qemu-nbd` (page cache) and
//!    `qemu-nbd --cache=none` (O_DIRECT).
//!
//! BENCH_SECONDS scales the fio runs (default 15; the sustained run is 4x that and ends with
//! `end_fsync=1`, against qemu-nbd and qemu-nbd --cache=none; the placement rows a third of
//! it, at least 5 s). BENCH_ONLY=sustained runs only the sustained row (after the journal
//! append rows).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
mod common;

use common::{fio_with, Daemon, FioResult};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ublk_mirror::extent::Extent;
use ublk_mirror::fsutil::{self, AlignedBuffer};
use ublk_mirror::journal::{Journal, JournalOptions, RecordKind};

const GIB: u64 = 1 << 30;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-volume");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    println!("ublk-mirror volume benchmark (files under {}; one run, same file system)", base.display());
    println!();

    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let plain = plain_write(&base.join("plain.img"), GIB, true);
    for (record_size, shared) in [(4096usize, false), (1 << 20, false), (4096, true), (1 << 20, true)] {
        let journal = journal_append(&base.join(format!("journal-{record_size}")), GIB, record_size, shared);
        // `shared`: the payload handed over as a shared buffer, as the volume hands over its
        // write requests (written from where it is, not copied into the batch buffer).
        let how = if shared { ", by reference (as a volume's writes)" } else { "" };
        rows.push((
            format!("journal append, {} records{how}", human(record_size as u64)),
            format!("{journal:.0} MB/s"),
            format!("{plain:.0} MB/s (plain O_DIRECT 1M writes)"),
            format!("{:.2}x", journal / plain),
        ));
    }
    // The journal writes through the page cache (a copy per byte, besides its staging copy and
    // CRC) and makes it durable with fdatasync: the same I/O without the journal is its bound
    // on this machine, whatever the disk's O_DIRECT rate.
    let buffered = plain_write(&base.join("buffered.img"), GIB, false);
    rows.push((
        "  bound: plain buffered 1M writes + fdatasync".into(),
        format!("{buffered:.0} MB/s"),
        format!("{plain:.0} MB/s (plain O_DIRECT 1M writes)"),
        format!("{:.2}x", buffered / plain),
    ));

    for tool in ["fio", "qemu-nbd"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).status().map(|s| s.success()).unwrap_or(false);
        assert!(found, "the benchmark needs {tool}: apt-get install -y fio qemu-utils");
    }
    // The sustained run ends with a flush both servers make durable (fio `end_fsync=1`), and
    // is compared with qemu-nbd through the page cache and with `--cache=none` (O_DIRECT):
    // the same durability, so the pending writeback counts.
    let sustained_only = std::env::var("BENCH_ONLY").as_deref() == Ok("sustained");
    let jobs = [
        ("4K randwrite QD32 burst", "randwrite", "4k", 32, seconds, false),
        ("4K randwrite QD32 sustained end_fsync", "randwrite", "4k", 32, seconds * 4, true),
        ("1M seq write QD4", "write", "1m", 4, seconds, false),
    ];
    for (label, rw, bs, depth, runtime, durable) in jobs {
        if sustained_only && !durable {
            continue;
        }
        let extra: &[&str] = if durable { &["--end_fsync=1"] } else { &[] };
        let (ours, peak_pending) = with_ours(&base, &[], |uri, dir| {
            let sampler = PendingSampler::start(dir);
            let result = fio_with(&base, uri, rw, bs, depth, runtime, extra);
            (result, sampler.stop())
        });
        let unit = |r: &FioResult| if bs == "4k" { format!("{:.0} IOPS", r.iops) } else { format!("{:.0} MB/s", r.bandwidth / 1e6) };
        let baselines: &[(&str, &[&str])] = if durable { &[("qemu-nbd", &[]), ("qemu-nbd --cache=none", &["--cache=none"])] } else { &[("qemu-nbd", &[])] };
        for (baseline, args) in baselines {
            let theirs = with_qemu(&base, args, |uri| fio_with(&base, uri, rw, bs, depth, runtime, extra));
            rows.push((
                format!("NBD {label} {runtime}s (peak pending {})", human(peak_pending)),
                unit(&ours),
                format!("{} ({baseline})", unit(&theirs)),
                format!("{:.2}x", ours.iops / theirs.iops),
            ));
        }
    }
    if !sustained_only {
        rows.extend(placement_rows(&base, (seconds / 3).max(5)));
    }

    println!("{:<64} {:>14} {:>40} {:>7}", "measure", "ublk-mirror", "baseline", "ratio");
    for (what, ours, baseline, ratio) in rows {
        println!("{what:<64} {ours:>14} {baseline:>40} {ratio:>7}");
    }
    println!();
    println!(
        "targets: journal append >= 0.9x plain O_DIRECT; NBD 4K random-write IOPS >= 0.9x qemu-nbd; sustained 60 s end_fsync >= 0.9x both qemu-nbd baselines"
    );
    let _ = std::fs::remove_dir_all(&base);
}

fn human(bytes: u64) -> String {
    ublk_mirror::size::format_size(bytes)
}

/// Sequential 1 MiB writes over a preallocated file, then one fdatasync: with O_DIRECT when
/// `direct`, else buffered over pages the preallocation left cached (as a recycled journal
/// segment's are).
fn plain_write(path: &Path, total: u64, direct: bool) -> f64 {
    fsutil::create_zero_filled(path, total).unwrap();
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let file = OpenOptions::new().write(true).custom_flags(flags).open(path).unwrap();
    let mut buffer = AlignedBuffer::new(1 << 20);
    buffer.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let started = Instant::now();
    let mut offset = 0;
    while offset < total {
        file.write_all_at(&buffer, offset).unwrap();
        offset += buffer.len() as u64;
    }
    file.sync_data().unwrap();
    let rate = total as f64 / started.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(path);
    rate
}

/// Appends `total` payload bytes in records of `record_size` into recycled segments, then syncs.
fn journal_append(dir: &Path, total: u64, record_size: usize, shared: bool) -> f64 {
    let options = JournalOptions { segment_size: 64 << 20, capacity: total + (256 << 20), journal_id: [7; 16] };
    Journal::create(dir, options).unwrap();
    let (journal, mut writer, _) = Journal::open(dir, options).unwrap();
    let payload = bytes::Bytes::from(vec![0x5au8; record_size]);
    let mut fill = |bytes: u64| {
        let mut written = 0;
        while written < bytes {
            let extent = Extent::new(0, record_size as u64);
            let appended = if shared {
                writer.append_parts(RecordKind::Write, extent, std::slice::from_ref(&payload), 0)
            } else {
                writer.append(RecordKind::Write, extent, &payload, 0)
            };
            match appended {
                Ok(_) => written += record_size as u64,
                Err(error) => panic!("append: {error:?}"),
            }
        }
        writer.commit(true).unwrap();
    };
    // Warm up: create every segment once and trim them, so the measured pass reuses files
    // exactly as a long-running volume does.
    fill(total);
    journal.trim_through(journal.synced_lsn()).unwrap();
    let started = Instant::now();
    fill(total);
    let rate = total as f64 / started.elapsed().as_secs_f64() / 1e6;
    drop(journal);
    let _ = std::fs::remove_dir_all(dir);
    rate
}

/// Serves a fresh 1 GiB volume (`volume create` with `create_args`) over NBD while `job`
/// runs against its URI.
fn with_ours<R>(base: &Path, create_args: &[&str], job: impl FnOnce(&str, &Path) -> R) -> R {
    let dir = base.join("vol");
    let _ = std::fs::remove_dir_all(&dir);
    let created = Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args(["volume", "create", "--dir", dir.to_str().unwrap(), "--name", "bench", "--size", "1G"])
        .args(create_args)
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let socket = base.join("vol.sock");
    let server = start_server(
        Command::new(env!("CARGO_BIN_EXE_ublk-mirror")).args(["run", "--dir", dir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())]),
        &socket,
    );
    let result = job(&format!("nbd+unix:///bench?socket={}", socket.display()), &dir);
    drop(server);
    result
}

/// Serves a fresh 1 GiB raw file with `qemu-nbd ARGS` while `job` runs against its URI.
fn with_qemu<R>(base: &Path, args: &[&str], job: impl FnOnce(&str) -> R) -> R {
    let image = base.join("qemu.img");
    let _ = std::fs::remove_file(&image);
    OpenOptions::new().write(true).create(true).truncate(true).open(&image).unwrap().set_len(GIB).unwrap();
    let socket = base.join("qemu.sock");
    let server = start_server(
        Command::new("qemu-nbd")
            .args(["--socket", socket.to_str().unwrap(), "--format=raw", "--shared=8", "--persistent", "--export-name=bench"])
            .args(args)
            .arg(image.to_str().unwrap()),
        &socket,
    );
    let result = job(&format!("nbd+unix:///bench?socket={}", socket.display()));
    drop(server);
    result
}

/// A tmpfs mounted for the placement rows; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(&at).unwrap();
        let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str().unwrap()]).status();
        mounted.is_ok_and(|s| s.success()).then_some(Tmpfs(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Section 3 (see the module's description): per job, each of the two journal placements
/// against qemu-nbd and qemu-nbd --cache=none, and the two placements against each other.
fn placement_rows(base: &Path, runtime: u64) -> Vec<(String, String, String, String)> {
    // Both placements get the same journal (512 MiB), which the tmpfs must hold.
    let journal = ["--journal-size", "512M"];
    let Some(tmpfs) = Tmpfs::mount(base.join("tmpfs"), "640M") else {
        println!("placement rows skipped: mounting a tmpfs needs root");
        return Vec::new();
    };
    let placed_dir = tmpfs.0.join("journal");
    let placed = [&journal[..], &["--journal-dir", placed_dir.to_str().unwrap()]].concat();
    let fsync = ["--end_fsync=1"];
    let mut rows = Vec::new();
    for (label, rw, bs, depth) in [("1M seq write QD4", "write", "1m", 4), ("4K randwrite QD32", "randwrite", "4k", 32)] {
        let run = |uri: &str| fio_with(base, uri, rw, bs, depth, runtime, &fsync);
        let home = with_ours(base, &journal, |uri, _| run(uri));
        let _ = std::fs::remove_dir_all(&placed_dir);
        let other = with_ours(base, &placed, |uri, _| run(uri));
        let _ = std::fs::remove_dir_all(&placed_dir);
        let qemu = with_qemu(base, &[], run);
        let direct = with_qemu(base, &["--cache=none"], run);
        let unit = |r: &FioResult| if bs == "4k" { format!("{:.0} IOPS", r.iops) } else { format!("{:.0} MB/s", r.bandwidth / 1e6) };
        let ratio = |a: &FioResult, b: &FioResult| format!("{:.2}x", a.iops / b.iops);
        for (where_, ours) in [("journal in VDIR", &home), ("journal on tmpfs", &other)] {
            for (baseline, theirs) in [("qemu-nbd", &qemu), ("qemu-nbd --cache=none", &direct)] {
                rows.push((format!("NBD {label} {runtime}s end_fsync, {where_}"), unit(ours), format!("{} ({baseline})", unit(theirs)), ratio(ours, theirs)));
            }
        }
        rows.push((
            format!("NBD {label} {runtime}s end_fsync, journal on tmpfs"),
            unit(&other),
            format!("{} (journal in VDIR)", unit(&home)),
            ratio(&other, &home),
        ));
    }
    rows
}

/// Starts a server and waits until its socket accepts connections.
fn start_server(command: &mut Command, socket: &Path) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

/// Samples the volume's pending bytes (journaled, not yet applied) during a run.
struct PendingSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PendingSampler {
    fn start(dir: &Path) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let socket = dir.join("control.sock");
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(status) = ublk_mirror::control::request(&socket, "status") {
                    peak = peak.max(status["volume"]["pending_bytes"].as_u64().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        });
        PendingSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}
