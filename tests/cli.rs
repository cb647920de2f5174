//! `volume create`, `status` and `run` from the command line: normal use and bad input.

mod common;
use common::*;

#[test]
fn create_prints_fingerprint_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    let out = create_volume(&dir, "vol0", "64M", &["--journal-size", "8M"]);
    let fingerprints: Vec<&str> = out.lines().filter(|l| l.starts_with("sha256:")).collect();
    assert_eq!(fingerprints.len(), 1, "{out}");
    let hex = &fingerprints[0]["sha256:".len()..];
    assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{out}");
    let image = dir.join("data.img");
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "data.img is sparse");
    for file in ["volume.toml", "state.json", "identity/key.pem", "identity/cert.pem", "journal/00000000000000000001.seg"] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    let before = std::fs::read(dir.join("volume.toml")).unwrap();
    let again = cli(&["volume", "create", "--dir", dir.to_str().unwrap(), "--name", "other", "--size", "1G"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("refusing to overwrite"), "{}", stderr(&again));
    assert_eq!(std::fs::read(dir.join("volume.toml")).unwrap(), before, "nothing changed");

    let status = status_json(&dir);
    assert_eq!(status["volume"]["name"], "vol0");
    assert_eq!(status["volume"]["size"], 64u64 << 20);
    assert_eq!(status["volume"]["last_lsn"], 0);
    assert_eq!(status["volume"]["mode"], "stopped");
    assert_eq!(status["journal"]["used_bytes"], 0);
    assert!(status["journal"]["capacity_bytes"].as_u64().unwrap() > 7 << 20);
    let text = cli(&["status", "--dir", dir.to_str().unwrap()]);
    assert!(stdout(&text).contains("volume vol0"), "{}", stdout(&text));
}

/// `--preallocate-journal` writes every segment (journal size / segment size), whole, and
/// the volume serves from them.
#[test]
fn create_can_preallocate_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    let out = create_volume(&dir, "vol0", "16M", &["--journal-size", "16M", "--segment-size", "2M", "--preallocate-journal"]);
    assert!(out.contains("preallocated: 8 segment files"), "{out}");
    let files: Vec<_> = std::fs::read_dir(dir.join("journal")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 8, "{files:?}");
    for file in &files {
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!(meta.len(), 2 << 20, "{}", file.display());
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 2 << 20, "{} is written, not sparse", file.display());
    }
    let mut served = Served::start(&dir, &[]);
    let mut client = common::nbd_client::NbdClient::connect(&served.socket, "vol0").unwrap();
    for i in 0..64u64 {
        assert_eq!(client.write(i * 131072, &vec![i as u8 + 1; 131072]), 0);
    }
    assert_eq!(client.flush(), 0);
    drop(client);
    assert_eq!(served.terminate(), Some(0));
    assert_eq!(std::fs::read_dir(dir.join("journal")).unwrap().count(), 8, "the journal used its spares, made no file");
    let image = std::fs::read(dir.join("data.img")).unwrap();
    assert!((0..64usize).all(|i| image[i * 131072..(i + 1) * 131072].iter().all(|&b| b == i as u8 + 1)), "every write reached the backing store");
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--size".into(), "12Q".into()], "invalid size"),
        (vec!["--size".into(), "1000".into()], "multiple of 512"),
        (vec!["--size".into(), "0".into()], "multiple of 512"),
        (vec!["--size".into(), "64M".into(), "--backing".into(), path("missing.img")], "does not exist"),
        (vec!["--size".into(), "64M".into(), "--backing".into(), path("small.img")], "is 1048576 bytes but the volume is 67108864 bytes"),
        (vec!["--size".into(), "64M".into(), "--journal-size".into(), "1M".into()], "journal"),
        (vec!["--size".into(), "64M".into(), "--name".into(), "bad/name".into()], "may hold only"),
    ];
    std::fs::write(tmp.path().join("small.img"), vec![0u8; 1 << 20]).unwrap();
    for (extra, expected) in cases {
        let dir = path("vol");
        let mut args: Vec<String> = vec!["volume".into(), "create".into(), "--dir".into(), dir.clone()];
        if !extra.contains(&"--name".to_string()) {
            args.extend(["--name".into(), "v".into()]);
        }
        args.extend(extra.clone());
        let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!output.status.success(), "{extra:?} was accepted");
        assert!(stderr(&output).contains(expected), "{extra:?}: {}", stderr(&output));
        assert!(!tmp.path().join("vol").exists(), "{extra:?} left a directory behind");
    }
    assert_eq!(std::fs::read(tmp.path().join("small.img")).unwrap().len(), 1 << 20);

    // An existing backing file of the right size is used as it is.
    std::fs::write(tmp.path().join("right.img"), vec![7u8; 1 << 20]).unwrap();
    create_volume(&tmp.path().join("vol2"), "v2", "1M", &["--backing", &path("right.img"), "--journal-size", "4M"]);
    assert_eq!(std::fs::read(tmp.path().join("right.img")).unwrap(), vec![7u8; 1 << 20]);

    // status and run on a directory without a volume.
    let output = cli(&["status", "--dir", &path("nothing")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("holds no volume"), "{}", stderr(&output));
    let output = cli(&["run", "--dir", &path("vol2")]);
    assert!(stderr(&output).contains("nothing to serve"), "{}", stderr(&output));
    let output = cli(&["run", "--dir", &path("vol2"), "--nbd", "udp:1"]);
    assert!(stderr(&output).contains("unix:PATH or tcp:HOST:PORT"), "{}", stderr(&output));
    let output = cli(&["volume", "create"]);
    assert_eq!(output.status.code(), Some(2), "usage errors exit 2");

    // A backing file that vanished: run refuses with the path.
    std::fs::remove_file(tmp.path().join("right.img")).unwrap();
    let output = cli(&["run", "--dir", &path("vol2"), "--nbd", &format!("unix:{}", path("s.sock"))]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("right.img does not exist"), "{}", stderr(&output));
}

#[test]
fn status_is_live_while_running_and_a_second_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "live", "16M", &["--journal-size", "8M"]);
    let mut served = Served::start(&dir, &[]);
    let mut client = nbd_client::NbdClient::connect(&served.socket, "live").unwrap();
    for i in 0..10u64 {
        assert_eq!(client.write(i * 4096, &[i as u8; 4096]), 0);
    }
    assert_eq!(client.flush(), 0);
    let status = status_json(&dir);
    assert_eq!(status["volume"]["running"], true);
    assert_eq!(status["volume"]["mode"], "journaling");
    assert_eq!(status["volume"]["last_lsn"], 10);
    assert!(status["journal"]["used_bytes"].as_u64().unwrap() >= 10 * 4096);
    assert_eq!(status["volume"]["exports"][0], format!("unix:{}", served.socket.display()));

    let second = cli(&["run", "--dir", dir.to_str().unwrap(), "--nbd", &format!("unix:{}", tmp.path().join("b.sock").display())]);
    assert_eq!(second.status.code(), Some(1));
    assert!(stderr(&second).contains("in use by another process"), "{}", stderr(&second));

    client.disconnect();
    assert_eq!(served.terminate(), Some(0), "SIGTERM exits 0: {}", served.log_text());
    let status = status_json(&dir);
    assert_eq!(status["volume"]["running"], false);
    assert_eq!(status["volume"]["last_lsn"], 10);
    assert_eq!(status["volume"]["clean_shutdown"], true);
    assert_eq!(status["volume"]["applied_lsn"], 10);
    // Everything reached the backing file.
    let image = std::fs::read(dir.join("data.img")).unwrap();
    for i in 0..10usize {
        assert!(image[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8));
    }
}

/// On a host without the ublk driver (the VM tests cover the driver's own errors), `run --ublk`
/// says what to load, exits 1 and leaves the volume untouched (not even opened).
#[test]
fn run_ublk_without_the_driver_says_what_to_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "vol0", "64M", &["--journal-size", "8M"]);
    let state_before = std::fs::read(dir.join("state.json")).unwrap();
    let output = cli(&["run", "--dir", dir.to_str().unwrap(), "--ublk"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    if std::path::Path::new("/dev/ublk-control").exists() {
        // A ublk host: the guest scripts (tests/ublk_vm.rs) run natively and check the errors.
        return;
    }
    assert!(stderr(&output).contains("load the ublk_drv module: modprobe ublk_drv; needs Linux >= 6.0 with CONFIG_BLK_DEV_UBLK"), "{}", stderr(&output));
    assert_eq!(std::fs::read(dir.join("state.json")).unwrap(), state_before, "state unchanged");
    assert!(!dir.join("ublk-device.json").exists());
    let nothing = cli(&["run", "--dir", dir.to_str().unwrap()]);
    assert!(stderr(&nothing).contains("nothing to serve"), "{}", stderr(&nothing));
}
