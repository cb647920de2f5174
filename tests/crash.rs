//! Crashes under load: kill -9 of `run`, and a simulated power cut that loses every journal
//! byte written after the last fdatasync. After each: every flushed write is in the journal and
//! readable, the journal order agrees with what the client saw, the backing store holds no write
//! the journal lacks, and the device equals the journal replayed in LSN order (a prefix).

mod common;
use common::nbd_client::*;
use common::*;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use ublk_mirror::journal::{Journal, JournalReader, RecordKind};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 2048; // an 8 MiB volume
const QUEUE_DEPTH: usize = 16;

fn payload(id: u64, block: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    data[0..8].copy_from_slice(&id.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    for (i, byte) in data[16..].iter_mut().enumerate() {
        *byte = (id.wrapping_mul(2654435761).wrapping_add(i as u64) % 253) as u8 + 1;
    }
    data
}

/// What the client observed before the server died.
#[derive(Default)]
struct ClientLog {
    /// Write id -> block.
    sent: HashMap<u64, u64>,
    /// Write ids in the order their acknowledgements arrived.
    acked: Vec<u64>,
    /// Write id -> how many acknowledgements had arrived when it was sent.
    acked_before_send: HashMap<u64, usize>,
    /// Every write among the first `durable` acknowledgements was covered by a completed FLUSH.
    durable: usize,
    flushes: usize,
}

fn drive_load(socket: &Path, seed: u64) -> ClientLog {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut client = NbdClient::connect(socket, "crash").unwrap();
    let mut log = ClientLog::default();
    let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new(); // cookie -> (id, block)
    let mut flush_in_flight: HashMap<u64, usize> = HashMap::new(); // cookie -> acks when sent
    let mut busy_blocks = HashSet::new();
    let started = Instant::now();
    let mut next_id = 1u64;
    // Bounded in count and time; the server normally dies long before either bound.
    'load: while next_id < 50_000 && started.elapsed() < Duration::from_secs(20) {
        while in_flight.len() + flush_in_flight.len() < QUEUE_DEPTH {
            if next_id.is_multiple_of(40) && flush_in_flight.is_empty() {
                let Ok(cookie) = client.try_send(CMD_FLUSH, 0, 0, 0, &[]) else { break 'load };
                flush_in_flight.insert(cookie, log.acked.len());
                next_id += 1;
                continue;
            }
            // One write per block in flight at a time, so block contents follow the acks.
            let block = loop {
                let b = rng.gen_range(0..BLOCKS);
                if !busy_blocks.contains(&b) {
                    break b;
                }
            };
            let id = next_id;
            next_id += 1;
            let flags = if rng.gen_bool(0.02) { FLAG_FUA } else { 0 };
            // A write whose request could not be sent completely was never acknowledged.
            let Ok(cookie) = client.try_send(CMD_WRITE, flags, block * BLOCK as u64, BLOCK as u32, &payload(id, block)) else { break 'load };
            busy_blocks.insert(block);
            in_flight.insert(cookie, (id, block));
            log.sent.insert(id, block);
            log.acked_before_send.insert(id, log.acked.len());
        }
        let Ok(reply) = client.receive() else { break };
        assert_eq!(reply.error, 0, "request failed before the crash");
        if let Some((id, block)) = in_flight.remove(&reply.cookie) {
            busy_blocks.remove(&block);
            log.acked.push(id);
        } else if let Some(acks) = flush_in_flight.remove(&reply.cookie) {
            log.durable = log.durable.max(acks);
            log.flushes += 1;
        }
    }
    log
}

struct JournalWrite {
    lsn: u64,
    id: u64,
    block: u64,
}

fn journal_writes(dir: &Path) -> Vec<JournalWrite> {
    let (journal, report) = Journal::open_read_only(&dir.join("journal")).expect("journal recovers");
    assert_eq!(report.first_lsn, 1, "the test keeps the whole history (journal-no-trim)");
    let mut reader = JournalReader::new(journal, 1).unwrap();
    let mut writes = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        assert_eq!(record.header.kind, RecordKind::Write);
        let id = u64::from_le_bytes(record.payload[0..8].try_into().unwrap());
        let block = u64::from_le_bytes(record.payload[8..16].try_into().unwrap());
        assert_eq!(record.payload, payload(id, block), "journal record {} holds exactly write {id}", record.header.lsn);
        assert_eq!(record.header.offset, block * BLOCK as u64);
        writes.push(JournalWrite { lsn: record.header.lsn, id, block });
    }
    writes
}

/// Checks everything after a crash and returns how many writes the journal held.
fn check_after_crash(dir: &Path, log: &ClientLog, label: &str) -> usize {
    let writes = journal_writes(dir);
    let lsn_of: HashMap<u64, u64> = writes.iter().map(|w| (w.id, w.lsn)).collect();
    assert_eq!(lsn_of.len(), writes.len(), "{label}: no write journaled twice");
    for w in &writes {
        assert_eq!(log.sent.get(&w.id), Some(&w.block), "{label}: journal holds only writes the client sent");
    }
    // Every write covered by a completed FLUSH survived.
    for id in &log.acked[..log.durable] {
        assert!(
            lsn_of.contains_key(id),
            "{label}: flushed write {id} lost (journal holds LSN 1..={}, {} flushes completed, durable prefix {} of {} acks)",
            writes.len(),
            log.flushes,
            log.durable,
            log.acked.len()
        );
    }
    // Prefix: a write acknowledged before another was sent precedes it in the journal.
    let mut max_lsn_of_first = vec![0u64; log.acked.len() + 1];
    for (k, id) in log.acked.iter().enumerate() {
        let lsn = lsn_of.get(id).copied().unwrap_or(u64::MAX);
        max_lsn_of_first[k + 1] = max_lsn_of_first[k].max(lsn);
    }
    for w in &writes {
        let before = log.acked_before_send[&w.id];
        assert!(
            max_lsn_of_first[before] < w.lsn,
            "{label}: write {} (LSN {}) is journaled but a write acknowledged before it was sent is missing or later",
            w.id,
            w.lsn
        );
    }
    // The backing store holds no write the journal lacks.
    let backing = std::fs::read(dir.join("data.img")).unwrap();
    for block in 0..BLOCKS {
        let bytes = &backing[(block as usize) * BLOCK..(block as usize + 1) * BLOCK];
        if bytes.iter().any(|&b| b != 0) {
            let id = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
            assert!(
                lsn_of.contains_key(&id),
                "{label}: backing block {block} holds write {id}, which the journal lacks (journal holds {} writes, last id {:?})",
                writes.len(),
                writes.last().map(|w| w.id)
            );
            assert_eq!(bytes, payload(id, block).as_slice(), "{label}: backing block {block} is torn");
        }
    }
    // After recovery the device equals the journal replayed in LSN order.
    let mut expected: HashMap<u64, u64> = HashMap::new();
    for w in &writes {
        expected.insert(w.block, w.id);
    }
    let served = Served::start(dir, &[]);
    let mut client = NbdClient::connect(&served.socket, "crash").unwrap();
    for block in 0..BLOCKS {
        let data = client.read(block * BLOCK as u64, BLOCK as u32);
        match expected.get(&block) {
            Some(&id) => assert_eq!(data, payload(id, block), "{label}: block {block} should hold write {id}"),
            None => assert!(data.iter().all(|&b| b == 0), "{label}: block {block} should be zero"),
        }
    }
    client.disconnect();
    let status = status_json(dir);
    assert_eq!(status["volume"]["last_lsn"], writes.len() as u64, "{label}");
    drop(served);
    assert!(log.durable > 0, "{label}: the load completed at least one FLUSH before the crash");
    writes.len()
}

fn new_volume(tmp: &Path, name: &str) -> std::path::PathBuf {
    new_volume_with(tmp, name, &[])
}

fn new_volume_with(tmp: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let dir = tmp.join(name);
    let mut args = vec!["--journal-size", "256M", "--segment-size", "4M"];
    args.extend_from_slice(extra);
    create_volume(&dir, "crash", "8M", &args);
    dir
}

/// The same crash with `backing_writes = direct`: writeback's O_DIRECT batches (io_uring,
/// completing in any order) must leave the backing store holding no write the journal lacks,
/// nothing torn, and a restart must redo the rest.
#[test]
fn kill_9_with_direct_backing_writes_loses_no_flushed_write() {
    let tmp = tempfile::tempdir().unwrap();
    for seed in 0..3u64 {
        let dir = new_volume_with(tmp.path(), &format!("direct{seed}"), &["--backing-writes", "direct"]);
        let mut served = Served::start(&dir, &[("UBLK_MIRROR_FAILPOINTS", "journal-no-trim")]);
        let socket = served.socket.clone();
        let load = std::thread::spawn(move || drive_load(&socket, seed + 20));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 300);
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..900)));
        served.kill9();
        let log = load.join().unwrap();
        assert!(served.log_text().contains("with O_DIRECT (backing_writes = direct)"), "direct writeback was not in use: {}", served.log_text());
        assert!(log.acked.len() > 50, "load ran ({} acks)", log.acked.len());
        check_after_crash(&dir, &log, &format!("kill -9 with direct backing writes, seed {seed}"));
    }
}

#[test]
fn kill_9_during_a_write_load_loses_no_flushed_write() {
    let tmp = tempfile::tempdir().unwrap();
    for seed in 0..3u64 {
        let dir = new_volume(tmp.path(), &format!("kill{seed}"));
        let mut served = Served::start(&dir, &[("UBLK_MIRROR_FAILPOINTS", "journal-no-trim")]);
        let socket = served.socket.clone();
        let load = std::thread::spawn(move || drive_load(&socket, seed));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..900)));
        served.kill9();
        let log = load.join().unwrap();
        assert!(log.acked.len() > 50, "load ran ({} acks)", log.acked.len());
        check_after_crash(&dir, &log, &format!("kill -9 seed {seed}"));
    }
}

#[test]
fn power_cut_dropping_unsynced_journal_bytes_leaves_a_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dropped_acknowledged = 0;
    // Three cuts; up to three more while none has yet caught acknowledged, unflushed writes
    // in the page cache (a cut right after a FLUSH has none to lose).
    for seed in 0..6u64 {
        if seed >= 3 && dropped_acknowledged > 0 {
            break;
        }
        let dir = new_volume(tmp.path(), &format!("cut{seed}"));
        // The server cuts power at its first journal commit after this file appears.
        let trigger = tmp.path().join(format!("cut{seed}.now"));
        let failpoints = format!("journal-no-trim,journal-power-cut-before-commit={}", trigger.display());
        let mut served = Served::start(&dir, &[("UBLK_MIRROR_FAILPOINTS", &failpoints)]);
        let socket = served.socket.clone();
        let load = std::thread::spawn(move || drive_load(&socket, seed + 10));
        // Cut at a random moment once FLUSHes have completed (their writes must survive).
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 200);
        let deadline = Instant::now() + Duration::from_secs(20);
        while status_json(&dir)["volume"]["flushes"].as_u64().unwrap_or(0) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
        std::fs::write(&trigger, b"").unwrap();
        let log = load.join().unwrap();
        let status = served.child.wait().unwrap();
        assert!(!status.success(), "the failpoint killed the server");
        assert!(served.log_text().contains("simulating a power cut"), "{}", served.log_text());
        let label = format!("power cut seed {seed} (server log: {})", served.log_text().lines().last().unwrap_or_default());
        // (Counted before the restart inside the check, which trims the journal.)
        let journaled = check_after_crash(&dir, &log, &label);
        eprintln!("power cut seed {seed}: {} acked, {} flushed, {journaled} journaled", log.acked.len(), log.durable);
        dropped_acknowledged += log.acked.len().saturating_sub(journaled);
    }
    assert!(dropped_acknowledged > 0, "the simulated power cut must lose some acknowledged, unflushed writes");
}

#[test]
fn journal_full_makes_writes_wait_and_status_say_full() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("full");
    create_volume(&dir, "crash", "8M", &["--journal-size", "4M", "--segment-size", "1M", "--pending-window", "1M"]);
    let served = Served::start(&dir, &[("UBLK_MIRROR_FAILPOINTS", "journal-no-trim")]);
    let socket = served.socket.clone();
    std::thread::spawn(move || {
        let mut client = NbdClient::connect(&socket, "crash").unwrap();
        for i in 0..2048u64 {
            // The server is killed at the end of the test: stop quietly then.
            if client.try_send(CMD_WRITE, 0, (i % BLOCKS) * BLOCK as u64, BLOCK as u32, &payload(i + 1, i % BLOCKS)).is_err() {
                break;
            }
            if client.receive().map_or(true, |reply| reply.error != 0) {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = status_json(&dir);
    while status["volume"]["mode"] != "full" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        status = status_json(&dir);
    }
    assert_eq!(status["volume"]["mode"], "full", "{status}");
    let used = status["journal"]["used_bytes"].as_u64().unwrap();
    let capacity = status["journal"]["capacity_bytes"].as_u64().unwrap();
    assert!(used <= capacity && used > capacity * 3 / 4, "used {used} of {capacity}");
    // Writes wait rather than fail: the LSN stops short of the load.
    let last = status["volume"]["last_lsn"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status_json(&dir)["volume"]["last_lsn"].as_u64().unwrap(), last);
    assert!(last < 2048);
    // A volume whose journal is full still stops on SIGTERM (the waiting write fails, it was
    // never acknowledged), and everything journaled is there after a restart.
    let mut served = served;
    let stopping = Instant::now();
    assert_eq!(served.terminate(), Some(0), "{}", served.log_text());
    assert!(stopping.elapsed() < Duration::from_secs(15), "stopping took {:?}", stopping.elapsed());
    assert!(served.log_text().contains("stopping with a full journal"), "{}", served.log_text());
    let status = status_json(&dir);
    assert_eq!(status["volume"]["last_lsn"].as_u64().unwrap(), last, "{status}");
}
