//! Online verify (`mirror verify`): the replica compared with the running volume chunk by
//! chunk at the same LSN on both sides while a writer runs — no false differences; a chunk
//! corrupted behind the applier's back is found exactly, repaired through a resync, and the
//! schedule (`verify_every`) runs one by itself.

mod common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The writer stays below this offset; the corruption goes above it, where nothing writes.
const WRITTEN: u64 = 32 * MIB;
const CORRUPT_AT: u64 = 48 * MIB + 8192;

/// Writes 16 KiB blocks all over the first 32 MiB (a FLUSH every 16) until told to stop,
/// at most 90 s.
fn writer(socket: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut client = nbd_client::NbdClient::connect(&socket, "vol0").expect("connect");
        let started = Instant::now();
        let mut written = 0u64;
        while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(90) {
            let block = vec![(written % 251) as u8 + 1; 16 << 10];
            let offset = (written * 7919 % (WRITTEN / (16 << 10))) * (16 << 10);
            assert_eq!(client.write(offset, &block), 0);
            written += 1;
            if written.is_multiple_of(16) {
                assert_eq!(client.flush(), 0);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(client.flush(), 0);
        client.disconnect();
        written
    })
}

/// `mirror verify` with `extra` flags and --json: its exit code and report.
fn verify(vdir: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["mirror", "verify", "--dir", vdir.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let output = cli(&args);
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&output)).unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {}\n{}", stdout(&output), stderr(&output)));
    (output.status.code(), report["mirrors"][0].clone())
}

#[test]
fn verify_finds_exactly_the_corrupted_chunk_while_a_writer_runs_and_repairs_it() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let vdir = tmp.path().join("vol");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "64M", &[]));
    let v = vdir.to_str().unwrap();
    let adir = tmp.path().join("applier");
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success());
    let port = free_udp_port();
    let _applier = Applier::start(&adir, port);
    let output = cli(&["mirror", "add", "--dir", v, "--to", &format!("127.0.0.1:{port}"), "--fingerprint", &applier_fp]);
    assert!(output.status.success(), "{}", stderr(&output));

    // A stopped volume cannot be verified online: a clear error.
    let output = cli(&["mirror", "verify", "--dir", v]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("is not running"), "{}", stderr(&output));

    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let mut served = Served::start_with_args(&vdir, &["--metrics", &metrics.to_string()], &[]);
    // Data in the region the corruption will hit: the replica holds it after the sync.
    assert!(qemu_io(&served.uri("vol0"), &[format!("write -P 0x5a {} 1M", 48 * MIB)]).status.success());
    wait_caught_up(&vdir);
    let stop = Arc::new(AtomicBool::new(false));
    let busy = writer(served.socket.clone(), stop.clone());

    // The schedule: the first verify starts at once (none ran yet).
    let output = cli(&["mirror", "set", "--dir", v, "--verify-every", "30s"]);
    assert!(!output.status.success() && stderr(&output).contains("shorter than a minute"), "{}", stderr(&output));
    assert!(cli(&["mirror", "set", "--dir", v, "--verify-every", "1h"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let scheduled = loop {
        let report = status_json(&vdir)["mirrors"][0]["verify"].clone();
        if report["scheduled"] == true && report["state"] != "running" {
            break report;
        }
        assert!(Instant::now() < deadline, "no scheduled verify: {report}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(scheduled["state"], "done", "{scheduled}");
    assert_eq!(scheduled["differing_regions"], 0, "a busy volume verified with a false difference: {scheduled}");
    assert!(cli(&["mirror", "set", "--dir", v, "--verify-every", "none"]).status.success());

    // On request, with writes going on: identical, every byte compared.
    let (code, report) = verify(&vdir, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["state"], "done");
    assert_eq!(report["compared_bytes"], 64 * MIB);
    assert_eq!(report["differing_regions"], 0, "{report}");
    assert!(report["last_lsn"].as_u64() > report["first_lsn"].as_u64(), "the writer ran during the verify: {report}");

    // A chunk corrupted behind the applier's back: exactly that chunk is reported.
    let image = std::fs::OpenOptions::new().write(true).open(replica_image(&adir, "vol0")).unwrap();
    image.write_all_at(&[0xee; 4096], CORRUPT_AT).unwrap();
    drop(image);
    let (code, report) = verify(&vdir, &["--name", "mirror"]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["differing_regions"], 1, "{report}");
    assert_eq!(report["differing_bytes"], MIB);
    assert_eq!(report["differing_offsets"], serde_json::json!([48 * MIB]));
    assert_eq!(report["repaired"], false);
    let text = stdout(&cli(&["status", "--dir", v, "--json"]));
    assert!(text.contains("\"differing_regions\": 1"), "status shows the last verify: {text}");
    let labels = [("volume", "vol0"), ("mirror", "mirror")];
    let page = scrape(metrics);
    assert_eq!(metric(&page, "ublk_mirror_mirror_verify_differing_regions", &labels), 1.0);
    assert_eq!(metric(&page, "ublk_mirror_mirror_verify_differing_bytes", &labels), MIB as f64);
    assert!(metric(&page, "ublk_mirror_mirror_verify_last_timestamp_seconds", &labels) > 1.7e9);

    // Repaired through a resync, then identical.
    let (code, report) = verify(&vdir, &["--repair"]);
    assert_eq!(code, Some(1), "differences were found (and repaired): {report}");
    assert_eq!(report["differing_offsets"], serde_json::json!([48 * MIB]));
    assert_eq!(report["repaired"], true, "{report}");
    let (code, report) = verify(&vdir, &[]);
    assert_eq!(code, Some(0), "after the repair: {report}");
    assert_eq!(metric(&scrape(metrics), "ublk_mirror_mirror_verify_differing_regions", &labels), 0.0);

    stop.store(true, Ordering::SeqCst);
    assert!(busy.join().unwrap() > 0);
    wait_caught_up(&vdir);
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "the replica differs from the source");
    let log = served.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(served.terminate(), Some(0));
    // The last report survives the restart (for the metrics and the schedule).
    let offline = status_json(&vdir);
    assert_eq!(offline["mirrors"][0]["verify"]["state"], "done", "{offline}");
}
