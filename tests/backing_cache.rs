//! The volume and the page cache (docs/configuration.md, `backing_writes`): reads of the
//! backing store through NBD use O_DIRECT and leave none of its pages in the page cache (a
//! buffered read left readahead's large folios there, and later 4 KiB buffered writes into
//! them walked the whole folio: four times slower); with `backing_writes = direct`, aligned
//! writes reach the backing store without the page cache too, unaligned ones beside them
//! land in order, and everything reads back exactly after a restart.

mod common;
use common::nbd_client::*;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Pages of `path` in the page cache.
fn cached_pages(path: &Path) -> usize {
    ublk_mirror::fsutil::cached_pages(&std::fs::File::open(path).unwrap()).unwrap()
}

/// Drops every page of `path` from the page cache (written back first).
fn drop_cached(path: &Path) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: plain advice on an open descriptor.
    assert_eq!(unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
}

fn pattern(offset: usize, length: usize, salt: u8) -> Vec<u8> {
    (offset..offset + length).map(|i| ((i / 512) as u8).wrapping_mul(31).wrapping_add(i as u8).wrapping_add(salt)).collect()
}

/// The whole 16 MiB device, read in 1 MiB requests.
fn read_all(client: &mut NbdClient) -> Vec<u8> {
    (0..16).flat_map(|chunk| client.read((chunk * MIB) as u64, MIB as u32)).collect()
}

fn wait_applied(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_json(dir);
        if status["volume"]["applied_lsn"] == status["volume"]["last_lsn"] {
            return;
        }
        assert!(Instant::now() < deadline, "writeback did not catch up: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reads_through_nbd_leave_the_backing_store_out_of_the_page_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "cache", "16M", &["--journal-size", "64M"]);
    let backing = dir.join("data.img");
    std::fs::write(&backing, pattern(0, 16 * MIB, 0)).unwrap();
    drop_cached(&backing);
    assert_eq!(cached_pages(&backing), 0, "dropped before the volume starts");
    let served = Served::start(&dir, &[]);
    let mut client = NbdClient::connect(&served.socket, "cache").unwrap();
    for chunk in 0..16 {
        assert!(client.read((chunk * MIB) as u64, MIB as u32) == pattern(chunk * MIB, MIB, 0), "chunk {chunk}");
    }
    // Unaligned reads too (the bounce buffer covers them).
    assert!(client.read(12345, 7000) == pattern(12345, 7000, 0));
    assert_eq!(cached_pages(&backing), 0, "reads through the volume left pages of the backing file in the page cache");
    client.disconnect();
}

#[test]
fn direct_backing_writes_bypass_the_page_cache_and_keep_the_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "direct", "16M", &["--journal-size", "64M", "--backing-writes", "direct"]);
    let config = std::fs::read_to_string(dir.join("volume.toml")).unwrap();
    assert!(config.contains("backing_writes = \"direct\""), "{config}");
    let backing = dir.join("data.img");
    let mut expected = vec![0u8; 16 * MIB];
    let mut served = Served::start(&dir, &[]);
    let mut client = NbdClient::connect(&served.socket, "direct").unwrap();
    // Aligned writes, overwrites of the same blocks in one batch's reach, and a few
    // sector-sized ones in between (these go through the page cache, after what is queued).
    let mut write = |client: &mut NbdClient, offset: usize, data: Vec<u8>| {
        assert_eq!(client.write(offset as u64, &data), 0, "write at {offset}");
        expected[offset..offset + data.len()].copy_from_slice(&data);
    };
    for round in 0..3u8 {
        for block in (0..1024).step_by(3) {
            write(&mut client, block * 4096, pattern(block * 4096, 4096, round));
        }
        write(&mut client, 8 * MIB + 512 * round as usize, pattern(0, 512, round + 100));
    }
    write(&mut client, 12 * MIB, pattern(12 * MIB, 2 * MIB, 7));
    assert_eq!(client.flush(), 0);
    wait_applied(&dir);
    // What the page cache holds of the backing file: at most the unaligned writes' pages.
    assert!(cached_pages(&backing) <= 3, "direct writeback left {} pages of the backing file cached", cached_pages(&backing));
    assert!(served.log_text().contains("with O_DIRECT (backing_writes = direct)"), "{}", served.log_text());
    assert!(read_all(&mut client) == expected, "the volume reads back what was written");
    client.disconnect();
    assert_eq!(served.terminate(), Some(0), "{}", served.log_text());
    let first_log = served.log_text().len();
    drop_cached(&backing);
    assert!(std::fs::read(&backing).unwrap() == expected, "the backing store holds every write after a clean stop");
    // `volume set` switches back; the next start writes through the page cache.
    let output = cli(&["volume", "set", "--dir", dir.to_str().unwrap(), "--backing-writes", "buffered"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("backing writes: buffered"), "{}", String::from_utf8_lossy(&output.stdout));
    let served = Served::start(&dir, &[]);
    let mut client = NbdClient::connect(&served.socket, "direct").unwrap();
    assert!(read_all(&mut client) == expected);
    client.disconnect();
    let second_log = served.log_text()[first_log..].to_string();
    assert!(!second_log.contains("with O_DIRECT (backing_writes = direct)"), "{second_log}");
}
