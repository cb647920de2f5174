//! Disk errors (EIO, ENOSPC) on the journal, the backing store, the applier's journal and
//! the replica image are never ignored: the request that hit one fails with its errno, the
//! volume enters `failed` (reason in status and metrics) and loses nothing acknowledged; a
//! restart after the fault is gone recovers. An applier whose disk fails stops acknowledging
//! while the source goes on, and resumes by itself once the disk works again.
//!
//! Faults come from failpoints in the I/O paths (`name=while:/file` fails every I/O while the
//! file exists), and one test fills a real (tmpfs) filesystem for a real ENOSPC.

mod common;
use common::nbd_client::*;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const EIO: u32 = 5;
const ENOSPC: u32 = 28;

fn block(tag: u8) -> Vec<u8> {
    vec![tag; BLOCK]
}

fn at(index: u64) -> u64 {
    index * BLOCK as u64
}

/// `UBLK_MIRROR_FAILPOINTS` making each named point fire while its file exists.
fn while_files(points: &[(&str, &Path)]) -> String {
    points.iter().map(|(name, file)| format!("{name}=while:{}", file.display())).collect::<Vec<_>>().join(",")
}

fn metrics_address() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap()
}

/// Polls (bounded) until `check` holds for the volume's status.
fn wait_status(vdir: &Path, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = status_json(vdir);
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_failed_with(vdir: &Path, metrics: std::net::SocketAddr, reason: &str) {
    let status = status_json(vdir);
    assert_eq!(status["volume"]["mode"], "failed", "{status}");
    let failure = status["volume"]["failure"].as_str().unwrap_or_default();
    assert!(failure.contains(reason), "the failure names the error: {status}");
    let text = stdout(&cli(&["status", "--dir", vdir.to_str().unwrap()]));
    assert!(text.contains("FAILED") && text.contains(reason), "{text}");
    let page = scrape(metrics);
    assert_eq!(metric(&page, "ublk_mirror_volume_mode", &[("volume", "vol0"), ("mode", "failed")]), 1.0);
    let info = page.samples.iter().find(|s| s.metric == "ublk_mirror_volume_failure_info").expect("a failure_info sample");
    assert!(info.labels.get("reason").is_some_and(|r| r.contains(reason)), "{:?}", info.labels);
}

#[test]
fn a_journal_error_fails_the_request_with_its_errno_and_a_restart_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    create_volume(&vdir, "vol0", "16M", &[]);
    let (full, broken, sync_broken) = (tmp.path().join("journal-full"), tmp.path().join("journal-broken"), tmp.path().join("sync-broken"));
    let faults = while_files(&[("journal-write-enospc", &full), ("journal-write-eio", &broken), ("journal-sync-eio", &sync_broken)]);
    let env = [("UBLK_MIRROR_FAILPOINTS", faults.as_str())];
    let metrics = metrics_address();
    let mut served = Served::start_with_args(&vdir, &["--metrics", &metrics.to_string()], &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.write(at(0), &block(1)), 0);
    assert_eq!(client.flush(), 0);

    // A full journal disk: the write that hit it gets ENOSPC; the volume stops taking writes
    // (EIO from now on, even once the disk has room again) but still serves reads.
    std::fs::write(&full, b"").unwrap();
    assert_eq!(client.write(at(1), &block(2)), ENOSPC, "the request that hit the full disk gets ENOSPC");
    std::fs::remove_file(&full).unwrap();
    assert_eq!(client.write(at(2), &block(3)), EIO, "later writes fail with EIO");
    assert_eq!(client.flush(), EIO, "a flush after the failure fails");
    assert_eq!(client.read(at(0), BLOCK as u32), block(1), "reads go on");
    assert_failed_with(&vdir, metrics, "No space left on device");
    drop(client);
    let code = served.terminate();
    assert_ne!(code, Some(0), "a failed volume does not stop cleanly: {}", served.log_text());
    assert!(served.log_text().contains("No space left on device"), "{}", served.log_text());

    // Restarted with the disk fine: everything flushed is there, writes work again.
    let mut served = Served::start_with_args(&vdir, &["--metrics", &metrics.to_string()], &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.read(at(0), BLOCK as u32), block(1), "the flushed write survived");
    assert_eq!(status_json(&vdir)["volume"]["mode"], "journaling");
    assert_eq!(client.write(at(3), &block(4)), 0);
    assert_eq!(client.flush(), 0);

    // A failing journal disk: EIO, then a crash on top of it (kill -9) and a restart.
    std::fs::write(&broken, b"").unwrap();
    assert_eq!(client.write(at(5), &block(6)), EIO);
    assert_failed_with(&vdir, metrics, "Input/output error");
    std::fs::remove_file(&broken).unwrap();
    served.kill9();
    let mut served = Served::start(&vdir, &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.read(at(0), BLOCK as u32), block(1));
    assert_eq!(client.read(at(3), BLOCK as u32), block(4));

    // A failing fdatasync: the FLUSH waiting for it fails with EIO; the write before it was
    // never reported durable, so it may or may not survive, and the earlier ones do.
    std::fs::write(&sync_broken, b"").unwrap();
    assert_eq!(client.write(at(6), &block(7)), 0, "written to the journal (page cache), so acknowledged");
    assert_eq!(client.flush(), EIO, "the flush whose fdatasync failed fails");
    wait_status(&vdir, "the volume fails", |s| s["volume"]["mode"] == "failed");
    std::fs::remove_file(&sync_broken).unwrap();
    served.kill9();
    let served = Served::start(&vdir, &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.read(at(0), BLOCK as u32), block(1));
    assert_eq!(client.read(at(3), BLOCK as u32), block(4));
    let unsure = client.read(at(6), BLOCK as u32);
    assert!(unsure == block(7) || unsure == block(0), "an unflushed write is either there or not, never torn");
    assert!(!served.log_text().contains("panicked"), "{}", served.log_text());
}

#[test]
fn a_backing_store_error_stops_the_volume_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    create_volume(&vdir, "vol0", "16M", &[]);
    let (write_broken, read_broken) = (tmp.path().join("backing-write-broken"), tmp.path().join("backing-read-broken"));
    let faults = while_files(&[("backing-write-enospc", &write_broken), ("backing-read-eio", &read_broken)]);
    let env = [("UBLK_MIRROR_FAILPOINTS", faults.as_str())];
    let metrics = metrics_address();
    let mut served = Served::start_with_args(&vdir, &["--metrics", &metrics.to_string()], &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.write(at(0), &block(1)), 0);
    assert_eq!(client.flush(), 0);
    // That first write is in the backing store before the fault (writeback runs behind).
    wait_status(&vdir, "the first write is applied", |s| s["volume"]["applied_lsn"].as_u64() >= Some(1));

    // Writeback into a full backing store fails after the writes were journaled and
    // acknowledged: they stay in the journal, and the volume takes no more writes.
    std::fs::write(&write_broken, b"").unwrap();
    // A FUA write: acknowledged only once durable in the journal. (A plain write and a
    // FLUSH after it would race the background sync: writeback may fail the volume before
    // the FLUSH arrives, and a failed volume fails every FLUSH, as documented.)
    let reply = client.call(CMD_WRITE, FLAG_FUA, at(1), BLOCK as u32, &block(2));
    assert_eq!(reply.error, 0, "journaled and durable, so acknowledged: {}", served.log_text());
    wait_status(&vdir, "writeback failure fails the volume", |s| s["volume"]["mode"] == "failed");
    assert_eq!(client.write(at(2), &block(3)), EIO);
    assert_eq!(client.read(at(1), BLOCK as u32), block(2), "the acknowledged write reads back (from the journal)");
    assert_failed_with(&vdir, metrics, "No space left on device");
    std::fs::remove_file(&write_broken).unwrap();
    drop(client);
    served.kill9();

    // The restart redoes the journal into the backing store.
    let mut served = Served::start(&vdir, &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.read(at(0), BLOCK as u32), block(1));
    assert_eq!(client.read(at(1), BLOCK as u32), block(2), "the acknowledged, flushed write survived the failure");
    assert_eq!(client.write(at(2), &block(3)), 0);
    assert_eq!(client.flush(), 0);
    drop(client);
    assert_eq!(served.terminate(), Some(0), "{}", served.log_text());
    assert_eq!(std::fs::read(vdir.join("data.img")).unwrap()[at(1) as usize..at(3) as usize], [block(2), block(3)].concat(), "applied at the clean stop");

    // A backing store that fails reads: the read gets EIO and the volume is failed.
    let mut served = Served::start(&vdir, &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    std::fs::write(&read_broken, b"").unwrap();
    let reply = client.call(CMD_READ, 0, at(8), BLOCK as u32, &[]);
    assert_eq!(reply.error, EIO, "the read that hit the failing disk gets EIO");
    let status = status_json(&vdir);
    assert_eq!(status["volume"]["mode"], "failed", "{status}");
    assert!(status["volume"]["failure"].as_str().unwrap().contains("read backing store"), "{status}");
    std::fs::remove_file(&read_broken).unwrap();
    served.kill9();
    let served = Served::start(&vdir, &env);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    assert_eq!(client.read(at(2), BLOCK as u32), block(3));
    assert!(!served.log_text().contains("panicked"), "{}", served.log_text());
}

#[test]
fn a_journal_that_cannot_grow_fails_writes_with_enospc_instead_of_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    // Small segments, so a few MiB of writes need new segment files.
    create_volume(&vdir, "vol0", "32M", &["--journal-size", "16M", "--segment-size", "1M"]);
    let full = tmp.path().join("segments-full");
    std::fs::write(&full, b"").unwrap();
    let faults = while_files(&[("journal-segment-enospc", &full)]);
    let served = Served::start(&vdir, &[("UBLK_MIRROR_FAILPOINTS", faults.as_str())]);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    let chunk = vec![9u8; 256 << 10];
    let started = Instant::now();
    let mut errors = Vec::new();
    for index in 0..32u64 {
        let error = client.write(index * chunk.len() as u64, &chunk);
        if error != 0 {
            errors.push(error);
            break;
        }
    }
    assert_eq!(errors.first(), Some(&ENOSPC), "a write needing a segment the disk cannot give gets ENOSPC");
    assert!(started.elapsed() < Duration::from_secs(30), "it did not wait for room");
    let status = status_json(&vdir);
    assert_eq!(status["volume"]["mode"], "failed", "{status}");
    assert!(status["volume"]["failure"].as_str().unwrap().contains("create a journal segment"), "{status}");
    let log = served.log_text();
    assert!(log.matches("preparing a spare journal segment failed").count() < 200, "the preparer retries without spinning");
}

/// A real full filesystem: the volume's directory on a small tmpfs that a filler file and
/// the writes fill up. The volume fails with ENOSPC; once the filler is deleted, a restart
/// recovers every flushed write.
#[test]
fn a_really_full_filesystem_fails_the_volume_and_a_restart_after_freeing_space_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(tmp.path(), "tmpfs", 40 << 20);
    let vdir = fs.mount.join("vol");
    create_volume(&vdir, "vol0", "64M", &["--journal-size", "8M", "--segment-size", "2M", "--pending-window", "4M"]);
    let filler = fs.mount.join("filler");
    std::fs::write(&filler, vec![0xeeu8; 20 << 20]).unwrap();
    let mut served = Served::start(&vdir, &[]);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    let chunk = 256usize << 10;
    let payload = |index: u64| -> Vec<u8> { (0..chunk).map(|i| (index as usize * 7 + i / 4096) as u8).collect() };
    let mut flushed_through = None;
    let mut first_error = None;
    for index in 0..(64u64 << 20) / chunk as u64 {
        let error = client.write(index * chunk as u64, &payload(index));
        let error = if error == 0 && index % 4 == 3 { client.flush() } else { error };
        if error != 0 {
            first_error = Some(error);
            break;
        }
        if index % 4 == 3 {
            flushed_through = Some(index);
        }
    }
    let flushed_through = flushed_through.expect("some writes fit");
    assert!(first_error.is_some(), "the filesystem filled up before the device did");
    let status = wait_status(&vdir, "the volume fails", |s| s["volume"]["mode"] == "failed");
    assert!(status["volume"]["failure"].as_str().unwrap().contains("No space left on device"), "{status}");
    assert_eq!(client.write(0, &payload(0)), EIO, "a failed volume takes no writes");
    drop(client);
    served.kill9();

    std::fs::remove_file(&filler).unwrap();
    let served = Served::start(&vdir, &[]);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    for index in 0..=flushed_through {
        assert!(client.read(index * chunk as u64, chunk as u32) == payload(index), "flushed chunk {index} survived the full disk");
    }
    assert_eq!(client.write(0, &payload(0)), 0);
    assert_eq!(client.flush(), 0);
    assert!(!served.log_text().contains("panicked"), "{}", served.log_text());
    drop(client);
    drop(served);
}

/// A volume mirrored straight to an applier started with `env`.
struct Site {
    vdir: PathBuf,
    adir: PathBuf,
    port: u16,
    applier: Applier,
}

fn site(tmp: &Path, env: &[(&str, &str)]) -> Site {
    let vdir = tmp.join("vol");
    let adir = tmp.join("applier");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "16M", &[]));
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success());
    let port = free_udp_port();
    let applier = Applier::start_with_env(&adir, port, env);
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", &applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));
    Site { vdir, adir, port, applier }
}

fn replica_of(adir: &Path) -> serde_json::Value {
    applier_status(adir)["replicas"][0].clone()
}

/// Writes `count` blocks tagged `tag` from block `first` and flushes; every request succeeds.
fn write_blocks(client: &mut NbdClient, first: u64, count: u64, tag: u8) {
    for index in first..first + count {
        assert_eq!(client.write(at(index), &block(tag)), 0, "the source takes writes whatever the applier's disk does");
    }
    assert_eq!(client.flush(), 0);
}

#[test]
fn an_applier_whose_disk_fails_stops_acknowledging_and_resumes_once_it_works() {
    let tmp = tempfile::tempdir().unwrap();
    let (journal_full, image_broken) = (tmp.path().join("applier-journal-full"), tmp.path().join("replica-image-broken"));
    let faults = while_files(&[("applier-journal-enospc", &journal_full), ("replica-image-eio", &image_broken)]);
    let mut site = site(tmp.path(), &[("UBLK_MIRROR_FAILPOINTS", faults.as_str())]);
    let served = Served::start(&site.vdir, &[]);
    let mut client = NbdClient::connect(&served.socket, "vol0").unwrap();
    wait_consistent(&site.vdir);
    write_blocks(&mut client, 0, 16, 1);
    wait_caught_up(&site.vdir);

    for (fault, error, label) in [(&journal_full, "No space left on device", "journal"), (&image_broken, "Input/output error", "image")] {
        let before = replica_of(&site.adir);
        std::fs::write(fault, b"").unwrap();
        let tag = if label == "journal" { 2 } else { 3 };
        write_blocks(&mut client, 16, 64, tag);
        // The applier says why it stops; the source's mirror says so too and never blocks.
        let deadline = Instant::now() + Duration::from_secs(60);
        let replica = loop {
            let replica = replica_of(&site.adir);
            if replica["disk_error"].as_str().is_some_and(|e| e.contains(error)) {
                break replica;
            }
            assert!(Instant::now() < deadline, "the applier never reported its {label} error: {replica}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(replica["consistent"], true, "{replica}");
        let text = stdout(&cli(&["applier", "status", "--dir", site.adir.to_str().unwrap()]));
        assert!(text.contains("DISK ERROR"), "{text}");
        write_blocks(&mut client, 80, 16, tag);
        let status = status_json(&site.vdir);
        assert_eq!(status["volume"]["mode"], "journaling", "the source goes on: {status}");
        let last = status["volume"]["last_lsn"].as_u64().unwrap();
        assert!(status["mirrors"][0]["applied_lsn"].as_u64().unwrap() < last, "nothing after the fault is acknowledged: {status}");
        if label == "journal" {
            // Nothing more reached the applier's journal.
            assert_eq!(replica["received_lsn"], before["received_lsn"], "{replica}");
        }
        // The fault goes; the source reconnects, the replica is reopened and catches up.
        std::fs::remove_file(fault).unwrap();
        let status = wait_caught_up(&site.vdir);
        assert!(replica_of(&site.adir)["disk_error"].is_null(), "the error clears once records are stored again");
        let image = std::fs::read(replica_image(&site.adir, "vol0")).unwrap();
        let mut source = vec![0u8; image.len()];
        for (index, piece) in source.chunks_mut(1 << 20).enumerate() {
            piece.copy_from_slice(&client.read(index as u64 * (1 << 20), 1 << 20));
        }
        assert!(image == source, "after the {label} fault the replica equals the source: {status}");
    }
    // The applier never panicked, and a restart of it finds the replica whole.
    let log = std::fs::read_to_string(site.adir.with_extension("log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("reopening the replica after a disk error"), "{log}");
    site.applier.kill9();
    site.applier = Applier::start(&site.adir, site.port);
    write_blocks(&mut client, 200, 4, 9);
    wait_caught_up(&site.vdir);
}
