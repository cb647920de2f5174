//! Coalescing a backlog (docs/coalescing.md), end to end through the binaries: a mirror far
//! behind sends runs of records as the newest version of each block, which the applier
//! journals and applies as one step. Killed with SIGKILL at any point of receiving,
//! journaling or applying a range, the applier recovers its replica to a prefix state of
//! the source's history (the sweep workload says which); a random-overwrite backlog costs
//! well under its journal bytes on the wire.

mod common;
use common::nbd_client::*;
use common::sweep::*;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A volume (64 MiB, a journal of `journal`) mirrored to a fresh applier, started and
/// synchronised; `mirror add` given `mirror_args`.
fn site(tmp: &Path, journal: &str, mirror_args: &[&str]) -> (PathBuf, PathBuf, u16, Applier, Served) {
    let adir = tmp.join("applier");
    let vdir = tmp.join("vol");
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "64M", &["--journal-size", journal, "--segment-size", "8M"]));
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success());
    let port = free_udp_port();
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &to, "--fingerprint", &applier_fp, "--idle-timeout", "3"];
    args.extend_from_slice(mirror_args);
    let output = cli(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    wait_consistent(&vdir);
    (vdir, adir, port, applier, served)
}

fn mirror_of(vdir: &Path) -> serde_json::Value {
    status_json(vdir)["mirrors"][0].clone()
}

/// Waits (bounded) until the sender is `connected` (or not) to the applier. A killed
/// applier is noticed by the idle timeout (3 s): until then the sender sends into the void.
fn wait_connected(vdir: &Path, connected: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mirror_of(vdir)["connected"] != connected {
        assert!(Instant::now() < deadline, "the mirror never became connected: {connected}: {}", mirror_of(vdir));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_applier_killed_while_taking_coalesced_ranges_holds_only_prefix_states() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    // Compression off so the bytes are the coalescing's alone. `coalesce` is left at its
    // default, auto: the backlog is well past 64 MiB (four ranges of 16384 records).
    let (vdir, adir, port, applier, served) = site(tmp.path(), "512M", &["--compression", "off"]);
    // The backlog: 45 passes over 1536 blocks (6 MiB) while the applier is down: 270 MiB of
    // journal, each block written 45 times.
    drop(applier);
    wait_connected(&vdir, false);
    let blocks = 1536u64;
    let writes = 45 * blocks;
    let writer = sweep(served.socket.clone(), blocks, writes, Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let (written, _) = writer.join().unwrap();
    assert_eq!(written, writes);
    assert_ne!(mirror_of(&vdir)["state"], "tracking", "the backlog fits the journal: {}", mirror_of(&vdir));
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut states = Vec::new();
    let started = Instant::now();
    for round in 0..5 {
        if started.elapsed() > Duration::from_secs(90) {
            break;
        }
        let mut applier = Applier::start(&adir, port);
        wait_connected(&vdir, true);
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        applier.kill9();
        let image = recovered_replica(&adir);
        let state = sweep_state(&image[..blocks as usize * BLOCK], blocks).unwrap_or_else(|e| panic!("round {round}: the replica is torn after a kill: {e}"));
        assert!(state <= written, "round {round}: the replica is ahead of the source");
        assert!(image[blocks as usize * BLOCK..].iter().all(|&b| b == 0), "round {round}: bytes past the sweep");
        eprintln!("round {round}: killed; the replica holds the first {state} of {written} writes; mirror {}", mirror_of(&vdir));
        states.push(state);
        wait_connected(&vdir, false);
    }
    assert!(states.windows(2).all(|w| w[0] <= w[1]), "the replica never goes back: {states:?}");
    let _applier = Applier::start(&adir, port);
    let status = wait_caught_up(&vdir);
    let mirror = &status["mirrors"][0];
    assert!(mirror["coalesced_ranges"].as_u64().unwrap() >= 1, "the backlog went as coalesced ranges: {mirror}");
    assert!(mirror["coalesced_skipped_bytes"].as_u64().unwrap() > 0, "overwritten versions were not sent: {mirror}");
    assert_eq!(mirror["coalesce"], "auto");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    let source = std::fs::read(vdir.join("data.img")).unwrap();
    assert_eq!(sweep_state(&source[..blocks as usize * BLOCK], blocks), Ok(written));
    assert!(compare(vdir.join("data.img").to_str().unwrap(), replica_image(&adir, "vol0").to_str().unwrap()), "the replica differs from the source");
}

#[test]
fn a_random_overwrite_backlog_sends_at_most_six_tenths_of_its_journal_bytes() {
    use rand::seq::SliceRandom;
    use rand::{RngCore, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let (vdir, adir, port, applier, served) = site(tmp.path(), "128M", &["--compression", "off", "--coalesce", "on"]);
    drop(applier);
    wait_connected(&vdir, false);
    let before = mirror_of(&vdir);
    // 1536 blocks of 4 KiB (6 MiB), each written once in random order, then half of them
    // (chosen at random) twice more: 12 MiB of journal for 6 MiB of final data.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut order: Vec<u64> = (0..1536).collect();
    order.shuffle(&mut rng);
    let mut again: Vec<u64> = order[..768].to_vec();
    again.extend_from_within(..);
    again.shuffle(&mut rng);
    let mut client = NbdClient::connect(&served.socket, "vol0").expect("connect");
    let mut block = vec![0u8; BLOCK];
    for &index in order.iter().chain(&again) {
        rng.fill_bytes(&mut block);
        client.send(CMD_WRITE, 0, index * BLOCK as u64, BLOCK as u32, &block);
        assert_eq!(client.receive().unwrap().error, 0);
    }
    client.send(CMD_FLUSH, 0, 0, 0, &[]);
    assert_eq!(client.receive().unwrap().error, 0);
    drop(client);
    let journal_bytes = ((order.len() + again.len()) * BLOCK) as f64;
    let _applier = Applier::start(&adir, port);
    let status = wait_caught_up(&vdir);
    let mirror = &status["mirrors"][0];
    let sent = (mirror["sent_bytes"].as_u64().unwrap() - before["sent_bytes"].as_u64().unwrap()) as f64;
    let ratio = sent / journal_bytes;
    eprintln!("sent {sent} bytes for {journal_bytes} journal bytes: {ratio:.3}; mirror {mirror}");
    assert!(mirror["coalesced_ranges"].as_u64().unwrap() >= 1, "{mirror}");
    assert!(ratio <= 0.6, "a backlog with half its blocks overwritten sent {ratio:.3} of its journal bytes");
    let mut served = served;
    assert_eq!(served.terminate(), Some(0));
    assert!(compare(vdir.join("data.img").to_str().unwrap(), replica_image(&adir, "vol0").to_str().unwrap()), "the replica differs from the source");
}
