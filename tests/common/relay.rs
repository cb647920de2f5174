//! A UDP relay that impairs the path between a QUIC sender and an applier: one-way delay,
//! jitter, loss, reordering, duplication, a rate cap with a bounded bottleneck queue, and a
//! switch that black-holes everything (a partition). Seeded, so a failing run can be
//! repeated; every thread wakes at least every 10 ms and stops when the relay is dropped.
//!
//! The sender talks to `relay.address()`; the relay forwards to `upstream` from one socket of
//! its own, so the applier sees one peer. A new sender socket (after a reconnect) is followed.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// What happens to packets in one direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Added to every packet.
    pub delay: Duration,
    /// Up to this much more, uniformly (reorders packets closer together than it).
    pub jitter: Duration,
    /// Probability a packet is dropped.
    pub loss: f64,
    /// Probability a packet is delivered twice.
    pub duplicate: f64,
    /// Probability a packet is held back by `reorder_delay` (overtaken by later ones).
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Bottleneck rate in bytes per second (None: unlimited).
    pub rate: Option<u64>,
    /// Most queueing delay the bottleneck buffers before it drops (tail drop).
    pub queue: Duration,
    /// Largest UDP payload the path carries; larger datagrams are dropped, as a router
    /// drops packets over its MTU (None: no limit, like loopback).
    pub mtu: Option<usize>,
}

impl Impairment {
    pub fn clean() -> Impairment {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            rate: None,
            queue: Duration::from_millis(100),
            mtu: None,
        }
    }

    /// A WAN-like path: `rtt` split evenly between the directions, Ethernet's MTU (1500 bytes
    /// less the IPv4 and UDP headers), so path MTU discovery finds no jumbo frames.
    pub fn wan(rtt: Duration, loss: f64, rate: Option<u64>) -> Impairment {
        Impairment { delay: rtt / 2, loss, rate, mtu: Some(1500 - 28), ..Impairment::clean() }
    }
}

/// Packet counts of both directions together.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// Dropped because the bottleneck queue was full.
    pub overflowed: AtomicU64,
    /// Dropped by a partition.
    pub blackholed: AtomicU64,
    /// Dropped for exceeding the path's MTU.
    pub too_big: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct Relay {
    address: SocketAddr,
    partitioned: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<RelayStats>,
}

struct Shared {
    partitioned: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    /// The sender's current address (learned from its packets).
    client: Mutex<Option<SocketAddr>>,
}

impl Relay {
    /// Relays to `upstream`; `forward` applies to sender→applier packets, `back` to the replies.
    pub fn start(upstream: SocketAddr, forward: Impairment, back: Impairment, seed: u64) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay front");
        let rear = UdpSocket::bind("127.0.0.1:0").expect("bind relay rear");
        let address = front.local_addr().unwrap();
        // Bursts must meet the impairments, not the kernel's default 208 KiB buffers.
        ublk_mirror::protocol::transport::enlarge_socket_buffers(&front, 16 << 20);
        ublk_mirror::protocol::transport::enlarge_socket_buffers(&rear, 16 << 20);
        let partitioned = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let shared = Arc::new(Shared { partitioned: partitioned.clone(), stop: stop.clone(), stats: stats.clone(), client: Mutex::new(None) });
        let (front2, rear2) = (front.try_clone().unwrap(), rear.try_clone().unwrap());
        let to_applier = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("relay-forward".into())
                .spawn(move || pump(&front, &rear2, Destination::Fixed(upstream), forward, seed, &shared))
                .unwrap()
        };
        let to_sender = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("relay-back".into())
                .spawn(move || pump(&rear, &front2, Destination::Client, back, seed.wrapping_add(0x9e37_79b9), &shared))
                .unwrap()
        };
        Relay { address, partitioned, stop, threads: vec![to_applier, to_sender], stats }
    }

    /// Where the sender should send.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Black-holes every packet, queued or new, in both directions while `on`.
    pub fn partition(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

enum Destination {
    Fixed(SocketAddr),
    Client,
}

/// Receives on `from`, impairs, and sends on `to`, until the relay stops.
fn pump(from: &UdpSocket, to: &UdpSocket, destination: Destination, impairment: Impairment, seed: u64, shared: &Shared) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut sequence = 0u64;
    // When the bottleneck finishes sending what it already accepted.
    let mut link_free_at = Instant::now();
    let mut buffer = vec![0u8; 65536];
    let stats = &shared.stats;
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = queue
            .peek()
            .map_or(Duration::from_millis(10), |Reverse((due, _, _))| due.saturating_duration_since(now))
            .clamp(Duration::from_micros(100), Duration::from_millis(10));
        from.set_read_timeout(Some(wait)).expect("set relay timeout");
        if let Ok((length, source)) = from.recv_from(&mut buffer) {
            if matches!(destination, Destination::Fixed(_)) {
                *shared.client.lock().unwrap() = Some(source);
            }
            let now = Instant::now();
            if shared.partitioned.load(Ordering::SeqCst) {
                stats.blackholed.fetch_add(1, Ordering::Relaxed);
            } else if impairment.mtu.is_some_and(|mtu| length > mtu) {
                stats.too_big.fetch_add(1, Ordering::Relaxed);
            } else if rng.gen_bool(impairment.loss) {
                stats.lost.fetch_add(1, Ordering::Relaxed);
            } else {
                let mut depart = now;
                let mut accepted = true;
                if let Some(rate) = impairment.rate {
                    let start = link_free_at.max(now);
                    if start.saturating_duration_since(now) > impairment.queue {
                        accepted = false;
                        stats.overflowed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        link_free_at = start + Duration::from_secs_f64(length as f64 / rate as f64);
                        depart = link_free_at;
                    }
                }
                if accepted {
                    let mut due = depart + impairment.delay;
                    if !impairment.jitter.is_zero() {
                        due += impairment.jitter.mul_f64(rng.gen::<f64>());
                    }
                    if rng.gen_bool(impairment.reorder) {
                        due += impairment.reorder_delay;
                        stats.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    let copies = if rng.gen_bool(impairment.duplicate) { 2 } else { 1 };
                    stats.duplicated.fetch_add(copies - 1, Ordering::Relaxed);
                    for copy in 0..copies {
                        sequence += 1;
                        queue.push(Reverse((due + Duration::from_micros(copy * 50), sequence, buffer[..length].to_vec())));
                    }
                }
            }
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Reverse((_, _, packet)) = queue.pop().expect("peeked");
            if shared.partitioned.load(Ordering::SeqCst) {
                stats.blackholed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let target = match destination {
                Destination::Fixed(address) => Some(address),
                Destination::Client => *shared.client.lock().unwrap(),
            };
            if let Some(target) = target {
                if to.send_to(&packet, target).is_ok() {
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    stats.bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}
