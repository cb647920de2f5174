//! Rows 1-4: backlog drains (a backlog written while the applier is down, then timed until
//! received and applied), the sender's and the applier's CPU against the raw QUIC stream's,
//! the bounds beside them, and the WAN drain through the relay.

use std::path::Path;
use std::time::{Duration, Instant};

use super::raw::{applier_writes_cpu, raw_quic, raw_quic_via};
use super::{add, control_status, fio, free_port, mirrored_volume_to, pinning, relay, serve_synchronised, spawn_applier, status, MirrorCpu};

/// How often the drain asks the volume for its mirror's checkpoints (the timing's resolution).
const STATUS_POLL: Duration = Duration::from_millis(20);

/// The rows of one backlog drain: rates until received and until applied, the mirror's CPU.
pub(crate) fn drain_rows(label: &str, bs: &str, drain: &Drain, rows: &mut Vec<(String, String)>) {
    let rate = |secs: f64| format!("{:.0} MB/s, {:.0} records/s ({secs:.1} s)", drain.bytes as f64 / secs / 1e6, drain.records as f64 / secs);
    add(rows, (format!("backlog drain, {label}, {} MiB, received", drain.bytes >> 20), rate(drain.received_seconds)));
    add(rows, ("  ... and applied".into(), rate(drain.applied_seconds)));
    let cpu = if bs == "1m" { drain.cpu.per(drain.bytes >> 20, "MiB") } else { drain.cpu.per(drain.records, "record") };
    add(rows, ("  mirror CPU".into(), cpu));
}

/// The raw QUIC stream, the own-disk 1 MiB drain against it, and what this machine allows at
/// best: the raw stream's CPU plus the applier's two writes on `own_disk`.
pub(crate) fn raw_quic_rows(base: &Path, own_disk: &Path, own_disk_drain: Option<&Drain>, rows: &mut Vec<(String, String)>) {
    let quic = raw_quic(base, 1 << 30, 4 << 20, pinning(), None);
    add(rows, ("raw QUIC stream, 1 GiB, two processes".into(), quic.describe()));
    // The two file writes as measured before the drain and right after it: this VM's cost of
    // new pages (the replica image's) drifts, 1-4 ms per MiB within an hour, even within a
    // minute; the bound takes the cheaper of the two. Measured here without such a drain.
    let measured = own_disk_drain.and_then(|drain| drain.writes_cpu);
    let writes = measured.map_or_else(|| applier_writes_cpu(own_disk), |(before, after)| before.min(after));
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
    let described = match measured {
        Some((before, after)) => format!("before the drain {:.1}, right after it {:.1} us CPU per MiB", before * 1e6, after * 1e6),
        None => format!("{:.1} us CPU per MiB", writes * 1e6),
    };
    add(rows, ("  applier's two file writes (own disk)".into(), described));
    add(rows, ("  drain bound from CPU time, vs raw QUIC".into(), format!("{shared:.2}x sharing two CPUs, {own_cpus:.2}x with a CPU per end")));
}

/// The drains of the two-hosts mode: 4 KiB and 1 MiB backlogs with the applier's own disk,
/// the sender's cost per record and the raw QUIC stream beside them.
pub(crate) fn two_host_drain_rows(base: &Path, own_disk: &Path, rows: &mut Vec<(String, String)>) {
    let drain = backlog_drain(base, own_disk, "4k", 256 << 20, None);
    drain_rows("4K writes, applier's own disk", "4k", &drain, rows);
    sender_cost_row(base, &drain, rows);
    let drain = backlog_drain(base, own_disk, "1m", 1 << 30, None);
    drain_rows("1M writes, applier's own disk", "1m", &drain, rows);
    raw_quic_rows(base, own_disk, Some(&drain), rows);
}

/// The sender's CPU per 4 KiB record (the 4K backlog drain) against a raw QUIC stream's
/// sending cost per 4 KiB write (256 MiB in 4 KiB `write_all`s, same settings).
pub(crate) fn sender_cost_row(base: &Path, drain: &Drain, rows: &mut Vec<(String, String)>) {
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
pub(crate) fn wan_drain(base: &Path) -> (String, String) {
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
pub(crate) fn wan_raw_quic(base: &Path) -> (String, String) {
    let link_mbps: u64 = std::env::var("BENCH_LINK_MBPS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let link = relay::Impairment::wan(Duration::from_millis(50), 0.0, Some(link_mbps * 1_000_000));
    let quic = raw_quic_via(base, 1 << 30, 4 << 20, false, None, Some(link));
    (
        "  raw QUIC stream, 1 GiB, same relay".to_string(),
        format!("{:.1} MB/s ({:.2}x the link): the transport's bound for the row above", quic.rate, quic.rate / link_mbps as f64),
    )
}

/// What a backlog drain measured: payload bytes and records of the backlog, seconds from
/// the sender's connection until the applier had received (durably journaled) and applied
/// (durable in the image) all of it.
pub(crate) struct Drain {
    bytes: u64,
    records: u64,
    received_seconds: f64,
    applied_seconds: f64,
    /// CPU time the drain took: the sender thread, and the whole applier process.
    cpu: MirrorCpu,
    /// For a 1 MiB drain on the applier's own disk: CPU seconds per MiB of the applier's two
    /// file writes there ([`applier_writes_cpu`]), measured before the backlog was written
    /// and right after the drain.
    writes_cpu: Option<(f64, f64)>,
}

/// Writes `total` bytes while the applier is down, then times the drain; through a relay
/// with `link` impairments when given.
pub(crate) fn backlog_drain(base: &Path, applier_base: &Path, bs: &str, total: u64, link: Option<relay::Impairment>) -> Drain {
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
    // Only for the drain the applier's bound is about: 1 MiB records on the applier's own disk.
    let bounded = bs == "1m" && relay.is_none() && applier_base != base;
    let writes_cpu_before = bounded.then(|| applier_writes_cpu(applier_base));
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
    let profile = DrainProfile::start(&name, &[("applier", applier.0.id()), ("volume", volume.0.id())]);
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
    let writes_cpu = writes_cpu_before.map(|before| (before, applier_writes_cpu(applier_base)));
    if let Some(relay) = &relay {
        eprintln!("relay: {:?}", relay.stats);
    }
    let records = last - start_applied;
    let record_bytes = if bs == "1m" { 1 << 20 } else { 4096 };
    Drain { bytes: records * record_bytes, records, received_seconds: received_seconds.unwrap_or(applied_seconds), applied_seconds, cpu, writes_cpu }
}

/// With BENCH_PERF=DIR, CPU profiles of the applier and of the volume (whose sender the
/// drain is about) during a drain (`perf record -e cpu-clock -g -p PID`), written to
/// DIR/<name>-applier.data and DIR/<name>-volume.data; stopped with SIGINT when dropped.
/// Nothing otherwise.
struct DrainProfile(Vec<std::process::Child>);

impl DrainProfile {
    fn start(name: &str, processes: &[(&str, u32)]) -> DrainProfile {
        let Ok(dir) = std::env::var("BENCH_PERF") else { return DrainProfile(Vec::new()) };
        let _ = std::fs::create_dir_all(&dir);
        let children = processes
            .iter()
            .map(|(what, pid)| {
                let output = Path::new(&dir).join(format!("{name}-{what}.data"));
                eprintln!("  profiling the {what} into {}", output.display());
                // BENCH_PERF_GRAPH=dwarf: user-space call chains too (the release build has no
                // frame pointers), at a far larger profile.
                let graph = std::env::var("BENCH_PERF_GRAPH").unwrap_or_else(|_| "fp".into());
                std::process::Command::new("perf")
                    .args(["record", "-q", "-e", "cpu-clock", "--call-graph", &graph, "-p", &pid.to_string(), "-o"])
                    .arg(&output)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("perf (apt-get install -y linux-perf)")
            })
            .collect();
        DrainProfile(children)
    }
}

impl Drop for DrainProfile {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}
