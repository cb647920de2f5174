//! The NBD export with real clients from qemu-utils: qemu-io writes patterned data (many
//! sizes and offsets, FUA, discard, write-zeroes, requests in flight together), reads it back,
//! and qemu-img compares the export and the backing file with an expected image.

mod common;
use common::*;

const SIZE: usize = 64 << 20;

enum Op {
    Pattern(u8, usize, usize),
    Zero(usize, usize),
}

fn apply(image: &mut [u8], ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Pattern(byte, offset, len) => image[offset..offset + len].fill(byte),
            Op::Zero(offset, len) => image[offset..offset + len].fill(0),
        }
    }
}

#[test]
fn qemu_io_patterns_and_qemu_img_compare() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "vol0", "64M", &["--journal-size", "64M", "--segment-size", "8M"]);
    let mut served = Served::start(&dir, &[]);
    let uri = served.uri("vol0");

    // (qemu-io command, effect on the expected image)
    let steps: Vec<(String, Op)> = vec![
        ("write -P 0x11 0 512".into(), Op::Pattern(0x11, 0, 512)),
        ("write -P 0x22 4096 4096".into(), Op::Pattern(0x22, 4096, 4096)),
        ("write -f -P 0x33 8192 65536".into(), Op::Pattern(0x33, 8192, 65536)),
        ("write -P 0x44 1048576 1048576".into(), Op::Pattern(0x44, 1 << 20, 1 << 20)),
        // Larger than the advertised maximum I/O: qemu splits it.
        ("write -P 0x55 3000000 5242880".into(), Op::Pattern(0x55, 3_000_000, 5 << 20)),
        ("write -P 0x66 100 300".into(), Op::Pattern(0x66, 100, 300)),
        ("discard 4096 4096".into(), Op::Zero(4096, 4096)),
        ("write -z 1048576 65536".into(), Op::Zero(1 << 20, 65536)),
        ("write -z -u 3100000 200000".into(), Op::Zero(3_100_000, 200_000)),
        ("write -f -z 9000000 12345".into(), Op::Zero(9_000_000, 12345)),
        ("write -P 0x77 62914560 4194304".into(), Op::Pattern(0x77, 62914560, 4 << 20)),
        ("discard 33554432 8388608".into(), Op::Zero(32 << 20, 8 << 20)),
    ];
    let mut commands: Vec<String> = steps.iter().map(|(c, _)| c.clone()).collect();
    // Many requests in flight at once.
    for i in 0..64usize {
        commands.push(format!("aio_write -P {} {} 4096", 0x80 + (i % 64), (16 << 20) + i * 8192));
    }
    commands.push("aio_flush".into());
    commands.push("flush".into());
    let mut ops: Vec<Op> = steps.into_iter().map(|(_, op)| op).collect();
    for i in 0..64usize {
        ops.push(Op::Pattern((0x80 + (i % 64)) as u8, (16 << 20) + i * 8192, 4096));
    }
    let output = qemu_io(&uri, &commands);
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert!(output.status.success(), "{text}");
    assert!(!text.contains("failed") && !text.contains("error"), "{text}");

    // Read back with pattern checks (qemu-io reports "Pattern verification failed").
    let checks = [
        "read -P 0x11 0 100",
        "read -P 0x66 100 300",
        "read -P 0x11 400 112",
        "read -P 0 4096 4096",
        "read -P 0x33 8192 65536",
        "read -P 0 1048576 65536",
        "read -P 0x44 1114112 983040",
        "read -P 0 2097152 902848",
        "read -P 0x55 3000000 100000",
        "read -P 0 3100000 200000",
        "read -P 0x55 3300000 4942880",
        "read -P 0 33554432 8388608",
        "read -P 0x77 62914560 4194304",
    ];
    let output = qemu_io(&uri, &checks);
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert!(output.status.success() && !text.contains("Pattern verification failed"), "{text}");

    let mut expected = vec![0u8; SIZE];
    apply(&mut expected, &ops);
    let expected_path = tmp.path().join("expected.img");
    std::fs::write(&expected_path, &expected).unwrap();
    let compare = std::process::Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", expected_path.to_str().unwrap(), &uri]).output().unwrap();
    assert!(compare.status.success(), "export differs: {}{}", stdout(&compare), stderr(&compare));

    // A wrong byte in the expectation must be noticed (the comparison is real).
    let mut wrong = expected.clone();
    wrong[5_000_000] ^= 1;
    std::fs::write(tmp.path().join("wrong.img"), &wrong).unwrap();
    let compare = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", tmp.path().join("wrong.img").to_str().unwrap(), &uri])
        .output()
        .unwrap();
    assert_eq!(compare.status.code(), Some(1), "qemu-img compare must see the difference");

    // Unknown export name: the client gets a clear refusal.
    let output = qemu_io(&served.uri("nope"), &["read 0 512"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("unknown export"), "{}", stderr(&output));

    assert_eq!(served.terminate(), Some(0));
    let compare = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", expected_path.to_str().unwrap(), dir.join("data.img").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(compare.status.success(), "backing file differs after clean stop: {}", stdout(&compare));
    // Discarded ranges were punched out of the backing file.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(dir.join("data.img")).unwrap().blocks() * 512;
    assert!(blocks < 24 << 20, "discards freed space ({blocks} bytes allocated)");
}

#[test]
fn tcp_and_unix_exports_serve_the_same_volume() {
    require_tool("qemu-io", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "tcpvol", "16M", &["--journal-size", "8M"]);
    let socket = tmp.path().join("u.sock");
    let mut child = std::process::Command::new(bin())
        .args(["run", "--dir", dir.to_str().unwrap(), "--nbd", "tcp:127.0.0.1:0", "--nbd", &format!("unix:{}", socket.display())])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The kernel picks the TCP port; status reports the bound address.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let tcp = loop {
        assert!(std::time::Instant::now() < deadline, "run did not come up");
        if dir.join("control.sock").exists() {
            let exports = status_json(&dir)["volume"]["exports"].clone();
            if let Some(tcp) = exports.as_array().unwrap().iter().filter_map(|e| e.as_str()).find(|e| e.starts_with("tcp:")) {
                break tcp.trim_start_matches("tcp:").to_string();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!tcp.ends_with(":0"), "the real port is reported: {tcp}");
    let output = qemu_io(&format!("nbd://{tcp}/tcpvol"), &["write -P 0x3c 4096 65536", "flush"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = qemu_io(&format!("nbd+unix:///tcpvol?socket={}", socket.display()), &["read -P 0x3c 4096 65536"]);
    let text = stdout(&output);
    assert!(output.status.success() && !text.contains("verification failed"), "{text}");
    let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
