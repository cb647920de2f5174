//! Operations: a misbehaving network between sender and applier (the UDP relay in
//! tests/common/relay.rs), partitions, metrics against status, and the bandwidth limit.

mod common;
use common::relay::{Impairment, Relay};
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A volume in `tmp/vol` mirrored through a relay to an applier in `tmp/applier`.
struct Site {
    vdir: PathBuf,
    adir: PathBuf,
    applier: Applier,
    relay: Relay,
}

fn site(tmp: &Path, size: &str, forward: Impairment, back: Impairment, seed: u64, mirror_args: &[&str]) -> Site {
    let vdir = tmp.join("vol");
    let adir = tmp.join("applier");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", size, &["--journal-size", "512M", "--segment-size", "32M"]));
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success());
    let port = free_udp_port();
    let applier = Applier::start(&adir, port);
    let relay = Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), forward, back, seed);
    let to = relay.address().to_string();
    let mut args = vec!["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &to, "--fingerprint", &applier_fp];
    args.extend_from_slice(mirror_args);
    let output = cli(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    Site { vdir, adir, applier, relay }
}

/// Payload bytes and count of the journal's write records after `lsn`, from `journal dump`.
fn journal_after(vdir: &Path, lsn: u64) -> (u64, u64) {
    let from = (lsn + 1).to_string();
    let output = cli(&["journal", "dump", "--dir", vdir.to_str().unwrap(), "--json", "--from", &from]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut bytes = 0;
    let mut records = 0;
    for line in stdout(&output).lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        records += 1;
        if record["kind"] == "write" {
            bytes += record["length"].as_u64().unwrap();
        }
    }
    (bytes, records)
}

#[test]
fn wan_link_with_loss_runs_writes_at_local_speed_and_converges() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    // 80 ms RTT, 1% loss each way, 20 MB/s each way.
    let link_rate = 20_000_000u64;
    let wan = Impairment::wan(Duration::from_millis(80), 0.01, Some(link_rate));
    // Compression off: qemu-io's one-byte patterns shrink a hundredfold, so with `auto` the
    // link stops being the bottleneck and the applier, on this same machine, writes as fast as
    // the volume, sharing its CPUs and disk (writes took 2-8 s instead of 1.5-3.3 s): this test
    // is about a link slower than the writes.
    let site = site(tmp.path(), "256M", wan, wan, 80, &["--compression", "off"]);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let served = Served::start_with_args(&site.vdir, &["--metrics", &metrics.to_string()], &[]);
    wait_consistent(&site.vdir);

    // 112 MiB in 1 MiB writes plus 2048 scattered 4 KiB writes, then a flush: the link needs
    // over 6 s for it, the local disk a fraction of that.
    let mut commands = Vec::new();
    for i in 0..112u64 {
        commands.push(format!("write -P {} {} 1M", i % 250 + 1, (i * 37 % 250) * MIB));
    }
    for i in 0..2048u64 {
        commands.push(format!("write -P {} {} 4k", i % 200 + 7, (i * 7919 % 32000) * 4096));
    }
    commands.push("flush".into());
    let total_bytes = 112 * MIB + 2048 * 4096;
    let started = Instant::now();
    let output = qemu_io(&served.uri("vol0"), &commands);
    let load = started.elapsed();
    assert!(output.status.success(), "{}", stderr(&output));
    let link_time = Duration::from_secs_f64(total_bytes as f64 / link_rate as f64);
    eprintln!("write load: {total_bytes} bytes in {load:?}; the link needs at least {link_time:?}");
    assert!(load < link_time, "the writes waited for the link: {load:?} for {total_bytes} bytes, link time {link_time:?}");
    let at_end = status_json(&site.vdir);
    eprintln!("when the load's flush completed the replica lacked {} bytes", at_end["mirrors"][0]["lag_bytes"]);
    assert!(at_end["mirrors"][0]["lag_bytes"].as_u64().unwrap() > 0, "flushed writes were acknowledged before the replica had them (asynchronous): {at_end}");

    // Freeze the link: applied and received stop moving (so does trimming), and the lag the
    // status reports must be exactly what the journal holds after the replica's checkpoint.
    site.relay.partition(true);
    std::thread::sleep(Duration::from_millis(500));
    let status = status_json(&site.vdir);
    let mirror = &status["mirrors"][0];
    let applied = mirror["applied_lsn"].as_u64().unwrap();
    let last = status["volume"]["last_lsn"].as_u64().unwrap();
    let (bytes, records) = journal_after(&site.vdir, applied);
    assert!(last > applied, "the replica was behind when the link froze: {status}");
    assert_eq!(mirror["lag_records"].as_u64().unwrap(), last - applied, "{status}");
    assert_eq!(mirror["lag_records"].as_u64().unwrap(), records, "lag_records against the journal: {status}");
    assert_eq!(mirror["lag_bytes"].as_u64().unwrap(), bytes, "lag_bytes against the journal: {status}");
    assert!(mirror["lag_seconds"].as_f64().unwrap() > 0.0, "{status}");

    // The metrics page parses and agrees with status --json (nothing moves while frozen).
    let page = scrape(metrics);
    let again = status_json(&site.vdir);
    assert_eq!(again["mirrors"][0]["applied_lsn"].as_u64(), Some(applied), "the link was frozen");
    let labels = [("volume", "vol0"), ("mirror", "mirror")];
    assert_eq!(metric(&page, "ublk_mirror_volume_last_lsn", &[("volume", "vol0")]), last as f64);
    assert_eq!(metric(&page, "ublk_mirror_mirror_applied_lsn", &labels), applied as f64);
    assert_eq!(metric(&page, "ublk_mirror_mirror_received_lsn", &labels), mirror["received_lsn"].as_u64().unwrap() as f64);
    assert_eq!(metric(&page, "ublk_mirror_mirror_lag_records", &labels), (last - applied) as f64);
    assert_eq!(metric(&page, "ublk_mirror_mirror_lag_bytes", &labels), bytes as f64);
    assert_eq!(metric(&page, "ublk_mirror_mirror_state", &[("mirror", "mirror"), ("state", mirror["state"].as_str().unwrap())]), 1.0);
    assert_eq!(metric(&page, "ublk_mirror_volume_mode", &[("volume", "vol0"), ("mode", "journaling")]), 1.0);
    assert_eq!(metric(&page, "ublk_mirror_volume_writes_total", &[("volume", "vol0")]), again["volume"]["writes"].as_u64().unwrap() as f64);
    assert_eq!(metric(&page, "ublk_mirror_journal_capacity_bytes", &[("volume", "vol0")]), again["journal"]["capacity_bytes"].as_u64().unwrap() as f64);
    // The sender is far behind the load (the link needs seconds more): the newest records,
    // which it has not read, are kept in memory for it.
    let kept = again["journal"]["memory_bytes"].as_u64().unwrap();
    assert!(kept > 0, "nothing kept in memory for a sender that has not read the newest records: {again}");
    assert_eq!(metric(&page, "ublk_mirror_journal_memory_bytes", &[("volume", "vol0")]), kept as f64);
    let write_count = page.samples.iter().find(|s| s.metric == "ublk_mirror_request_latency_seconds" && s.labels.get("op") == Some("write"));
    match write_count.map(|s| &s.value) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            let total = buckets.last().map(|b| b.count).unwrap_or(0.0);
            assert_eq!(total, again["volume"]["writes"].as_u64().unwrap() as f64, "every write is in the latency histogram");
        }
        other => panic!("write latency is not a histogram: {other:?}"),
    }

    site.relay.partition(false);
    let status = wait_caught_up(&site.vdir);
    eprintln!("relay: {:?}", site.relay.stats);
    assert!(site.relay.stats.lost.load(std::sync::atomic::Ordering::Relaxed) > 0, "the relay dropped packets");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    let replica = replica_image(&site.adir, "vol0");
    assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica.to_str().unwrap()), "replica differs after convergence: {status}");
    let applier_status = applier_status(&site.adir);
    assert_eq!(applier_status["replicas"][0]["applied_lsn"], status["volume"]["last_lsn"]);
    drop(site.applier);
}

/// Writes 64 KiB blocks numbered by a counter (flushing every 8) until told to stop or
/// 20000 writes; returns how many it wrote.
fn background_writer(socket: PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut client = nbd_client::NbdClient::connect(&socket, "vol0").expect("connect");
        let mut written = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && written < 20_000 {
            let mut block = vec![0u8; 64 << 10];
            for (index, chunk) in block.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&(written << 16 | index as u64).to_le_bytes());
            }
            assert_eq!(client.write((written % 1000) * (64 << 10), &block), 0);
            written += 1;
            // About 3 MB/s: a steady trickle, so a partition leaves a backlog of seconds.
            std::thread::sleep(Duration::from_millis(20));
            if written.is_multiple_of(8) {
                assert_eq!(client.flush(), 0);
            }
        }
        assert_eq!(client.flush(), 0);
        client.disconnect();
        written
    })
}

fn mirror_field(vdir: &Path, key: &str) -> serde_json::Value {
    status_json(vdir)["mirrors"][0][key].clone()
}

#[test]
fn partitions_lose_nothing_and_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    // A jittery path that also reorders and duplicates packets (QUIC must cope with all of it).
    let path = Impairment {
        jitter: Duration::from_millis(4),
        reorder: 0.02,
        reorder_delay: Duration::from_millis(15),
        duplicate: 0.01,
        ..Impairment::wan(Duration::from_millis(10), 0.0, None)
    };
    // Idle timeout 4 s: a 1 s partition is ridden out by QUIC, 10 s and 6 s ones end the
    // connection and the sender reconnects.
    let site = site(tmp.path(), "64M", path, path, 7, &["--idle-timeout", "4"]);
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = background_writer(served.socket.clone(), stop.clone());

    let mut reconnects_before = mirror_field(&site.vdir, "reconnects").as_u64().unwrap();
    for (seconds, beyond_idle) in [(1u64, false), (1, false), (10, true), (6, true)] {
        std::thread::sleep(Duration::from_secs(2));
        site.relay.partition(true);
        let started = Instant::now();
        let mut seen_disconnected = false;
        while started.elapsed() < Duration::from_secs(seconds) {
            let status = status_json(&site.vdir);
            if status["mirrors"][0]["state"] == "disconnected" {
                assert_eq!(status["mirrors"][0]["connected"], false);
                seen_disconnected = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        site.relay.partition(false);
        let reconnects = mirror_field(&site.vdir, "reconnects").as_u64().unwrap();
        eprintln!("partition of {seconds} s: disconnected seen {seen_disconnected}, reconnects {reconnects_before} -> {reconnects}");
        if beyond_idle {
            assert!(seen_disconnected, "a {seconds} s partition (idle timeout 4 s) is reported as disconnected");
            assert!(reconnects > reconnects_before, "the lost connection is counted");
        } else {
            assert_eq!(reconnects, reconnects_before, "QUIC rides out a {seconds} s partition without reconnecting");
        }
        reconnects_before = reconnects;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().expect("writer");
    assert!(written > 100, "the writer kept writing through the partitions ({written} writes)");
    let status = wait_caught_up(&site.vdir);
    let applier = applier_status(&site.adir);
    let replica = &applier["replicas"][0];
    eprintln!("writes {written}; status {status}; applier {applier}");
    // The applier saw the source come back (each long partition ends in a new connection; two
    // may merge when a reconnect attempt spans the applier's own idle expiry).
    assert!(replica["connections"].as_u64().unwrap() >= 2, "{applier}");
    let stats = &site.relay.stats;
    eprintln!("relay: {stats:?}");
    assert!(
        stats.duplicated.load(std::sync::atomic::Ordering::Relaxed) > 0 && stats.reordered.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the path duplicated and reordered packets"
    );
    // Records sent twice stay within what was unacknowledged at each reconnect: the 16 MiB
    // window holds at most 256 of these 64 KiB records with their headers.
    let duplicated = replica["records_duplicated"].as_u64().unwrap();
    assert!(duplicated <= 256 * status["mirrors"][0]["reconnects"].as_u64().unwrap(), "{applier}");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "replica differs");
    drop(site.applier);
}

#[test]
fn bandwidth_limit_holds_and_can_be_lifted_live() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let site = site(tmp.path(), "64M", Impairment::clean(), Impairment::clean(), 1, &["--max-rate", "1M"]);
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    let sent_before = mirror_field(&site.vdir, "sent_bytes").as_u64().unwrap();
    let commands: Vec<String> = (0..12u64).map(|i| format!("write -P {} {} 1M", i + 1, i * MIB)).chain(["flush".to_string()]).collect();
    let output = qemu_io(&served.uri("vol0"), &commands);
    assert!(output.status.success(), "{}", stderr(&output));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let status = status_json(&site.vdir);
    let elapsed = started.elapsed().as_secs_f64();
    let sent = status["mirrors"][0]["sent_bytes"].as_u64().unwrap() - sent_before;
    // 1 MiB/s plus the 50 ms burst and one batch in flight when the clock started.
    let allowed = ((elapsed + 0.05) * MIB as f64) as u64 + 64 * 1024 + MIB;
    eprintln!("sent {sent} bytes in {elapsed:.2} s at --max-rate 1M (allowed {allowed})");
    assert!(sent <= allowed, "sent {sent} bytes in {elapsed:.2} s, above the 1 MiB/s limit: {status}");
    assert!(sent > 0, "the mirror still sends under a limit: {status}");
    assert_eq!(status["mirrors"][0]["max_rate"], 1 << 20);
    // Lifted on the running volume: the backlog drains.
    let output = cli(&["mirror", "set", "--dir", site.vdir.to_str().unwrap(), "--max-rate", "none"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("applied to the running volume"), "{}", stdout(&output));
    let status = wait_caught_up(&site.vdir);
    assert!(status["mirrors"][0]["max_rate"].is_null(), "{status}");
    let toml = std::fs::read_to_string(site.vdir.join("mirrors/mirror.toml")).unwrap();
    assert!(!toml.contains("max_rate ="), "{toml}");
    drop(served);
    drop(site.applier);
}

/// A WAN bottleneck (40 ms RTT, 20 MB/s, 100 ms of tail-drop buffer: 2.5 bandwidth-delay
/// products) carries a backlog without overflowing its queue: the sender's window is held to
/// two BDPs (`protocol/congestion.rs`). quinn's BBR alone grew its window to ten times the
/// BDP there and lost 10-14% of its packets to the queue. The mirror's `link` status shows
/// what the transport saw.
#[test]
fn a_wan_bottleneck_queue_is_not_overflowed() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let link = Impairment::wan(Duration::from_millis(40), 0.0, Some(20_000_000));
    // Compression off: the pattern writes would shrink to nothing on the wire.
    let site = site(tmp.path(), "160M", link, Impairment { rate: None, ..link }, 7, &["--compression", "off"]);
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    let forwarded_before = site.relay.stats.forwarded.load(std::sync::atomic::Ordering::Relaxed);
    let overflowed_before = site.relay.stats.overflowed.load(std::sync::atomic::Ordering::Relaxed);
    let commands: Vec<String> = (0..128u64).map(|i| format!("write -P {} {} 1M", i % 250 + 1, i * MIB)).chain(["flush".to_string()]).collect();
    let output = qemu_io(&served.uri("vol0"), &commands);
    assert!(output.status.success(), "{}", stderr(&output));
    let status = wait_caught_up(&site.vdir);
    let forwarded = site.relay.stats.forwarded.load(std::sync::atomic::Ordering::Relaxed) - forwarded_before;
    let overflowed = site.relay.stats.overflowed.load(std::sync::atomic::Ordering::Relaxed) - overflowed_before;
    eprintln!("relay: {:?}; link: {}", site.relay.stats, status["mirrors"][0]["link"]);
    assert!(forwarded > 128 * MIB / 1500, "the backlog crossed the relay: {forwarded} datagrams");
    assert!(overflowed * 100 <= forwarded, "{overflowed} of {forwarded} datagrams overflowed the bottleneck queue");
    let link = &status["mirrors"][0]["link"];
    // Refreshed every second: a little behind the relay's count.
    assert!(link["rtt_ms"].as_f64().is_some_and(|rtt| rtt >= 40.0), "{link}");
    assert!(link["sent_udp_bytes"].as_u64().is_some_and(|bytes| bytes >= 64 * MIB), "{link}");
    assert!(link["congestion_window_bytes"].as_u64().is_some_and(|cwnd| cwnd > 0), "{link}");
    assert!(link["lost_packets"].as_u64().is_some(), "{link}");
    drop(served);
    drop(site.applier);
    // Disconnected: no link.
    assert!(status_json(&site.vdir)["mirrors"][0]["link"].is_null());
}
