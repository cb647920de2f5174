//! Baselines beside the mirror's figures, measured in the same run: the raw QUIC stream
//! (one process sending, a child receiving, the mirror's TLS and transport settings), what the
//! applier's two file writes cost, a durable disk write and a plain TCP stream; and the CPU
//! accounting they share with the rows.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{command_on, pin_current_thread, relay, MirrorCpu};

/// The transport's ceiling: one QUIC stream with the sender's TLS and transport settings,
/// sender in this process, receiver in a child process (this same bench binary, started with
/// BENCH_QUIC_RECEIVER set), like the sender in `run` and the applier process. `pinned`: the
/// sending thread on CPU 0 and the receiver on CPU 1; `pace`: at most that many bytes/s.
pub(crate) fn raw_quic(base: &Path, total: u64, write_bytes: usize, pinned: bool, pace: Option<f64>) -> RawQuic {
    raw_quic_via(base, total, write_bytes, pinned, pace, None)
}

/// [`raw_quic`], `via` a relay with that impairment when given.
pub(crate) fn raw_quic_via(base: &Path, total: u64, write_bytes: usize, pinned: bool, pace: Option<f64>, via: Option<relay::Impairment>) -> RawQuic {
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
pub(crate) struct RawQuic {
    pub rate: f64,
    pub cpu_per_mib: MirrorCpu,
}

impl RawQuic {
    pub fn describe(&self) -> String {
        let (sender, receiver) = (self.cpu_per_mib.sender * 1e6, self.cpu_per_mib.applier * 1e6);
        format!("{:.0} MB/s; CPU per MiB: sender {sender:.1} us, receiver {receiver:.1} us", self.rate)
    }

    /// Upper bounds on a drain's rate against this stream, from CPU time alone: the mirror
    /// does at least what the raw stream does plus the applier's two file writes
    /// (`writes_per_mib`: its journal and its image; the sender's journal read and CRC checks
    /// are left out, so the bounds are generous). Returned: with both ends sharing this
    /// machine's two CPUs, and with a CPU for each end (as on two hosts).
    pub fn drain_bounds(&self, writes_per_mib: f64) -> (f64, f64) {
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
pub(crate) fn applier_writes_cpu(dir: &Path) -> f64 {
    two_writes_cpu(dir, 1024, false)
}

/// CPU seconds per MiB of two passes of 1 MiB writes over `mib` MiB of a new file under
/// `dir`, measured on this thread; after an untimed first pass when `warm` (both passes then
/// overwrite existing pages).
pub(crate) fn two_writes_cpu(dir: &Path, mib: u64, warm: bool) -> f64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join("write-cost");
    let file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let write_all = |pass: u32| {
        for i in 0..mib {
            file.write_all_at(&chunk, i << 20).unwrap_or_else(|e| panic!("{} pass {pass}: {e}", path.display()));
        }
    };
    if warm {
        write_all(0);
    }
    let started = thread_cpu_seconds();
    write_all(1);
    write_all(2);
    let per_mib = (thread_cpu_seconds() - started) / mib as f64;
    drop(file);
    let _ = std::fs::remove_file(&path);
    per_mib
}

/// User + system CPU seconds of the calling thread.
pub(crate) fn thread_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_THREAD)
}

/// User + system CPU seconds of every child process waited for so far.
pub(crate) fn children_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_CHILDREN)
}

pub(crate) fn rusage_seconds(who: libc::c_int) -> f64 {
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
pub(crate) fn quic_receiver(spec: &str) {
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
pub(crate) fn disk_write_rate(base: &Path) -> f64 {
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

pub(crate) fn raw_tcp(total: u64) -> f64 {
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
