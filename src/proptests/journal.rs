//! Journal records, segment headers and whole segment files of arbitrary bytes.

use proptest::prelude::*;

use super::cases_divided_by;
use crate::journal::format::{self, RecordHeader, RecordKind, SegmentHeader, RECORD_HEADER_SIZE};
use crate::journal::{Journal, JournalReader};

fn kind() -> impl Strategy<Value = RecordKind> {
    prop_oneof![Just(RecordKind::Write), Just(RecordKind::WriteZeroes), Just(RecordKind::Discard), Just(RecordKind::Marker)]
}

/// 64 header bytes, often with the magic, version and a known kind in place so decoding
/// gets past its first checks.
fn header_bytes() -> impl Strategy<Value = [u8; RECORD_HEADER_SIZE]> {
    (any::<[u8; RECORD_HEADER_SIZE]>(), any::<bool>(), 0u8..6).prop_map(|(mut bytes, plausible, kind)| {
        if plausible {
            bytes[0..4].copy_from_slice(&format::RECORD_MAGIC.to_le_bytes());
            bytes[4] = format::FORMAT_VERSION;
            bytes[5] = kind;
        }
        bytes
    })
}

/// What every accepted record header must satisfy.
fn assert_in_range(header: &RecordHeader, room: u64) {
    assert!(header.encoded_len() as u64 <= room, "{header:?} overruns the {room} bytes left");
    assert!(header.extent().end().is_some(), "{header:?}: extent overflows");
    match header.kind {
        RecordKind::Write => assert_eq!(header.length, header.payload_len as u64),
        RecordKind::WriteZeroes | RecordKind::Discard => assert_eq!(header.payload_len, 0),
        RecordKind::Marker => assert_eq!(header.length, 0),
        RecordKind::Range => assert_eq!((header.offset, header.length), (0, 0)),
        RecordKind::Covered => assert_eq!((header.offset, header.length, header.payload_len), (0, 0, 0)),
    }
}

/// A record that verifies, with arbitrary fields (consistent where decoding insists).
#[derive(Debug, Clone)]
struct Spec {
    kind: RecordKind,
    lsn_step: u8,
    offset: u64,
    length: u64,
    payload: Vec<u8>,
    synced_lsn: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (kind(), prop_oneof![4 => Just(1u8), 1 => any::<u8>()], any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300), any::<u64>())
        .prop_map(|(kind, lsn_step, offset, length, payload, synced_lsn)| Spec { kind, lsn_step, offset, length, payload, synced_lsn })
}

fn encode(spec: &Spec, lsn: u64, salt: u64) -> Vec<u8> {
    let payload: &[u8] = if matches!(spec.kind, RecordKind::Write | RecordKind::Marker) { &spec.payload } else { &[] };
    let length = match spec.kind {
        RecordKind::Write => payload.len() as u64,
        RecordKind::Marker => 0,
        _ => spec.length,
    };
    let header = RecordHeader {
        kind: spec.kind,
        flags: 0,
        lsn,
        offset: spec.offset,
        length,
        payload_len: payload.len() as u32,
        synced_lsn: spec.synced_lsn,
        timestamp_us: 0,
    };
    let mut out = vec![0u8; header.encoded_len()];
    header.encode(payload, salt, &mut out);
    out
}

/// A segment file: a valid header naming `first_lsn`, records that verify, then damage.
fn segment(first_lsn: u64, specs: &[Spec], damage: &[(usize, u8)], size_blocks: usize) -> Vec<u8> {
    let size = size_blocks * format::BLOCK_SIZE;
    let salt = 0x5a17;
    let header = SegmentHeader { first_lsn, salt, segment_size: size as u64, journal_id: [7; 16] };
    let mut bytes = vec![0u8; size];
    bytes[..format::BLOCK_SIZE].copy_from_slice(&header.encode());
    let mut at = format::BLOCK_SIZE;
    let mut lsn = first_lsn;
    for spec in specs {
        let record = encode(spec, lsn, salt);
        if at + record.len() > size {
            break;
        }
        bytes[at..at + record.len()].copy_from_slice(&record);
        at += record.len().next_multiple_of(8);
        lsn = lsn.wrapping_add(spec.lsn_step as u64);
    }
    for &(position, value) in damage {
        let position = position % size;
        // The header block stays intact: the records are what is under test.
        if position >= format::BLOCK_SIZE {
            bytes[position] ^= value;
        }
    }
    bytes
}

fn first_lsn() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), 1u64..1000, Just(u64::MAX), Just(u64::MAX - 1), (u64::MAX - 5..=u64::MAX), any::<u64>()]
}

/// Recovery of the journal in `dir` never panics; what it reports is in range, and a reader
/// of its records gets exactly the reported LSNs, each with an extent that does not overflow.
fn check_recovery(dir: &std::path::Path) {
    let Ok(report) = Journal::inspect(dir) else { return };
    assert!(report.first_lsn >= 1, "{report:?}: LSNs start at 1");
    assert!(report.last_lsn.checked_add(1).is_some_and(|next| next >= report.first_lsn), "{report:?}");
    assert!(report.used_bytes <= report.segments as u64 * report.segment_size, "{report:?}");
    let (journal, again) = Journal::open_read_only(dir).expect("inspect accepted it");
    assert_eq!(again, report);
    if report.last_lsn < report.first_lsn {
        return;
    }
    let mut reader = JournalReader::new(journal, report.first_lsn).expect("the first retained LSN is readable");
    let mut expected = report.first_lsn;
    while let Some(record) = reader.next_record().expect("recovery verified these records") {
        assert_eq!(record.header.lsn, expected);
        assert!(record.header.extent().end().is_some());
        assert_eq!(record.payload.len(), record.header.payload_len as usize);
        expected += 1;
    }
    assert_eq!(expected - 1, report.last_lsn, "the reader stopped before the recovered end");
}

proptest! {
    #[test]
    fn record_headers_decode_in_range_or_not_at_all(bytes in header_bytes(), room in prop_oneof![0u64..70_000, any::<u64>()], salt in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(header) = format::decode_header(&bytes, room) {
            assert_in_range(&header, room);
        }
        let _ = format::verify_record(&bytes, &payload, salt);
    }

    #[test]
    fn encoded_records_round_trip(spec in spec(), lsn in any::<u64>(), salt in any::<u64>()) {
        let record = encode(&spec, lsn, salt);
        let head: [u8; RECORD_HEADER_SIZE] = record[..RECORD_HEADER_SIZE].try_into().unwrap();
        let decoded = format::decode_header(&head, record.len() as u64);
        let length = u64::from_le_bytes(head[24..32].try_into().unwrap());
        if spec.offset.checked_add(length).is_none() {
            prop_assert!(decoded.is_err(), "an extent that overflows was accepted");
            return Ok(());
        }
        let header = decoded.expect("an encoded record decodes");
        assert_in_range(&header, record.len() as u64);
        prop_assert_eq!(header.lsn, lsn);
        prop_assert!(format::verify_record(&head, &record[RECORD_HEADER_SIZE..], salt).is_ok());
    }

    #[test]
    fn segment_headers_decode_or_refuse(block in proptest::collection::vec(any::<u8>(), 0..200), header in any::<(u64, u64, u64, [u8; 16])>(), flip in 0usize..60) {
        let _ = SegmentHeader::decode(&block);
        let header = SegmentHeader { first_lsn: header.0, salt: header.1, segment_size: header.2, journal_id: header.3 };
        let mut encoded = header.encode();
        prop_assert_eq!(SegmentHeader::decode(&encoded), Ok(header));
        encoded[flip] ^= 0x01;
        prop_assert!(SegmentHeader::decode(&encoded).is_err());
    }

    #[test]
    fn segment_file_names_parse_back(name in "[0-9]{18,21}\\.seg|free-[0-9]{20}\\.seg|\\PC{0,30}", lsn in any::<u64>()) {
        if let Some(parsed) = format::parse_segment_file_name(&name) {
            prop_assert_eq!(format::segment_file_name(parsed), name);
        }
        prop_assert_eq!(format::parse_segment_file_name(&format::segment_file_name(lsn)), Some(lsn));
    }
}

proptest! {
    #![proptest_config(cases_divided_by(8))]

    #[test]
    fn a_segment_file_of_arbitrary_bytes_is_refused_or_recovered(bytes in proptest::collection::vec(any::<u8>(), 0..3 * format::BLOCK_SIZE), keep_header in any::<bool>(), first in first_lsn()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = bytes;
        if keep_header && bytes.len() >= format::BLOCK_SIZE {
            let header = SegmentHeader { first_lsn: first, salt: 1, segment_size: bytes.len() as u64, journal_id: [1; 16] };
            bytes[..format::BLOCK_SIZE].copy_from_slice(&header.encode());
        }
        std::fs::write(dir.path().join(format::segment_file_name(first)), &bytes).unwrap();
        check_recovery(dir.path());
    }

    #[test]
    fn segments_of_verified_records_and_damage_recover_in_range(
        first in first_lsn(),
        specs in proptest::collection::vec(spec(), 0..12),
        damage in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..3),
        second in proptest::option::of((proptest::collection::vec(spec(), 0..6), any::<bool>())),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format::segment_file_name(first)), segment(first, &specs, &damage, 3)).unwrap();
        if let Some((more, follows)) = second {
            // A second segment, starting where the first one's records end (or not).
            let next = first.wrapping_add(specs.len() as u64).wrapping_add(u64::from(!follows));
            std::fs::write(dir.path().join(format::segment_file_name(next)), segment(next, &more, &[], 2)).unwrap();
        }
        check_recovery(dir.path());
    }
}

/// Found by the properties above: recovery of a segment from LSN 0 computed its last LSN as
/// 0 - 1 (a panic), and a record with LSN u64::MAX made the scan's next LSN overflow.
#[test]
fn regression_lsn_0_and_u64_max_segments() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format::segment_file_name(0)), segment(0, &[], &[], 3)).unwrap();
    assert!(Journal::inspect(dir.path()).is_err(), "LSNs start at 1");

    let dir = tempfile::tempdir().unwrap();
    let record = Spec { kind: RecordKind::Discard, lsn_step: 1, offset: 0, length: 4096, payload: Vec::new(), synced_lsn: 0 };
    std::fs::write(dir.path().join(format::segment_file_name(u64::MAX - 1)), segment(u64::MAX - 1, &[record.clone(), record], &[], 3)).unwrap();
    let report = Journal::inspect(dir.path()).unwrap();
    assert_eq!((report.first_lsn, report.last_lsn), (u64::MAX - 1, u64::MAX - 1), "the record at LSN u64::MAX is not taken");
    check_recovery(dir.path());
}
