//! A coalesced range on the replica: received and applied whole, replayed whole, an
//! incomplete one discarded at open, bad ones refused without a change.

use std::path::Path;

use bytes::Bytes;

use super::super::tests::{synced_replica, write};
use super::*;
use crate::journal::range::Piece;
use crate::protocol::wire::{self, Frame};

/// A range `first..=last` of the given pieces (write data filled with `byte`), as the
/// applier decodes it from a frame.
fn range(first: u64, last: u64, pieces: &[(RecordKind, u64, u64)], byte: u8) -> ReceivedRange {
    let meta = RangeMeta { last_lsn: last, pieces: pieces.iter().map(|&(kind, offset, length)| Piece { kind, extent: Extent::new(offset, length) }).collect() };
    let mut frame = wire::encode_range_header(first, 7, &meta);
    for piece in &meta.pieces {
        if piece.kind == RecordKind::Write {
            frame.extend(std::iter::repeat_n(byte, piece.extent.length as usize));
        }
    }
    match wire::decode_body(&frame[4..]).unwrap() {
        Frame::Range(range) => range,
        other => panic!("{other:?}"),
    }
}

fn image(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("data.img")).unwrap()
}

#[test]
fn a_range_is_received_applied_and_replayed_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = synced_replica(&dir);
    replica.receive(&[write(1, 0, 1, 8192)]).unwrap();
    let r = range(2, 9, &[(RecordKind::Write, 4096, 4096), (RecordKind::WriteZeroes, 0, 512)], 9);
    assert_eq!(replica.receive_range(&r).unwrap(), 9);
    assert_eq!(replica.counters().ranges_received, 1);
    drop(replica);
    // Crash before applying: the range is replayed from the journal, whole.
    let mut replica = Replica::open(&dir).unwrap();
    assert_eq!((replica.applied_lsn(), replica.received_lsn()), (9, 9));
    let bytes = image(&dir);
    assert!(bytes[..512].iter().all(|&b| b == 0));
    assert!(bytes[512..4096].iter().all(|&b| b == 1));
    assert!(bytes[4096..8192].iter().all(|&b| b == 9));
    // Resent after a reconnect: skipped. Then records go on after the range's end.
    assert_eq!(replica.receive_range(&r).unwrap(), 9);
    assert_eq!(replica.receive(&[write(10, 0, 3, 512)]).unwrap(), 10);
    let r = range(11, 12, &[(RecordKind::Discard, 0, 4096)], 0);
    replica.receive_range(&r).unwrap();
    assert_eq!(replica.apply_received_range(&r).unwrap(), 12);
    assert_eq!(replica.apply().unwrap(), 12);
    assert!(image(&dir)[..4096].iter().all(|&b| b == 0));
}

#[test]
fn bad_ranges_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = synced_replica(&dir);
    replica.receive(&[write(1, 0, 1, 4096)]).unwrap();
    let gap = range(3, 5, &[(RecordKind::Write, 0, 4096)], 2);
    assert!(matches!(replica.receive_range(&gap), Err(ReplicaError::Rejected(_))));
    let outside = range(2, 5, &[(RecordKind::Write, (1 << 20) - 512, 4096)], 2);
    assert!(matches!(replica.receive_range(&outside), Err(ReplicaError::Rejected(_))));
    let huge = range(2, 2 + MAX_RANGE_LSNS, &[(RecordKind::Write, 0, 4096)], 2);
    assert!(matches!(replica.receive_range(&huge), Err(ReplicaError::Rejected(_))));
    assert_eq!(replica.received_lsn(), 1);
    assert_eq!(replica.apply().unwrap(), 1);
}

#[test]
fn a_range_cut_by_a_crash_is_discarded_and_taken_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut replica = synced_replica(&dir);
    replica.receive(&[write(1, 0, 1, 4096)]).unwrap();
    let r = range(2, 6, &[(RecordKind::Write, 0, 4096)], 5);
    // What a cut commit leaves: the range record and only some of its covered records.
    replica.append(RecordKind::Range, r.encoded.parts(), 2).unwrap();
    replica.append(RecordKind::Covered, &[] as &[Bytes], 3).unwrap();
    replica.writer.commit(true).unwrap();
    assert_eq!(replica.received_lsn(), 3);
    // Applying never takes a range that is not whole.
    assert_eq!(replica.apply().unwrap(), 1);
    drop(replica);
    let mut replica = Replica::open(&dir).unwrap();
    assert_eq!((replica.applied_lsn(), replica.received_lsn()), (1, 1), "the incomplete range is gone");
    assert!(image(&dir)[..4096].iter().all(|&b| b == 1), "and nothing of it applied");
    assert_eq!(replica.receive_range(&r).unwrap(), 6);
    assert_eq!(replica.apply_received_range(&r).unwrap(), 6);
    assert_eq!(replica.apply().unwrap(), 6);
    assert!(image(&dir)[..4096].iter().all(|&b| b == 5));
}
