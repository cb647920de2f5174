//! Tests of the replica: receive, apply, recover, refuse, synchronise.

use std::path::Path;

use super::*;
use crate::protocol::wire::SYNC_CHUNK;

fn hello(size: u64) -> Hello {
    Hello {
        protocol: crate::protocol::wire::PROTOCOL_VERSION,
        volume_uuid: [4; 16],
        volume_name: "vol0".into(),
        size,
        generation: [5; 16],
        first_lsn: 1,
        last_lsn: 0,
        history: vec![crate::protocol::wire::WireGeneration { id: [5; 16], parent: None, branch_lsn: 0, created_us: 0 }],
    }
}

pub(super) fn write(lsn: u64, offset: u64, byte: u8, len: usize) -> ReceivedRecord {
    ReceivedRecord { lsn, kind: RecordKind::Write, flags: 0, extent: Extent::new(offset, len as u64), timestamp_us: 0, payload: vec![byte; len].into() }
}

/// A new 1 MiB replica past its (empty) initial synchronisation: it takes records.
pub(super) fn synced_replica(dir: &Path) -> Replica {
    let mut replica = Replica::create(dir, &hello(1 << 20), None, None).unwrap();
    replica.sync_start().unwrap();
    replica.sync_done(0, 0).unwrap();
    replica
}

#[test]
fn receive_apply_and_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = Replica::create(&dir, &hello(1 << 20), None, None).unwrap();
    let refused = replica.receive(&[write(1, 0, 1, 4096)]).unwrap_err();
    assert!(refused.to_string().contains("initial synchronisation"), "{refused}");
    replica.sync_start().unwrap();
    replica.sync_done(0, 0).unwrap();
    assert!(replica.state().is_consistent());
    assert_eq!(replica.receive(&[write(1, 0, 1, 4096), write(2, 4096, 2, 4096)]).unwrap(), 2);
    // A resend after reconnect: duplicates skipped and counted.
    assert_eq!(replica.receive(&[write(2, 4096, 2, 4096), write(3, 0, 3, 512)]).unwrap(), 3);
    assert_eq!(replica.counters().records_duplicated, 1);
    let discard = ReceivedRecord { lsn: 4, kind: RecordKind::Discard, flags: 0, extent: Extent::new(4096, 4096), timestamp_us: 0, payload: Default::default() };
    replica.receive(&[discard]).unwrap();
    assert_eq!(replica.applied_lsn(), 0, "receiving does not apply");
    drop(replica);
    // Crash before applying: reopening redoes from the journal.
    let replica = Replica::open(&dir).unwrap();
    assert_eq!(replica.applied_lsn(), 4);
    let image = std::fs::read(dir.join("data.img")).unwrap();
    assert_eq!(&image[..512], &[3u8; 512][..]);
    assert_eq!(&image[512..4096], &[1u8; 3584][..]);
    assert!(image[4096..8192].iter().all(|&b| b == 0));
}

#[test]
fn a_payload_in_pieces_is_journaled_and_applied_whole() {
    use crate::protocol::wire::{self, Frame};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = synced_replica(&dir);
    let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
    let header = crate::journal::RecordHeader {
        kind: RecordKind::Write,
        flags: 0,
        lsn: 1,
        offset: 8192,
        length: 12288,
        payload_len: 12288,
        synced_lsn: 0,
        timestamp_us: 0,
    };
    let mut frame = wire::encode_batch_header(&[(header, &data[..])]);
    frame.extend_from_slice(&data);
    // As QUIC may deliver it: the payload spans three chunks.
    let body = bytes::Bytes::from(frame).slice(4..);
    let chunks = vec![body.slice(..1000), body.slice(1000..9000), body.slice(9000..)];
    let Frame::Records(records) = wire::decode_frame(chunks).unwrap() else { panic!("records expected") };
    assert_eq!(records[0].payload.parts().len(), 3);
    assert_eq!(replica.receive(&records).unwrap(), 1);
    let journaled = crate::journal::JournalReader::new(replica.journal().clone(), 1).unwrap().next_record().unwrap().unwrap();
    assert_eq!(journaled.payload, &data[..], "journaled whole (and its CRC verified on reading)");
    replica.apply_received(&records).unwrap();
    replica.checkpoint().unwrap();
    let image = std::fs::read(dir.join("data.img")).unwrap();
    assert_eq!(&image[8192..8192 + 12288], &data[..], "applied whole, in order");
    assert!(image[..8192].iter().chain(&image[8192 + 12288..]).all(|&b| b == 0));
}

#[test]
fn bad_batches_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = synced_replica(&dir);
    replica.receive(&[write(1, 0, 1, 4096)]).unwrap();
    let gap = replica.receive(&[write(3, 0, 9, 4096)]).unwrap_err();
    assert!(gap.to_string().contains("expected LSN 2"), "{gap}");
    let past_end = replica.receive(&[write(2, 4096, 9, 100), write(3, (1 << 20) - 10, 9, 100)]).unwrap_err();
    assert!(past_end.to_string().contains("outside the replica"), "{past_end}");
    assert_eq!(replica.received_lsn(), 1, "the partly good batch was not taken either");
    replica.apply().unwrap();
    let image = std::fs::read(dir.join("data.img")).unwrap();
    assert!(image[4096..].iter().all(|&b| b == 0), "no byte of a rejected batch reached the image");

    let mut wrong = hello(1 << 20);
    wrong.volume_uuid = [9; 16];
    assert!(matches!(replica.check_hello(&wrong), Err(Refusal::WrongVolume { .. })));
    assert!(matches!(replica.check_hello(&hello(2 << 20)), Err(Refusal::WrongSize { .. })));
    let mut generation = hello(1 << 20);
    generation.generation = [1; 16];
    generation.history[0].id = [1; 16];
    assert!(matches!(replica.check_hello(&generation), Err(Refusal::WrongGeneration { .. })));
    let mut mismatch = hello(1 << 20);
    mismatch.generation = [1; 16];
    assert!(matches!(replica.check_hello(&mismatch), Err(Refusal::Other(_))), "a history that does not end at the generation");
    replica.check_hello(&hello(1 << 20)).unwrap();
}

#[test]
fn sync_compares_copies_and_continues_the_journal_after_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let size = 3 * SYNC_CHUNK + 4096;
    let mut replica = Replica::create(&dir, &hello(size), None, None).unwrap();
    assert!(replica.state().needs_sync());
    replica.sync_start().unwrap();
    let zero_hash = *blake3::hash(&vec![0u8; SYNC_CHUNK as usize]).as_bytes();
    let tail_zero_hash = *blake3::hash(&[0u8; 4096]).as_bytes();
    let data = vec![7u8; SYNC_CHUNK as usize];
    let hashes = [zero_hash, *blake3::hash(&data).as_bytes(), zero_hash, tail_zero_hash];
    assert_eq!(replica.differing_chunks(0, &hashes).unwrap(), vec![1]);
    assert!(replica.differing_chunks(3, &hashes[..2]).is_err(), "chunk 4 is past the end");
    assert!(replica.write_chunk(1, false, &data[..100]).is_err(), "short chunk refused");
    assert!(replica.write_chunk(9, false, &data).is_err(), "chunk past the end refused");
    replica.write_chunk(1, false, &data).unwrap();
    assert!(replica.differing_chunks(0, &hashes).unwrap().is_empty());
    // Writes went on at the source during the sync: consistent only after LSN 12.
    replica.sync_done(10, 12).unwrap();
    assert!(!replica.state().is_consistent() && !replica.state().needs_sync());
    assert_eq!((replica.received_lsn(), replica.applied_lsn()), (10, 10));
    replica.receive(&[write(11, 0, 1, 4096)]).unwrap();
    replica.apply().unwrap();
    assert!(!replica.state().is_consistent());
    drop(replica);
    let mut replica = Replica::open(&dir).unwrap();
    assert_eq!(replica.received_lsn(), 11, "the reset journal survives a restart");
    replica.receive(&[write(12, 4096, 2, 4096)]).unwrap();
    replica.apply().unwrap();
    assert!(replica.state().is_consistent());
    let image = std::fs::read(dir.join("data.img")).unwrap();
    assert_eq!(&image[SYNC_CHUNK as usize..2 * SYNC_CHUNK as usize], &data[..]);
    assert_eq!(&image[..4096], &[1u8; 4096][..]);
}

#[test]
fn a_replica_moved_before_its_state_followed_opens_with_its_own_image() {
    // A crash of the bind to a source (`applier/replicas.rs`) between the rename of the
    // directory and the update of the image path in its state.
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("replicas").join("vol0");
    let mut replica = synced_replica(&old);
    replica.receive(&[write(1, 0, 9, 4096)]).unwrap();
    replica.apply().unwrap();
    drop(replica);
    let new = tmp.path().join("replicas").join("0123456789abcdef").join("vol0");
    std::fs::create_dir_all(new.parent().unwrap()).unwrap();
    std::fs::rename(&old, &new).unwrap();
    let replica = Replica::open(&new).unwrap();
    assert_eq!(replica.state().image, new.join("data.img"));
    assert_eq!(replica.applied_lsn(), 1);
    assert!(replica.state().is_consistent());
    assert_eq!(ReplicaState::load(&ReplicaDir::new(&new)).unwrap().image, new.join("data.img"), "saved");
    assert_eq!(&std::fs::read(new.join("data.img")).unwrap()[..4096], &[9u8; 4096][..]);
}

#[test]
fn a_placed_journal_is_replaced_where_it_lives_and_an_interrupted_replacement_is_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let home = tmp.path().join("journals");
    std::fs::create_dir(&home).unwrap();
    let placed = ReplicaJournal { journal_dir: home.clone(), target: home.join("vol0") };
    let mut replica = Replica::create(&dir, &hello(1 << 20), None, Some(&placed)).unwrap();
    // The synchronisation's end replaces the journal: beside its directory, the link kept.
    replica.sync_start().unwrap();
    replica.sync_done(0, 0).unwrap();
    replica.receive(&[write(1, 0, 1, 4096)]).unwrap();
    drop(replica);
    assert_eq!(std::fs::read_link(dir.join("journal")).unwrap(), placed.target);
    assert!(placed.target.join(crate::journal::placement::OWNER_FILE).exists());
    // A crash between moving the old journal aside and the new one into place.
    std::fs::rename(&placed.target, home.join("vol0.resetting")).unwrap();
    let replica = Replica::open(&dir).unwrap();
    assert_eq!(replica.applied_lsn(), 0);
    assert!(placed.target.join(crate::journal::placement::OWNER_FILE).exists() && !home.join("vol0.resetting").exists());
    drop(replica);
    // Its filesystem gone: refused, not replaced; and no new replica is made meanwhile.
    std::fs::remove_dir_all(&home).unwrap();
    let refused = Replica::open(&dir).err().expect("refused");
    assert!(refused.to_string().contains("is its filesystem mounted?"), "{refused}");
    let other = tmp.path().join("r2");
    let refused = Replica::create(&other, &hello(1 << 20), None, Some(&placed)).err().expect("refused");
    assert!(refused.to_string().contains("does not exist: is its filesystem mounted?"), "{refused}");
    assert!(!home.exists() && !other.exists());
}

/// The inodes of the journal's segment files (segments and spares).
fn journal_files(dir: &Path) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let files = std::fs::read_dir(dir.join("journal")).unwrap().map(|e| e.unwrap());
    files.filter(|e| e.file_name().to_string_lossy().ends_with(".seg")).map(|e| e.metadata().unwrap().ino()).collect()
}

/// `preallocate_journals`: a new replica's journal has all its segments (1 GiB), and the
/// synchronisation's journal replacement (like every later one that goes forward in LSNs)
/// keeps those very files.
#[test]
fn a_preallocated_replica_journal_keeps_its_files_across_replacements() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = Replica::create(&dir, &hello(1 << 20), None, None).unwrap();
    replica.preallocate_journal().unwrap();
    let made = journal_files(&dir);
    assert!((16..=17).contains(&made.len()), "1 GiB of 64 MiB segments (and perhaps the spare prepared meanwhile)");
    replica.sync_start().unwrap();
    replica.sync_done(0, 0).unwrap();
    let kept = journal_files(&dir);
    assert_eq!(kept.len(), 16);
    assert_eq!(kept.difference(&made).count(), 1, "only the new journal's first segment is a new file");
    replica.receive(&[write(1, 0, 1, 4096)]).unwrap();
    replica.apply().unwrap();
    drop(replica);
    let replica = Replica::open(&dir).unwrap();
    assert_eq!(replica.applied_lsn(), 1);
    assert_eq!(journal_files(&dir), kept);
    drop(replica);
    // A replacement that goes back in LSNs lets the old files go: records in them could
    // carry the LSNs the new journal will write.
    let layout = ReplicaDir::new(&dir);
    drop(journal::restart_journal(&layout, uuid::Uuid::from_bytes([4; 16]), 1, Some(1)).unwrap());
    assert!(journal_files(&dir).is_disjoint(&kept), "no file kept");
}
