//! Compression of record batches on the wire (protocol 6), end to end through the binaries:
//! applier + `run` on loopback, real QUIC. Compressible data travels compressed and the
//! replica converges byte-equal; random data goes raw; `mirror set --compression` applies to
//! the running volume; bad settings are refused and change nothing.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// A volume with a mirror to a fresh applier, `mirror add` given `mirror_args`.
fn site(tmp: &Path, mirror_args: &[&str]) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    site_through(tmp, mirror_args, |port| format!("127.0.0.1:{port}"))
}

/// [`site`] with the mirror sent to `to(applier port)` (a relay in front of the applier).
fn site_through(tmp: &Path, mirror_args: &[&str], to: impl FnOnce(u16) -> String) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let adir = tmp.join("applier");
    let vdir = tmp.join("vol");
    // The journal holds twice the largest backlog written here: past 3/4 full the mirror
    // would give way to a dirty-map resync (retention's high water), which is not what
    // these tests measure.
    let volume_fp = fingerprint_line(&create_volume(&vdir, "vol0", "64M", &["--journal-size", "96M", "--segment-size", "8M"]));
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let applier_fp = fingerprint_line(&stdout(&output));
    assert!(cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success());
    let port = free_udp_port();
    let address = to(port);
    let mut args = vec!["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &address, "--fingerprint", &applier_fp];
    args.extend_from_slice(mirror_args);
    let output = cli(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    (adir, vdir, port)
}

/// Text-like data: compresses several times over, like logs or source files.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let words = ["replica ", "journal ", "batch ", "record ", "volume ", "mirror ", "applier ", "checkpoint\n"];
    let mut out = Vec::with_capacity(len + 16);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    while out.len() < len {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(state >> 60) as usize % words.len()].as_bytes());
        out.extend_from_slice(format!("{} ", (state >> 40) % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut out = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// Writes `data` at `offset` in 256 KiB requests, then flushes.
fn write(served: &Served, offset: u64, data: &[u8]) {
    let mut client = nbd_client::NbdClient::connect(&served.socket, "vol0").expect("connect");
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        assert_eq!(client.write(offset + (i * (256 << 10)) as u64, piece), 0);
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
}

/// The mirror's wire and payload counters and its compressed batches.
fn counters(status: &serde_json::Value) -> (u64, u64, u64) {
    let m = &status["mirrors"][0];
    (m["sent_bytes"].as_u64().unwrap(), m["payload_bytes"].as_u64().unwrap(), m["compressed_batches"].as_u64().unwrap())
}

#[test]
fn zstd_compresses_text_sends_random_data_raw_and_can_be_switched_off_live() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = site(tmp.path(), &["--compression", "zstd:3"]);
    let _applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    wait_consistent(&vdir);
    let start = counters(&status_json(&vdir));
    assert_eq!(status_json(&vdir)["mirrors"][0]["compression"], "zstd:3");

    // Compressible: 16 MiB of text.
    write(&served, 0, &compressible(16 * MIB, 1));
    let status = wait_caught_up(&vdir);
    let text = counters(&status);
    let (sent, payload, batches) = (text.0 - start.0, text.1 - start.1, text.2 - start.2);
    eprintln!("zstd:3 on text: {payload} payload bytes as {sent} on the wire ({:.2}x) in {batches} compressed batches", payload as f64 / sent as f64);
    assert_eq!(payload, 16 * MIB as u64, "{status}");
    assert!(sent * 2 < payload, "text must at least halve: {sent} of {payload}");
    assert!(batches > 0);
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs from the source");
    let table = stdout(&cli(&["status", "--dir", vdir.to_str().unwrap()]));
    assert!(table.contains("COMPRESSION") && table.contains("zstd:3 "), "{table}");

    // Incompressible: 8 MiB of random bytes go raw, plus only the frame headers.
    write(&served, 16 * MIB as u64, &random(8 * MIB, 2));
    let status = wait_caught_up(&vdir);
    let after = counters(&status);
    let (sent, payload, batches) = (after.0 - text.0, after.1 - text.1, after.2 - text.2);
    eprintln!("zstd:3 on random data: {payload} payload bytes as {sent} on the wire, {batches} compressed batches");
    assert_eq!(payload, 8 * MIB as u64);
    assert!(sent >= payload && sent <= payload + payload / 100, "raw batches cost only their headers: {sent} for {payload}");
    assert_eq!(batches, 0, "no random batch shrinks by 5%");
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs from the source");

    // Off, on the running volume: text goes raw from now on.
    let output = cli(&["mirror", "set", "--dir", vdir.to_str().unwrap(), "--compression", "off"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("compression off") && stdout(&output).contains("applied to the running volume"), "{}", stdout(&output));
    assert_eq!(status_json(&vdir)["mirrors"][0]["compression"], "off");
    write(&served, 24 * MIB as u64, &compressible(8 * MIB, 3));
    let status = wait_caught_up(&vdir);
    let off = counters(&status);
    let (sent, payload, batches) = (off.0 - after.0, off.1 - after.1, off.2 - after.2);
    assert_eq!(payload, 8 * MIB as u64);
    assert_eq!(batches, 0, "nothing compressed once off");
    assert!(sent >= payload && sent <= payload + payload / 100, "{sent} for {payload}");
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs from the source");
    let config = std::fs::read_to_string(vdir.join("mirrors/mirror.toml")).unwrap();
    assert!(config.contains("compression = \"off\""), "{config}");

    // And on again, on the same connection: compressed from the next batch.
    let output = cli(&["mirror", "set", "--dir", vdir.to_str().unwrap(), "--compression", "zstd:1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    write(&served, 32 * MIB as u64, &compressible(8 * MIB, 6));
    let status = wait_caught_up(&vdir);
    let on = counters(&status);
    let (sent, payload, batches) = (on.0 - off.0, on.1 - off.1, on.2 - off.2);
    assert_eq!(payload, 8 * MIB as u64);
    assert!(batches > 0 && sent * 2 < payload, "compressed again: {sent} for {payload} in {batches} batches");
    assert_eq!(status["mirrors"][0]["reconnects"], 0, "{status}");
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs from the source");
}

/// `auto` (the default) compresses once the link is the bottleneck: under a rate limit.
#[test]
fn auto_compresses_under_a_rate_limit() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = site(tmp.path(), &["--max-rate", "4M"]);
    let _applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    wait_consistent(&vdir);
    assert_eq!(status_json(&vdir)["mirrors"][0]["compression"], "auto");
    let started = Instant::now();
    write(&served, 0, &compressible(32 * MIB, 4));
    let status = wait_caught_up(&vdir);
    let elapsed = started.elapsed();
    let (sent, payload, batches) = counters(&status);
    eprintln!("auto at 4 MiB/s: {payload} bytes as {sent} ({:.2}x) in {elapsed:?}, {batches} compressed batches", payload as f64 / sent as f64);
    assert!(batches > 0 && sent * 2 < payload, "{status}");
    // The level of the last batch sent: auto's 1..=3, or null if that batch went raw.
    let level = &status["mirrors"][0]["compression_level"];
    assert!(level.is_null() || level.as_i64().is_some_and(|level| (1..=3).contains(&level)), "{status}");
    assert!(status["mirrors"][0].as_object().unwrap().contains_key("compression_level"), "{status}");
    // 32 MiB raw at 4 MiB/s would take 8 s; compressed about 2 s (slack for a busy machine).
    assert!(elapsed < Duration::from_secs(6), "compressed data passes the limit faster: {elapsed:?}");
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs from the source");
}

/// `auto` also compresses without a limit once the sender waits on the link: here a relay
/// at 20 ms RTT and 10 MB/s.
#[test]
fn auto_compresses_when_the_link_is_slower_than_the_sender() {
    require_tool("qemu-img", "qemu-utils");
    use common::relay::{Impairment, Relay};
    let tmp = tempfile::tempdir().unwrap();
    let link = Impairment::wan(Duration::from_millis(20), 0.0, Some(10_000_000));
    let mut relay = None;
    let (adir, vdir, port) = site_through(tmp.path(), &[], |port| {
        let started = Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), link, Impairment { rate: None, ..link }, 9);
        let address = started.address().to_string();
        relay = Some(started);
        address
    });
    let _applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    wait_consistent(&vdir);
    let started = Instant::now();
    write(&served, 0, &compressible(48 * MIB, 5));
    let status = wait_caught_up(&vdir);
    let (sent, payload, batches) = counters(&status);
    eprintln!(
        "auto through a 10 MB/s link: {payload} bytes as {sent} ({:.2}x) in {:?}, {batches} compressed batches",
        payload as f64 / sent as f64,
        started.elapsed()
    );
    // The first second goes raw: then the sender has shown it waits on the link.
    assert!(batches > 0 && sent * 4 < payload * 3, "{status}");
    assert!(compare(&served.uri("vol0"), replica_image(&adir, "vol0").to_str().unwrap()), "replica differs from the source");
    drop(relay);
}

#[test]
fn bad_compression_settings_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (_adir, vdir, _port) = site(tmp.path(), &[]);
    let file = vdir.join("mirrors/mirror.toml");
    let before = std::fs::read(&file).unwrap();
    for bad in ["zstd:99", "zstd:0", "lz4", "zstd:fast", ""] {
        let output = cli(&["mirror", "set", "--dir", vdir.to_str().unwrap(), "--compression", bad]);
        assert!(!output.status.success(), "{bad:?} accepted");
        let message = stderr(&output);
        assert!(message.contains("not a compression setting") && message.contains("zstd:LEVEL"), "{bad:?}: {message}");
        assert_eq!(std::fs::read(&file).unwrap(), before, "{bad:?} changed the file");
    }
    let output = cli(&[
        "mirror",
        "add",
        "--dir",
        vdir.to_str().unwrap(),
        "--to",
        "127.0.0.1:9",
        "--fingerprint",
        &format!("sha256:{}", "ab".repeat(32)),
        "--name",
        "other",
        "--compression",
        "gzip",
    ]);
    assert!(!output.status.success() && stderr(&output).contains("not a compression setting"), "{}", stderr(&output));
    assert!(!vdir.join("mirrors/other.toml").exists());
    // A hand-edited file: the error names the file and the key.
    let text = String::from_utf8(before.clone()).unwrap() + "compression = \"zstd:23\"\n";
    std::fs::write(&file, text).unwrap();
    let output = cli(&["mirror", "set", "--dir", vdir.to_str().unwrap(), "--idle-timeout", "20"]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.contains("mirror.toml") && message.contains("compression") && message.contains("zstd:23"), "{message}");
    std::fs::write(&file, &before).unwrap();
    // Good ones are kept as given.
    for good in ["zstd", "zstd:19", "zstd:-3", "auto", "off"] {
        let output = cli(&["mirror", "set", "--dir", vdir.to_str().unwrap(), "--compression", good]);
        assert!(output.status.success(), "{good}: {}", stderr(&output));
    }
    assert_eq!(status_json(&vdir)["mirrors"][0]["compression"], "off");
}

/// A source of another protocol version (here: 5, the one before compression) is refused
/// over real QUIC before the applier makes a replica, with a message naming both versions.
#[test]
fn a_sender_of_another_protocol_version_is_refused_naming_both() {
    use ublk_mirror::protocol::{framing, tls, transport, wire};
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port) = site(tmp.path(), &[]);
    let _applier = Applier::start(&adir, port);
    let identity = tls::Identity::load(&vdir.join("identity")).unwrap();
    let applier_fp = applier_status(&adir)["fingerprint"].as_str().unwrap().to_string();
    let volume = status_json(&vdir);
    let uuid = uuid::Uuid::parse_str(volume["volume"]["uuid"].as_str().unwrap()).unwrap();
    let generation = uuid::Uuid::parse_str(volume["volume"]["generation"].as_str().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for theirs in [wire::PROTOCOL_VERSION - 1, wire::PROTOCOL_VERSION + 1] {
        let hello = wire::Hello {
            protocol: theirs,
            volume_uuid: *uuid.as_bytes(),
            volume_name: "vol0".into(),
            size: 64 << 20,
            generation: *generation.as_bytes(),
            first_lsn: 1,
            last_lsn: 0,
            history: vec![wire::WireGeneration { id: *generation.as_bytes(), parent: None, branch_lsn: 0, created_us: 0 }],
        };
        let answer = runtime.block_on(async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(
                transport::client_config(&identity, &applier_fp, Duration::from_secs(15), transport::Congestion::default()).unwrap(),
            );
            let connection = endpoint.connect(format!("127.0.0.1:{port}").parse().unwrap(), "applier").unwrap().await.unwrap();
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            framing::write_control(&mut send, &wire::Control::Hello(hello)).await.unwrap();
            framing::read_frame(&mut recv).await.unwrap()
        });
        let Some(wire::Frame::Control(wire::Control::Refused(refusal))) = answer else { panic!("protocol {theirs}: {answer:?}") };
        let text = refusal.to_string();
        assert!(text.contains(&format!("protocol {theirs} ")) && text.contains(&format!("protocol {}:", wire::PROTOCOL_VERSION)), "{text}");
        assert!(applier_status(&adir)["replicas"].as_array().is_none_or(|r| r.is_empty()), "no replica made for protocol {theirs}");
    }
}
