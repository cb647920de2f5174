//! Journal overflow: a mirror that is away longer than the journal holds switches to
//! dirty-region tracking (writes never wait for it), and a resync brings it back without a
//! full copy and without the replica ever being torn. Real binaries, real QUIC, through the
//! seeded UDP relay (tests/common/relay.rs) for partitions and a rate cap.

mod common;
use common::nbd_client::*;
use common::relay::{Impairment, Relay};
use common::sweep::*;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A volume of `size` with a 32 MiB journal in `tmp/vol`, mirrored through a relay to an
/// applier in `tmp/applier`.
struct Site {
    vdir: PathBuf,
    adir: PathBuf,
    port: u16,
    applier: Option<Applier>,
    relay: Relay,
}

fn site(tmp: &Path, size: &str, forward: Impairment, seed: u64) -> Site {
    let vdir = tmp.join("vol");
    let adir = tmp.join("applier");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", size, &["--journal-size", "32M", "--segment-size", "2M", "--pending-window", "8M"]));
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success());
    let port = free_udp_port();
    let applier = Applier::start(&adir, port);
    let relay = Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), forward, Impairment::clean(), seed);
    let to = relay.address().to_string();
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &to, "--fingerprint", &applier_fp, "--idle-timeout", "3"]);
    assert!(output.status.success(), "{}", stderr(&output));
    Site { vdir, adir, port, applier: Some(applier), relay }
}

fn mirror_of(vdir: &Path) -> serde_json::Value {
    status_json(vdir)["mirrors"][0].clone()
}

/// Polls (bounded) until the mirror's state is `state`.
fn wait_state(vdir: &Path, state: &str, seconds: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let mirror = mirror_of(vdir);
        if mirror["state"] == state {
            return mirror;
        }
        assert!(Instant::now() < deadline, "the mirror never became {state}: {mirror}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_long_outage_never_blocks_writes_and_resyncs_to_an_equal_replica() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let site = site(tmp.path(), "64M", Impairment::clean(), 1);
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let served = Served::start_with_args(&site.vdir, &["--metrics", &metrics.to_string()], &[]);
    wait_consistent(&site.vdir);
    site.relay.partition(true);
    // A marker the replica will never see record by record: the overflow folds it away.
    let output = cli(&["marker", "create", "--dir", site.vdir.to_str().unwrap(), "--name", "during-outage"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // Six times the journal, 4 KiB writes with a FLUSH every 64, while the applier is away.
    let blocks = 16384u64; // the first 64 MiB: every block of the device
    let flushed = Arc::new(AtomicU64::new(0));
    let writer = sweep(served.socket.clone(), blocks, 6 * 8192, Arc::new(AtomicBool::new(false)), flushed.clone());
    let (written, worst) = writer.join().unwrap();
    assert_eq!(written, 6 * 8192, "every write completed");
    eprintln!("largest single write latency across the switch to tracking: {worst:?}");
    assert!(worst < Duration::from_secs(1), "a write waited {worst:?} for the mirror");
    let status = status_json(&site.vdir);
    assert_eq!(status["volume"]["mode"], "journaling", "{status}");
    let mirror = &status["mirrors"][0];
    assert_eq!(mirror["state"], "tracking", "{status}");
    assert!(mirror["dirty_bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(status["journal"]["first_lsn"].as_u64().unwrap() > 1, "the journal was trimmed past the mirror");
    // The text table and the metrics say so too.
    let text = stdout(&cli(&["status", "--dir", site.vdir.to_str().unwrap()]));
    assert!(text.contains("tracking") && text.contains("dirty"), "{text}");
    let page = scrape(metrics);
    let labels = [("volume", "vol0"), ("mirror", "mirror")];
    assert_eq!(metric(&page, "ublk_mirror_mirror_state", &[("mirror", "mirror"), ("state", "tracking")]), 1.0);
    assert!(metric(&page, "ublk_mirror_mirror_dirty_bytes", &labels) > 0.0);

    site.relay.partition(false);
    let mut saw_resync = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = status_json(&site.vdir);
        let mirror = &status["mirrors"][0];
        if mirror["state"] == "resyncing" {
            saw_resync = true;
            // The replica stays usable at its old state while the resync is staged.
            let replica = &applier_status(&site.adir)["replicas"][0];
            assert_eq!(replica["consistent"], true, "{replica}");
        }
        if mirror["state"] == "replicating" && mirror["applied_lsn"] == status["volume"]["last_lsn"] {
            assert!(mirror["resync_total_bytes"].as_u64().unwrap() > 0, "{mirror}");
            assert!(mirror["resync_total_bytes"].as_u64().unwrap() <= 64 << 20, "{mirror}");
            break;
        }
        assert!(Instant::now() < deadline, "the mirror did not resync: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("resync seen in progress: {saw_resync}; {}", mirror_of(&site.vdir));
    let page = scrape(metrics);
    assert_eq!(metric(&page, "ublk_mirror_mirror_state", &[("mirror", "mirror"), ("state", "replicating")]), 1.0);
    assert_eq!(metric(&page, "ublk_mirror_mirror_dirty_bytes", &labels), 0.0);
    assert!(metric(&page, "ublk_mirror_mirror_resync_total_bytes", &labels) > 0.0);
    let replica = applier_status(&site.adir)["replicas"][0].clone();
    assert_eq!(replica["consistent_lsn"], replica["applied_lsn"], "{replica}");
    // The marker from the outage is reported lost for the mirror (no snapshot of it exists);
    // one taken now is applied with a snapshot.
    let output = cli(&["marker", "create", "--dir", site.vdir.to_str().unwrap(), "--name", "after-resync"]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_caught_up(&site.vdir);
    let output = cli(&["marker", "list", "--dir", site.vdir.to_str().unwrap(), "--all", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let state_of = |name: &str| list["markers"].as_array().unwrap().iter().find(|m| m["name"] == name).map(|m| m["mirrors"][0]["state"].clone());
    assert_eq!(state_of("during-outage"), Some(serde_json::json!("lost")), "{list}");
    assert_eq!(state_of("after-resync"), Some(serde_json::json!("applied")), "{list}");
    let snapshots: Vec<String> = ublk_mirror::applier::snapshot::list_on_disk(&ublk_mirror::layout::ReplicaDir::new(replica_dir(&site.adir, "vol0")))
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(snapshots, ["after-resync"], "only the marker the replica applied has a snapshot");
    assert_eq!(mirror_of(&site.vdir)["last_marker_applied"], "after-resync");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "replica differs after the resync");
    // The map went with the resync.
    assert!(!site.vdir.join("mirrors/mirror.dirty").exists());
}

#[test]
fn a_resync_converges_while_writes_go_on_below_the_link_rate() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    // A 20 MB/s link; the writer keeps going at about 4 MB/s during the whole resync.
    let link = Impairment { rate: Some(20_000_000), queue: Duration::from_millis(200), ..Impairment::clean() };
    let site = site(tmp.path(), "96M", link, 2);
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    site.relay.partition(true);
    let blocks = 24576u64; // the whole 96 MiB device
    let outage = sweep(served.socket.clone(), blocks, blocks * 2, Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    assert_eq!(outage.join().unwrap().0, blocks * 2);
    let dirty = wait_state(&site.vdir, "tracking", 30)["dirty_bytes"].as_u64().unwrap();
    assert!(dirty > 64 << 20, "most of the device is dirty: {dirty}");
    site.relay.partition(false);
    // Writes go on during the resync: 64 KiB every 16 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let (socket, stop) = (served.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut client = NbdClient::connect(&socket, "vol0").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 20_000 {
                assert_eq!(client.write((i * 7919 % 1536) * 65536, &vec![(i % 200 + 1) as u8; 65536]), 0);
                i += 1;
                std::thread::sleep(Duration::from_millis(16));
            }
            assert_eq!(client.flush(), 0);
            i
        })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let mirror = mirror_of(&site.vdir);
        if mirror["state"] == "replicating" {
            break;
        }
        assert!(Instant::now() < deadline, "the resync did not finish under sustained writes: {mirror}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let writes = trickle.join().unwrap();
    eprintln!(
        "resync of {dirty} dirty bytes finished in {elapsed:?} while {writes} writes of 64 KiB went on; minimum at 20 MB/s less 4 MB/s: {:.1} s",
        dirty as f64 / 16e6
    );
    wait_caught_up(&site.vdir);
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "replica differs");
}

#[test]
fn the_replica_is_a_prefix_state_when_the_applier_dies_tracking_or_resyncing() {
    use rand::{Rng, SeedableRng};
    for seed in 0..3u64 {
        let tmp = tempfile::tempdir().unwrap();
        let mut site = site(tmp.path(), "32M", Impairment { rate: Some(15_000_000), ..Impairment::clean() }, 10 + seed);
        let served = Served::start(&site.vdir, &[]);
        wait_consistent(&site.vdir);
        let blocks = 8192u64;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = sweep(served.socket.clone(), blocks, 40 * blocks, stop.clone(), Arc::new(AtomicU64::new(0)));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..800)));
        site.relay.partition(true);
        wait_state(&site.vdir, "tracking", 60);
        // Killed while tracking: the replica is its last consistent state.
        if seed == 0 {
            site.applier.take().unwrap().kill9();
            let image = recovered_replica(&site.adir);
            let state = sweep_state(&image, blocks).unwrap_or_else(|e| panic!("seed {seed}: killed while tracking, the replica is torn: {e}"));
            eprintln!("seed {seed}: killed while tracking; the replica holds the first {state} writes");
            site.applier = Some(Applier::start(&site.adir, site.port));
        }
        site.relay.partition(false);
        wait_state(&site.vdir, "resyncing", 60);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        site.applier.take().unwrap().kill9();
        let image = recovered_replica(&site.adir);
        let state = sweep_state(&image, blocks).unwrap_or_else(|e| panic!("seed {seed}: killed during the resync, the replica is torn: {e}"));
        eprintln!("seed {seed}: killed during the resync; the replica holds the first {state} writes");
        // Back: the resync starts again and converges.
        site.applier = Some(Applier::start(&site.adir, site.port));
        stop.store(true, Ordering::SeqCst);
        let (written, _) = writer.join().unwrap();
        assert!(state <= written, "the replica is ahead of the source");
        wait_caught_up(&site.vdir);
        let mut served = served;
        assert_eq!(served.terminate(), Some(0));
        let source = std::fs::read(site.vdir.join("data.img")).unwrap();
        assert_eq!(sweep_state(&source, blocks), Ok(written), "the source holds every write");
        assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "seed {seed}: replica differs");
    }
}

#[test]
fn the_source_crashing_while_tracking_or_resyncing_loses_no_region() {
    require_tool("qemu-img", "qemu-utils");
    for (label, failpoint) in
        [("kill -9 while tracking", None), ("power cut while tracking", Some("journal-power-cut-before-commit")), ("kill -9 during the resync", None)]
    {
        let tmp = tempfile::tempdir().unwrap();
        let site = site(tmp.path(), "32M", Impairment { rate: Some(10_000_000), ..Impairment::clean() }, 20);
        let trigger = tmp.path().join("cut-now");
        let env: Vec<(&str, String)> = failpoint.map(|name| ("UBLK_MIRROR_FAILPOINTS", format!("{name}={}", trigger.display()))).into_iter().collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut served = Served::start(&site.vdir, &env);
        wait_consistent(&site.vdir);
        site.relay.partition(true);
        let blocks = 8192u64;
        let flushed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = sweep(served.socket.clone(), blocks, 12 * blocks, stop.clone(), flushed.clone());
        wait_state(&site.vdir, "tracking", 60);
        if label.contains("resync") {
            site.relay.partition(false);
            wait_state(&site.vdir, "resyncing", 60);
        }
        std::thread::sleep(Duration::from_millis(300));
        if failpoint.is_some() {
            std::fs::write(&trigger, b"").unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while served.child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "the power-cut failpoint did not fire");
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            served.kill9();
        }
        stop.store(true, Ordering::SeqCst);
        let _ = writer.join();
        let durable = flushed.load(Ordering::SeqCst);
        site.relay.partition(false);
        let served = Served::start(&site.vdir, &[]);
        // Nothing flushed is lost locally.
        let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
        let mut image = vec![0u8; blocks as usize * BLOCK];
        for (index, chunk) in image.chunks_mut(256 << 10).enumerate() {
            chunk.copy_from_slice(&client.read(index as u64 * (256 << 10), 256 << 10));
        }
        client.disconnect();
        let state = sweep_state(&image, blocks).unwrap_or_else(|e| panic!("{label}: the source is torn: {e}"));
        assert!(state >= durable, "{label}: the source lost flushed writes ({state} < {durable})");
        // No region is lost from the dirty map: the replica converges byte-equal.
        wait_caught_up(&site.vdir);
        let mut served = served;
        assert_eq!(served.terminate(), Some(0));
        assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "{label}: replica differs");
        eprintln!("{label}: source at {state} writes ({durable} flushed); replica equal");
    }
}

#[test]
fn a_damaged_dirty_map_is_reported_and_falls_back_to_a_whole_device_resync() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let site = site(tmp.path(), "32M", Impairment::clean(), 30);
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    site.relay.partition(true);
    let blocks = 8192u64;
    let writer = sweep(served.socket.clone(), blocks, 12 * blocks, Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    writer.join().unwrap();
    wait_state(&site.vdir, "tracking", 30);
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    let map = site.vdir.join("mirrors/mirror.dirty");
    let bytes = std::fs::read(&map).expect("a tracking mirror's map is on disk");
    std::fs::write(&map, &bytes[..bytes.len() / 2]).unwrap();
    // Offline status names the file.
    let offline = mirror_of(&site.vdir);
    assert!(offline["last_error"].as_str().unwrap_or_default().contains("mirror.dirty"), "{offline}");
    assert_eq!(offline["state"], "tracking", "{offline}");
    let served = Served::start(&site.vdir, &[]);
    assert!(served.log_text().contains("mirror.dirty"), "the log names the damaged file: {}", served.log_text());
    site.relay.partition(false);
    let status = wait_caught_up(&site.vdir);
    let mirror = &status["mirrors"][0];
    assert_eq!(mirror["resync_total_bytes"].as_u64().unwrap(), 32 << 20, "the whole device was compared: {mirror}");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "replica differs");
}

#[test]
fn on_full_can_be_changed_on_a_running_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let site = site(tmp.path(), "32M", Impairment::clean(), 40);
    let volume_toml = std::fs::read_to_string(site.vdir.join("volume.toml")).unwrap();
    assert!(volume_toml.contains("on_full = \"track\""), "{volume_toml}");
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    let output = cli(&["volume", "set", "--dir", site.vdir.to_str().unwrap(), "--on-full", "block"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("applied to the running volume"), "{}", stdout(&output));
    assert!(std::fs::read_to_string(site.vdir.join("volume.toml")).unwrap().contains("on_full = \"block\""));
    site.relay.partition(true);
    // Under block, a long outage makes writes wait: the journal fills and says so.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = sweep(served.socket.clone(), 8192, 12 * 8192, stop.clone(), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_json(&site.vdir)["volume"]["mode"] != "full" {
        assert!(Instant::now() < deadline, "the journal never filled under block: {}", status_json(&site.vdir));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!writer.is_finished(), "writes wait under block");
    assert_ne!(mirror_of(&site.vdir)["state"], "tracking");
    // Switched to track, the waiting writes go on at once.
    let output = cli(&["volume", "set", "--dir", site.vdir.to_str().unwrap(), "--on-full", "track"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (written, _) = writer.join().unwrap();
    assert_eq!(written, 12 * 8192);
    assert_eq!(wait_state(&site.vdir, "tracking", 10)["state"], "tracking");
    let bad = cli(&["volume", "set", "--dir", site.vdir.to_str().unwrap(), "--on-full", "sometimes"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    drop(stop);
    drop(served);
}

/// The journal lets go of a mirror that is connected and streaming (writes at loopback speed
/// fill it while a 2 MB/s link drains it): the session ends, the sender closes its connection
/// and reconnects at once to resync from its dirty map, and the applier takes the new
/// connection. (It used to keep refusing it as "already connected": the old session's
/// acknowledgement reader kept the old connection alive, and the mirror stayed tracking until
/// the volume restarted.)
#[test]
fn a_mirror_the_journal_lets_go_of_while_connected_reconnects_and_resyncs() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let link = Impairment { rate: Some(2_000_000), queue: Duration::from_millis(200), ..Impairment::clean() };
    let site = site(tmp.path(), "16M", link, 7);
    let served = Served::start(&site.vdir, &[]);
    wait_consistent(&site.vdir);
    // Three journals' worth of 4 KiB writes over the whole device, with the mirror connected.
    let blocks = 4096u64;
    let writer = sweep(served.socket.clone(), blocks, 3 * 8192, Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    assert_eq!(writer.join().unwrap().0, 3 * 8192, "every write completed");
    let written = Instant::now();
    // The journal let go of the mirror at least once (it resynced, or still tracks).
    let status = status_json(&site.vdir);
    assert!(status["journal"]["first_lsn"].as_u64().unwrap() > 1, "the journal was trimmed past the mirror: {status}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = status_json(&site.vdir);
        let mirror = &status["mirrors"][0];
        if mirror["state"] == "replicating" && mirror["applied_lsn"] == status["volume"]["last_lsn"] && mirror["connected"] == true {
            break;
        }
        let log = std::fs::read_to_string(tmp.path().join("applier.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "the mirror did not resync and catch up: {mirror}\napplier log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("caught up {:.1} s after the writes; {}", written.elapsed().as_secs_f64(), mirror_of(&site.vdir));
    let log = std::fs::read_to_string(tmp.path().join("applier.log")).unwrap_or_default();
    assert!(!log.contains("already connected"), "the applier refused a reconnect:\n{log}");
    let sender_log = served.log_text();
    assert!(sender_log.contains("fell out of the journal while connected"), "the journal never let go of the connected mirror:\n{sender_log}");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    assert!(compare(site.vdir.join("data.img").to_str().unwrap(), replica_image(&site.adir, "vol0").to_str().unwrap()), "replica differs");
}
