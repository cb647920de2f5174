//! Fan-in: many sources into one applier, replicas kept by source (`replicas/SOURCE/NAME`),
//! so sources' volumes of one name live side by side; and an applier directory of the layout
//! before that (`replicas/NAME`) keeps working: its replica is bound to its source at the
//! first connection, without a resync.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// The id an applier gives a source: the first 16 hex digits of its fingerprint.
fn source_id(fingerprint: &str) -> String {
    fingerprint.strip_prefix("sha256:").unwrap()[..16].to_string()
}

/// Makes the applier directory; returns its fingerprint.
fn init_applier(adir: &Path) -> String {
    let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    fingerprint_line(&stdout(&output))
}

/// A volume of 8 MiB mirrored to the applier in `adir` (allowed there, pinned by its
/// fingerprint `applier_fp`) on `port`; returns the volume's fingerprint.
fn mirrored_volume(vdir: &Path, name: &str, adir: &Path, applier_fp: &str, port: u16) -> String {
    let fingerprint = fingerprint_line(&create_volume(vdir, name, "8M", &["--journal-size", "8M", "--segment-size", "2M"]));
    let output = cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &fingerprint]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", applier_fp, "--name", "m"]);
    assert!(output.status.success(), "{}", stderr(&output));
    fingerprint
}

/// Writes a pattern of its own to each of a few places of the volume, and flushes.
fn write_pattern(uri: &str, byte: u8) {
    let commands: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {} {} {}", byte.wrapping_add(i as u8), (i * 7 + byte as u64) % 120 * 65536, 4096 * (1 + i % 8)))
        .chain(["flush".to_string()])
        .collect();
    let output = qemu_io(uri, &commands);
    assert!(output.status.success(), "{}", stderr(&output));
}

struct Source {
    name: &'static str,
    vdir: PathBuf,
    fingerprint: String,
    served: Served,
}

#[test]
fn eight_sources_four_named_alike_into_one_applier() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("applier");
    let applier_fp = init_applier(&adir);
    let port = free_udp_port();
    let names = ["vol0", "vol0", "vol0", "vol0", "db", "web", "logs", "mail"];
    let volumes: Vec<(PathBuf, String)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let vdir = tmp.path().join(format!("host{i}"));
            let fingerprint = mirrored_volume(&vdir, name, &adir, &applier_fp, port);
            (vdir, fingerprint)
        })
        .collect();
    let _applier = Applier::start(&adir, port);
    // All eight at once: each is served and starts its mirror; then each gets its own data.
    let sources: Vec<Source> = names
        .iter()
        .zip(volumes)
        .map(|(name, (vdir, fingerprint))| {
            let served = Served::start(&vdir, &[]);
            Source { name, vdir, fingerprint, served }
        })
        .collect();
    std::thread::scope(|scope| {
        for (i, source) in sources.iter().enumerate() {
            let uri = source.served.uri(source.name);
            scope.spawn(move || write_pattern(&uri, 10 + 20 * i as u8));
        }
    });
    for source in &sources {
        wait_caught_up(&source.vdir);
    }

    let status = applier_status(&adir);
    let replicas = status["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 8, "{status}");
    for source in &sources {
        let id = source_id(&source.fingerprint);
        let replica = replicas
            .iter()
            .find(|r| r["volume"] == source.name && r["source"] == id.as_str())
            .unwrap_or_else(|| panic!("no replica of {} from {id}: {status}", source.name));
        assert_eq!(replica["source_fingerprint"], source.fingerprint.as_str());
        assert_eq!(replica["connected"], true);
        assert_eq!(replica["consistent"], true);
        let image = adir.join("replicas").join(&id).join(source.name).join("data.img");
        assert_eq!(replica["image"], image.to_str().unwrap(), "the layout is replicas/SOURCE/NAME");
        assert!(compare(&source.served.uri(source.name), image.to_str().unwrap()), "the replica of {} from {id} differs from its source", source.name);
    }
    let text = stdout(&cli(&["applier", "status", "--dir", adir.to_str().unwrap()]));
    for source in &sources {
        let id = source_id(&source.fingerprint);
        assert!(text.lines().any(|l| l.contains(source.name) && l.contains(&format!("source {id}"))), "{text}");
    }

    // A marker on one of the vol0s: a snapshot of that replica only.
    let marked = &sources[2];
    let marked_id = source_id(&marked.fingerprint);
    let output = cli(&["marker", "create", "--dir", marked.vdir.to_str().unwrap(), "--name", "m1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_caught_up(&marked.vdir);

    // The name alone is ambiguous: refused, naming the candidates.
    let adir_text = adir.to_str().unwrap();
    let output = cli(&["applier", "snapshot", "list", "--dir", adir_text, "--volume", "vol0", "--json"]);
    assert!(!output.status.success(), "an ambiguous name is refused");
    let error = stderr(&output);
    assert!(error.contains("4 replicas of vol0") && error.contains("--source"), "{error}");
    for source in &sources[..4] {
        assert!(error.contains(&source_id(&source.fingerprint)), "the candidates are listed: {error}");
    }
    let promote = cli(&["applier", "replica", "promote", "--dir", adir_text, "--volume", "vol0", "--to", tmp.path().join("promoted").to_str().unwrap()]);
    assert!(!promote.status.success() && stderr(&promote).contains("--source"), "{}", stderr(&promote));
    // With --source (a prefix of the id) it is the one replica.
    let output = cli(&["applier", "snapshot", "list", "--dir", adir_text, "--volume", "vol0", "--source", &marked_id[..8], "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let snapshots = listed["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 1, "{listed}");
    assert_eq!((snapshots[0]["name"].as_str(), snapshots[0]["source"].as_str()), (Some("m1"), Some(marked_id.as_str())));
    let other_id = source_id(&sources[0].fingerprint);
    let output = cli(&["applier", "snapshot", "list", "--dir", adir_text, "--volume", "vol0", "--source", &other_id, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["snapshots"].as_array().unwrap().is_empty());
    // Through the running applier: the source is connected, so a promote needs --force; the
    // replica was found.
    let promote = cli(&[
        "applier",
        "replica",
        "promote",
        "--dir",
        adir_text,
        "--volume",
        "vol0",
        "--source",
        &other_id,
        "--to",
        tmp.path().join("promoted").to_str().unwrap(),
    ]);
    assert!(!promote.status.success() && stderr(&promote).contains("is connected"), "{}", stderr(&promote));
    // A unique name needs no --source.
    let output = cli(&["applier", "snapshot", "list", "--dir", adir_text, "--volume", "db", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn an_old_flat_replica_is_bound_to_its_source_without_a_resync() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("applier");
    let applier_fp = init_applier(&adir);
    let port = free_udp_port();
    let vdir = tmp.path().join("vol");
    let fingerprint = mirrored_volume(&vdir, "vol0", &adir, &applier_fp, port);
    let id = source_id(&fingerprint);
    let mut applier = Applier::start(&adir, port);
    let mut served = Served::start(&vdir, &[]);
    write_pattern(&served.uri("vol0"), 3);
    wait_caught_up(&vdir);
    assert_eq!(served.terminate(), Some(0));
    applier.kill9();

    // The layout before replicas were kept by source: replicas/vol0, its state naming the
    // image there.
    let keyed = adir.join("replicas").join(&id).join("vol0");
    let flat = adir.join("replicas/vol0");
    std::fs::rename(&keyed, &flat).unwrap();
    std::fs::remove_dir_all(adir.join("replicas").join(&id)).unwrap();
    let state_path = flat.join("replica.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["image"] = flat.join("data.img").to_str().unwrap().into();
    std::fs::write(&state_path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    let applied = state["applied_lsn"].as_u64().unwrap();

    // Read as it is while no source connected: listed, consistent, no source yet.
    let offline = applier_status(&adir);
    assert_eq!(offline["replicas"].as_array().unwrap().len(), 1, "{offline}");
    assert_eq!(offline["replicas"][0]["source"], serde_json::Value::Null, "{offline}");
    assert_eq!(offline["replicas"][0]["consistent"], true, "{offline}");
    let output = cli(&["applier", "snapshot", "list", "--dir", adir.to_str().unwrap(), "--volume", "vol0"]);
    assert!(output.status.success(), "an unbound replica is usable by name: {}", stderr(&output));

    // The source's first connection binds it: moved, not copied, and the mirror resumes.
    let _applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    write_pattern(&served.uri("vol0"), 77);
    let status = wait_caught_up(&vdir);
    let mirror = &status["mirrors"][0];
    assert_eq!(mirror["sync_chunks_sent"], 0, "no initial synchronisation: {status}");
    assert_eq!(mirror["sync_chunks_total"], 0, "no initial synchronisation: {status}");
    assert_eq!(mirror["resync_total_bytes"], 0, "no resync: {status}");
    assert!(!flat.exists(), "the old directory moved");
    let view = applier_status(&adir);
    let replica = &view["replicas"][0];
    assert_eq!(view["replicas"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(replica["source"], id.as_str(), "{view}");
    assert_eq!(replica["image"], keyed.join("data.img").to_str().unwrap(), "{view}");
    assert!(replica["records_received"].as_u64().unwrap() > 0 && replica["applied_lsn"].as_u64().unwrap() > applied, "{view}");
    assert!(compare(&served.uri("vol0"), keyed.join("data.img").to_str().unwrap()), "replica differs after the migration");
    let log = std::fs::read_to_string(adir.with_extension("log")).unwrap();
    assert!(log.contains("replica bound to its source"), "the move is logged: {log}");
}

#[test]
fn an_image_attached_for_one_source_and_a_twin_fingerprint_refused() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("applier");
    let applier_fp = init_applier(&adir);
    let port = free_udp_port();
    let ours = mirrored_volume(&tmp.path().join("a"), "vol0", &adir, &applier_fp, port);
    let theirs = mirrored_volume(&tmp.path().join("b"), "vol0", &adir, &applier_fp, port);
    let adir_text = adir.to_str().unwrap();

    // A fingerprint whose first 16 hex digits an allowed one has: refused.
    let twin = format!("{}{}", &ours[..7 + 16], "0".repeat(48));
    let output = cli(&["applier", "allow", "--dir", adir_text, &twin]);
    assert!(!output.status.success() && stderr(&output).contains("shares its first 16 hex digits"), "{}", stderr(&output));

    let image = tmp.path().join("seed.img");
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    let output = cli(&["applier", "replica", "add", "--dir", adir_text, "--volume", "vol0", "--source", "ffff", "--image", image.to_str().unwrap()]);
    assert!(!output.status.success() && stderr(&output).contains("no allowed fingerprint"), "{}", stderr(&output));
    let id = source_id(&ours);
    let output = cli(&["applier", "replica", "add", "--dir", adir_text, "--volume", "vol0", "--source", &id[..6], "--image", image.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    // Both vol0s connect: ours gets the attached image, theirs a new one of its own.
    let _applier = Applier::start(&adir, port);
    let a = Served::start(&tmp.path().join("a"), &[]);
    let b = Served::start(&tmp.path().join("b"), &[]);
    write_pattern(&a.uri("vol0"), 1);
    write_pattern(&b.uri("vol0"), 2);
    wait_caught_up(&tmp.path().join("a"));
    wait_caught_up(&tmp.path().join("b"));
    let status = applier_status(&adir);
    let of = |fingerprint: &str| status["replicas"].as_array().unwrap().iter().find(|r| r["source_fingerprint"] == fingerprint).cloned().unwrap();
    assert_eq!(of(&ours)["image"], image.to_str().unwrap(), "{status}");
    let their_image = adir.join("replicas").join(source_id(&theirs)).join("vol0/data.img");
    assert_eq!(of(&theirs)["image"], their_image.to_str().unwrap(), "{status}");
    assert!(compare(&a.uri("vol0"), image.to_str().unwrap()));
    assert!(compare(&b.uri("vol0"), their_image.to_str().unwrap()));
}

/// Two mirrors of one volume to the same applier feed one replica: the second is refused
/// while the first is connected, naming why, and does not take the first one's place (a
/// reconnect of the same mirror would: it supersedes its own stale session).
#[test]
fn a_second_mirror_of_a_volume_to_the_same_applier_is_refused_not_swapped_in() {
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("applier");
    let applier_fp = init_applier(&adir);
    let port = free_udp_port();
    let vdir = tmp.path().join("vol");
    mirrored_volume(&vdir, "vol0", &adir, &applier_fp, port);
    let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--fingerprint", &applier_fp, "--name", "twin"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let _applier = Applier::start(&adir, port);
    let mut served = Served::start(&vdir, &[]);
    // Within 60 s one mirror is connected and the other has been refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let refused = loop {
        let mirrors = status_json(&vdir)["mirrors"].as_array().unwrap().clone();
        let connected = mirrors.iter().filter(|m| m["connected"] == true).count();
        let refused = mirrors.iter().find(|m| m["connected"] != true && m["last_error"].as_str().is_some_and(|e| e.contains("by another sender")));
        if let (1, Some(refused)) = (connected, refused) {
            break refused["name"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "expected one mirror connected and one refused: {mirrors:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // For the next 5 s (several retries of the refused one) the first keeps its session.
    let sessions = applier_status(&adir)["replicas"][0]["connections"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(5));
    let mirrors = status_json(&vdir)["mirrors"].as_array().unwrap().clone();
    let kept = mirrors.iter().find(|m| m["name"] != refused).unwrap();
    assert_eq!(kept["connected"], true, "{mirrors:?}");
    assert_eq!(applier_status(&adir)["replicas"][0]["connections"].as_u64().unwrap(), sessions, "no session was swapped in");
    let log = std::fs::read_to_string(tmp.path().join("applier.log")).unwrap_or_default();
    assert!(!log.contains("supersedes"), "{log}");
    assert_eq!(served.terminate(), Some(0));
}
