//! Replication end to end through the binaries: applier + `run` on loopback, real QUIC.

mod common;
use common::pair::*;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn replica_equals_source_and_survives_an_applier_kill() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = setup(tmp.path(), None);
    preallocate_journals(&adir);
    let mut applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    let uri = served.uri("vol0");
    let replica = replica_image(&adir, "vol0");
    let journal_files = || segment_files(&replica.with_file_name("journal"));

    let mut commands = Vec::new();
    for i in 0..200u64 {
        let offset = (i * 7919 % 8000) * 4096;
        match i % 10 {
            7 => commands.push(format!("discard {offset} 8192")),
            8 => commands.push(format!("write -z {offset} 12288")),
            _ => commands.push(format!("write -P {} {offset} {}", i % 250 + 1, 4096 * (1 + i % 4))),
        }
    }
    commands.push("flush".into());
    let output = qemu_io(&uri, &commands);
    assert!(output.status.success(), "{}", stderr(&output));
    let status = wait_caught_up(&vdir);
    assert_eq!(status["mirrors"][0]["state"], "replicating", "{status}");
    assert!(compare(&uri, replica.to_str().unwrap()), "replica differs from the source");
    let applier_view = applier_status(&adir);
    assert_eq!(applier_view["replicas"][0]["volume"], "vol0");
    assert_eq!(applier_view["replicas"][0]["connected"], true);
    assert_eq!(applier_view["replicas"][0]["applied_lsn"], status["volume"]["last_lsn"]);
    assert_eq!(journal_files(), 16, "1 GiB of 64 MiB segments, kept across the initial sync");
    // Writes to a replicating mirror: the write buffers kept in memory for its sender go
    // once it has read them.
    let commands: Vec<String> = (0..50u64).map(|i| format!("write -P {} {} 65536", i + 1, i * 65536)).collect();
    assert!(qemu_io(&uri, &commands).status.success());
    wait_caught_up(&vdir);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_json(&vdir)["journal"]["memory_bytes"] != 0 {
        assert!(Instant::now() < deadline, "write buffers kept after the mirror caught up: {}", status_json(&vdir));
        std::thread::sleep(Duration::from_millis(50));
    }

    // Kill -9 the applier while writes continue, restart it: the mirror resumes and converges.
    let writer_uri = uri.clone();
    let load = std::thread::spawn(move || {
        let mut commands = Vec::new();
        for i in 0..400u64 {
            commands.push(format!("write -P {} {} 65536", i % 200 + 20, (i * 104729 % 480) * 65536));
        }
        commands.push("flush".into());
        qemu_io(&writer_uri, &commands)
    });
    std::thread::sleep(Duration::from_millis(300));
    applier.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(&vdir)["mirrors"][0]["connected"] == true {
        assert!(Instant::now() < deadline, "the sender never noticed the applier died");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_json(&vdir)["mirrors"][0]["state"], "disconnected");
    let _applier = Applier::start(&adir, port);
    assert!(load.join().unwrap().status.success());
    let status = wait_caught_up(&vdir);
    assert!(status["mirrors"][0]["reconnects"].as_u64().unwrap() >= 1);
    assert!(compare(&uri, replica.to_str().unwrap()), "replica differs after the applier restart");
    let duplicated = applier_status(&adir)["replicas"][0]["records_duplicated"].as_u64().unwrap();
    // Records sent twice stay within the unacknowledged window: 16 MiB holds 255 records of
    // 64 KiB plus their headers (one more may top it up).
    assert!(duplicated <= 256, "{duplicated} records resent");
    assert_eq!(journal_files(), 16, "no segment file made or lost");
    drop(served);
}

#[test]
fn wrong_applier_fingerprint_and_unknown_source_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let stranger = fingerprint_line(&stdout(&cli(&["applier", "init", "--dir", tmp.path().join("other").to_str().unwrap()])));
    let (adir, vdir, port) = setup(tmp.path(), Some(&stranger));
    let _applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_json(&vdir);
        if let Some(error) = status["mirrors"][0]["last_error"].as_str() {
            assert!(error.contains("pinned"), "{error}");
            assert_eq!(status["mirrors"][0]["connected"], false);
            break;
        }
        assert!(Instant::now() < deadline, "no refusal reported: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(served);
    // The applier made no replica for a source it never authenticated.
    assert!(applier_status(&adir)["replicas"].as_array().unwrap().is_empty());

    // A source the applier does not allow is refused too.
    let tmp2 = tempfile::tempdir().unwrap();
    let (adir2, vdir2, port2) = setup(tmp2.path(), None);
    std::fs::write(adir2.join("allowed"), b"").unwrap();
    let _applier2 = Applier::start(&adir2, port2);
    let _served2 = Served::start(&vdir2, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_json(&vdir2);
        if status["mirrors"][0]["last_error"].is_string() {
            assert_eq!(status["mirrors"][0]["connected"], false);
            break;
        }
        assert!(Instant::now() < deadline, "no refusal reported: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(applier_status(&adir2)["replicas"].as_array().unwrap().is_empty());
}

/// Distinguishable 4 KiB block contents for write `id`.
fn block_payload(id: u64) -> Vec<u8> {
    let mut data = vec![(id % 251) as u8 + 1; 4096];
    data[..8].copy_from_slice(&id.to_le_bytes());
    data
}

/// Pipelined writes of distinguishable blocks (QD 16) with a FLUSH every 50, until the server
/// goes away or the bounds are reached. Returns how many writes were acknowledged. At most
/// 6000 requests: 24 MiB, within the 64 MiB journal even while a mirror is down (a full
/// journal makes writes wait, which is not what these tests are about).
fn distinguishable_load(socket: &Path, export: &str, seconds: u64) -> u64 {
    use common::nbd_client::*;
    let mut client = NbdClient::connect(socket, export).unwrap();
    let started = Instant::now();
    let mut acked = 0u64;
    let mut in_flight = 0;
    let mut id = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) && id < 6000 {
        while in_flight < 16 && id < 6000 {
            id += 1;
            let sent = if id.is_multiple_of(50) {
                client.try_send(CMD_FLUSH, 0, 0, 0, &[])
            } else {
                client.try_send(CMD_WRITE, 0, (id * 7919 % 8192) * 4096, 4096, &block_payload(id))
            };
            if sent.is_err() {
                return acked;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        match client.receive() {
            Ok(reply) if reply.error == 0 => {
                acked += 1;
                in_flight -= 1;
            }
            _ => return acked,
        }
    }
    acked
}

#[test]
fn replica_is_always_a_prefix_of_the_source_after_applier_crashes() {
    use rand::{Rng, SeedableRng};
    use ublk_mirror::journal::{Journal, JournalReader, RecordKind};
    for seed in 0..3u64 {
        let tmp = tempfile::tempdir().unwrap();
        let (adir, vdir, port) = setup(tmp.path(), None);
        let mut applier = Applier::start(&adir, port);
        let served = Served::start(&vdir, &[("UBLK_MIRROR_FAILPOINTS", "journal-no-trim")]);
        // The prefix property holds once the initial synchronisation made the replica
        // consistent (before that it is marked inconsistent and no prefix is promised).
        wait_consistent(&vdir);
        let socket = served.socket.clone();
        let load = std::thread::spawn(move || distinguishable_load(&socket, "vol0", 4));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        applier.kill9();
        assert!(load.join().unwrap() > 100);
        drop(served);
        // Recover the replica exactly as the applier would on its next start.
        let replica = ublk_mirror::applier::replica::Replica::open(&replica_dir(&adir, "vol0")).unwrap();
        assert!(replica.state().is_consistent(), "killed after the sync, the replica stays consistent");
        let k = replica.applied_lsn();
        assert_eq!(k, replica.received_lsn(), "recovery applies everything received");
        drop(replica);
        // The source's state after LSN k, replayed from its (untrimmed) journal.
        let (journal, report) = Journal::open_read_only(&vdir.join("journal")).unwrap();
        assert_eq!(report.first_lsn, 1);
        assert!(k <= report.last_lsn, "replica ahead of the source");
        let mut expected = vec![0u8; 32 << 20];
        let mut reader = JournalReader::new(journal, 1).unwrap();
        while let Some(record) = reader.next_record().unwrap() {
            if record.header.lsn > k {
                break;
            }
            assert_eq!(record.header.kind, RecordKind::Write);
            let at = record.header.offset as usize;
            expected[at..at + record.payload.len()].copy_from_slice(&record.payload);
        }
        let image = std::fs::read(replica_image(&adir, "vol0")).unwrap();
        assert!(image == expected, "seed {seed}: the replica is not the source at LSN {k}");
        eprintln!("seed {seed}: replica recovered to LSN {k} of {}", report.last_lsn);
    }
}

#[test]
fn source_kill_9_and_restart_resumes_to_an_equal_replica() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = setup(tmp.path(), None);
    let _applier = Applier::start(&adir, port);
    let mut served = Served::start(&vdir, &[]);
    let socket = served.socket.clone();
    let load = std::thread::spawn(move || distinguishable_load(&socket, "vol0", 3));
    std::thread::sleep(Duration::from_millis(1500));
    served.kill9();
    assert!(load.join().unwrap() > 100);
    let served = Served::start(&vdir, &[]);
    wait_caught_up(&vdir);
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs after the source restart");
}

#[test]
fn garbage_from_an_authenticated_client_leaves_the_replica_untouched() {
    use ublk_mirror::protocol::{framing, tls, transport, wire};
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = setup(tmp.path(), None);
    let _applier = Applier::start(&adir, port);
    // Let the real source synchronise the new replica first, so the attacks below meet the
    // checks of a replica that takes records (not the "needs a sync" refusal).
    {
        let mut served = Served::start(&vdir, &[]);
        wait_consistent(&vdir);
        served.terminate();
        let deadline = Instant::now() + Duration::from_secs(30);
        while applier_status(&adir)["replicas"][0]["connected"] != false {
            assert!(Instant::now() < deadline, "the applier never saw the source leave");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let identity = tls::Identity::load(&vdir.join("identity")).unwrap();
    let applier_fp = applier_status(&adir)["fingerprint"].as_str().unwrap().to_string();
    let config: serde_json::Value = status_json(&vdir);
    let uuid = uuid::Uuid::parse_str(config["volume"]["uuid"].as_str().unwrap()).unwrap();
    let generation = uuid::Uuid::parse_str(config["volume"]["generation"].as_str().unwrap()).unwrap();
    let hello = wire::Hello {
        protocol: wire::PROTOCOL_VERSION,
        volume_uuid: *uuid.as_bytes(),
        volume_name: "vol0".into(),
        size: 32 << 20,
        generation: *generation.as_bytes(),
        first_lsn: 1,
        last_lsn: 0,
        history: vec![wire::WireGeneration { id: *generation.as_bytes(), parent: None, branch_lsn: 0, created_us: 0 }],
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Each attack on a fresh connection: the applier must close it and change nothing.
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xee; 300]),
        ("truncated frame", {
            let mut f = wire::encode_control(&wire::Control::Ack { received_lsn: 1, applied_lsn: 1 });
            f.truncate(f.len() - 2);
            f
        }),
        ("huge length", u32::MAX.to_le_bytes().to_vec()),
        ("record past the end", {
            let header = ublk_mirror::journal::RecordHeader {
                kind: ublk_mirror::journal::RecordKind::Write,
                flags: 0,
                lsn: 1,
                offset: (32 << 20) - 100,
                length: 4096,
                payload_len: 4096,
                synced_lsn: 0,
                timestamp_us: 0,
            };
            let payload = vec![0xab; 4096];
            let mut frame = wire::encode_batch_header(&[(header, &payload[..])]);
            frame.extend_from_slice(&payload);
            frame
        }),
        // Compressed batches (protocol 6): a bomb (8 MiB of zeros where the header claims one
        // 4 KiB write) and a damaged zstd frame; the applier must refuse both unapplied.
        ("compression bomb", {
            let header = ublk_mirror::journal::RecordHeader {
                kind: ublk_mirror::journal::RecordKind::Write,
                flags: 0,
                lsn: 1,
                offset: 0,
                length: 4096,
                payload_len: 4096,
                synced_lsn: 0,
                timestamp_us: 0,
            };
            let block = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
            let mut frame = wire::encode_compressed_batch_header(&[(header, &[0u8; 4096][..])], block.len());
            frame.extend_from_slice(&block);
            frame
        }),
        ("corrupt zstd frame", {
            let header = ublk_mirror::journal::RecordHeader {
                kind: ublk_mirror::journal::RecordKind::Write,
                flags: 0,
                lsn: 1,
                offset: 0,
                length: 4096,
                payload_len: 4096,
                synced_lsn: 0,
                timestamp_us: 0,
            };
            let mut block = zstd::bulk::compress(&vec![0xab; 4096], 3).unwrap();
            let middle = block.len() / 2;
            block[middle] ^= 0x5a;
            block.truncate(block.len() - 2);
            let mut frame = wire::encode_compressed_batch_header(&[(header, &[0u8; 4096][..])], block.len());
            frame.extend_from_slice(&block);
            frame
        }),
        ("LSN gap", {
            let header = ublk_mirror::journal::RecordHeader {
                kind: ublk_mirror::journal::RecordKind::Write,
                flags: 0,
                lsn: 5,
                offset: 0,
                length: 4096,
                payload_len: 4096,
                synced_lsn: 0,
                timestamp_us: 0,
            };
            let payload = vec![0xab; 4096];
            let mut frame = wire::encode_batch_header(&[(header, &payload[..])]);
            frame.extend_from_slice(&payload);
            frame
        }),
    ];
    for (what, bytes) in attacks {
        runtime.block_on(async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(
                transport::client_config(&identity, &applier_fp, std::time::Duration::from_secs(15), transport::Congestion::default()).unwrap(),
            );
            let connection = endpoint.connect(format!("127.0.0.1:{port}").parse().unwrap(), "applier").unwrap().await.unwrap();
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            framing::write_control(&mut send, &wire::Control::Hello(hello.clone())).await.unwrap();
            let welcome = framing::read_frame(&mut recv).await.unwrap();
            assert!(matches!(welcome, Some(wire::Frame::Control(wire::Control::Welcome { .. }))), "{what}: {welcome:?}");
            send.write_all(&bytes).await.unwrap();
            let _ = send.finish();
            // The applier answers nothing but closing.
            let answer = tokio::time::timeout(Duration::from_secs(10), framing::read_frame(&mut recv)).await.expect("applier reacts");
            assert!(!matches!(answer, Ok(Some(wire::Frame::Control(wire::Control::Ack { .. })))), "{what}: acknowledged");
            connection.close(0u32.into(), b"test");
        });
        let replica = &applier_status(&adir)["replicas"][0];
        assert_eq!(replica["received_lsn"], 0, "{what}: {replica}");
        assert_eq!(replica["applied_lsn"], 0, "{what}");
    }
    let image = std::fs::read(replica_image(&adir, "vol0")).unwrap();
    assert!(image.iter().all(|&b| b == 0), "no byte of the replica changed");
}

/// Initial synchronisation of a volume that already holds data (a pre-filled `--backing`), to
/// three appliers at once: an empty replica (only the non-zero chunks travel), a seeded copy
/// (`applier replica add`: nothing travels but hashes), and a partly different copy (its
/// different chunks travel, a chunk that should be zero is zeroed by flag) while writes go on.
#[test]
fn initial_sync_sends_only_differing_chunks_and_converges_under_writes() {
    require_tool("qemu-io", "qemu-utils");
    use rand::{RngCore, SeedableRng};
    const MIB: usize = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    // Source content: chunks 0..8 random, 8..16 explicit zeros, the rest holes.
    let mut content = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut content[..8 * MIB]);
    let backing = tmp.path().join("source.img");
    std::fs::write(&backing, &content[..16 * MIB]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(size as u64).unwrap();
    let vdir = tmp.path().join("vol");
    let volume_fp =
        fingerprint_line(&create_volume(&vdir, "vol0", "128M", &["--backing", backing.to_str().unwrap(), "--journal-size", "64M", "--segment-size", "8M"]));
    // A seeded identical copy, and a partly different one (chunks 3 and 20 changed, chunk 12
    // holds garbage where the source has zeros).
    let seeded = tmp.path().join("seeded.img");
    std::fs::copy(&backing, &seeded).unwrap();
    let mut different = content.clone();
    different[3 * MIB..3 * MIB + 4096].fill(0xee);
    different[20 * MIB + 100] = 1;
    different[12 * MIB..13 * MIB].fill(0x5a);
    let partial = tmp.path().join("partial.img");
    std::fs::write(&partial, &different).unwrap();

    let mut appliers = Vec::new();
    for (name, image) in [("empty", None), ("seeded", Some(&seeded)), ("partial", Some(&partial))] {
        let adir = tmp.path().join(format!("applier-{name}"));
        let port = configure_applier(&adir, &vdir, &volume_fp, name, None);
        if let Some(image) = image {
            let output = cli(&["applier", "replica", "add", "--dir", adir.to_str().unwrap(), "--volume", "vol0", "--image", image.to_str().unwrap()]);
            assert!(output.status.success(), "{}", stderr(&output));
        }
        appliers.push((name, Applier::start(&adir, port), adir));
    }
    // A bad attachment is refused up front.
    let wrong = cli(&[
        "applier",
        "replica",
        "add",
        "--dir",
        appliers[0].2.to_str().unwrap(),
        "--volume",
        "vol0",
        "--image",
        tmp.path().join("missing.img").to_str().unwrap(),
    ]);
    assert_eq!(wrong.status.code(), Some(1));

    // Phase 1, no writes: exact counts.
    let served = Served::start(&vdir, &[]);
    let uri = served.uri("vol0");
    let syncing_seen = status_json(&vdir)["mirrors"].as_array().unwrap().iter().any(|m| m["state"] == "syncing" || m["consistent"] == false);
    assert!(syncing_seen, "a new replica starts inconsistent");
    let status = wait_all_consistent(&vdir, 3);
    let mirror = |name: &str| status["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap().clone();
    for m in ["empty", "seeded", "partial"].map(mirror) {
        println!(
            "{}: chunks sent {} (zeroed {}) of {}, sent bytes {}",
            m["name"], m["sync_chunks_sent"], m["sync_chunks_zeroed"], m["sync_chunks_total"], m["sent_bytes"]
        );
    }
    let counts = |m: serde_json::Value| {
        (
            m["sync_chunks_total"].as_u64().unwrap(),
            m["sync_chunks_sent"].as_u64().unwrap(),
            m["sync_chunks_zeroed"].as_u64().unwrap(),
            m["sent_bytes"].as_u64().unwrap(),
        )
    };
    assert_eq!(counts(mirror("empty")), (128, 8, 0, 8 << 20), "empty replica: only the non-zero chunks travel");
    assert_eq!(counts(mirror("seeded")), (128, 0, 0, 0), "seeded replica: only hashes travel");
    assert_eq!(counts(mirror("partial")), (128, 3, 2, 1 << 20), "partial replica: chunk 3 as data, chunks 12 and 20 (zero at the source) zeroed by flag");
    for (name, _, adir) in &appliers {
        let view = applier_status(adir);
        assert_eq!(view["replicas"][0]["consistent"], true, "{name}: {view}");
        assert!(compare(&uri, view["replicas"][0]["image"].as_str().unwrap()), "{name}: replica differs from the source");
    }
    drop(served);

    // Phase 2: a fourth, empty replica synchronises while writes go on (chunks 100..116).
    let adir = tmp.path().join("applier-late");
    let port = configure_applier(&adir, &vdir, &volume_fp, "late", None);
    appliers.push(("late", Applier::start(&adir, port), adir));
    let served = Served::start(&vdir, &[]);
    let commands: Vec<String> = (0..16).map(|i| format!("write -P {} {}M 1M", 0x10 + i, 100 + i)).chain(["flush".to_string()]).collect();
    assert!(qemu_io(&uri, &commands).status.success());
    let status = wait_all_consistent(&vdir, 4);
    println!("late: {}", status["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == "late").unwrap());
    for (name, _, adir) in &appliers {
        let view = applier_status(adir);
        assert!(compare(&uri, view["replicas"][0]["image"].as_str().unwrap()), "{name}: replica differs from the source after writes during the sync");
    }
    drop(served);
    drop(appliers);
}

/// More writes than the journal holds while the applier is down: writes wait (journal full,
/// the mirror holds the trim floor), and once the applier is back the mirror's progress frees
/// the journal, the writes complete and the replica converges. (Before the fix, an idle
/// volume applier never checkpointed again and the writes waited forever.)
#[test]
fn a_full_journal_held_by_a_mirror_drains_when_the_applier_returns() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    // The back-pressure policy: writes wait for the mirror (the default, track, is tested in
    // tests/tracking.rs).
    let (adir, vdir, port) = setup_with(tmp.path(), None, &["--on-full", "block"]);
    let applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    wait_consistent(&vdir);
    drop(applier);
    let uri = served.uri("vol0");
    // 96 MiB of writes into a 64 MiB journal, over a 32 MiB device (overwrites).
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            let commands: Vec<String> = (0..96).map(|i| format!("write -P {} {}M 1M", i % 250 + 1, i % 32)).chain(["flush".to_string()]).collect();
            qemu_io(&uri, &commands)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_json(&vdir)["volume"]["mode"] != "full" {
        assert!(Instant::now() < deadline, "the journal never filled: {}", status_json(&vdir));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!writer.is_finished(), "writes wait while the journal is full");
    let _applier = Applier::start(&adir, port);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !writer.is_finished() {
        assert!(Instant::now() < deadline, "writes still waiting after the applier returned: {}", status_json(&vdir));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(writer.join().unwrap().status.success());
    wait_caught_up(&vdir);
    assert!(compare(&uri, replica_image(&adir, "vol0").to_str().unwrap()), "replica differs after the drain");
}

/// A crash of the applier inside the journal replacement that ends the initial sync: once
/// between moving the old journal aside and moving the new one into place, once after three
/// of the old (preallocated) journal's files became the new one's spares, the rest still
/// aside. Each crash leaves the layout it should; the restarted applier opens the replica,
/// leaves nothing aside, keeps the files it took over, and converges to an equal replica.
#[test]
fn a_crash_inside_a_journal_replacement_leaves_a_replica_that_converges() {
    require_tool("qemu-io", "qemu-utils");
    // (failpoint, preallocated, files in journal / journal.new / journal.resetting after the
    // crash, files kept at least after the restart). The old journal not preallocated has its
    // segment and the spares its preparer made; a preallocated one its 16 files, and one spare
    // more if its preparer made one meanwhile.
    let cases = [("replica-journal-swap", false, [0..=0, 1..=1, 1..=16], 1), ("journal-adopt-crash=3", true, [4..=4, 0..=0, 13..=14], 4)];
    for (failpoint, preallocated, after_crash, kept_at_least) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (adir, vdir, port) = setup(tmp.path(), None);
        if preallocated {
            preallocate_journals(&adir);
        }
        let mut applier = Applier::start_with_env(&adir, port, &[("UBLK_MIRROR_FAILPOINTS", failpoint)]);
        let served = Served::start(&vdir, &[]);
        let uri = served.uri("vol0");
        let commands: Vec<String> = (0..64u64).map(|i| format!("write -P {} {} 65536", i % 250 + 1, i * 3 * 65536)).collect();
        assert!(qemu_io(&uri, &commands).status.success());
        // The sync's end replaces the replica's journal: the failpoint aborts the applier there
        // (the adoption's only with the 16 preallocated files to take over).
        let deadline = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(exit) = applier.child.try_wait().unwrap() {
                break exit;
            }
            assert!(Instant::now() < deadline, "{failpoint}: the applier did not reach the failpoint: {}", status_json(&vdir));
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!exit.success(), "{failpoint}: the applier should have aborted: {exit:?}");
        let replica = replica_image(&adir, "vol0");
        let journal = replica.with_file_name("journal");
        let beside = |suffix: &str| replica.with_file_name(format!("journal.{suffix}"));
        let layout = [segment_files(&journal), segment_files(&beside("new")), segment_files(&beside("resetting"))];
        let expected = layout.iter().zip(&after_crash).all(|(files, range)| range.contains(files));
        assert!(expected, "{failpoint}: segment files in journal, journal.new, journal.resetting after the crash: {layout:?}, expected {after_crash:?}");
        assert_eq!(journal.exists(), *after_crash[0].end() > 0, "{failpoint}: the journal's directory");

        let _applier = Applier::start(&adir, port);
        let status = wait_caught_up(&vdir);
        assert_eq!(status["mirrors"][0]["state"], "replicating", "{failpoint}: {status}");
        assert!(compare(&uri, replica.to_str().unwrap()), "{failpoint}: the replica differs from the source");
        assert!(!beside("resetting").exists() && !beside("new").exists(), "{failpoint}: a replacement's directory left behind");
        let kept = segment_files(&journal);
        assert!((kept_at_least..=16).contains(&kept), "{failpoint}: {kept} journal files after the restart");
        drop(served);
    }
}

/// `applier.toml` `preallocate_journals = true`: each new replica's journal written whole
/// when the replica is made.
fn preallocate_journals(adir: &Path) {
    let config = adir.join("applier.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\npreallocate_journals = true\n")).unwrap();
}

/// Segment files (segments and spares, `*.seg`) in a journal directory; 0 if it is missing.
fn segment_files(dir: &Path) -> usize {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".seg")).count(),
        Err(_) => 0,
    }
}
