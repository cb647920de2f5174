//! The coalescing rule: applying a range's pieces to an image gives exactly what applying
//! every record of the range in order gives, for overlapping writes, zeroes and discards of
//! any size and alignment.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::journal::{RecordHeader, RecordKind};

const IMAGE: u64 = 64 << 10;

fn record(lsn: u64, kind: RecordKind, offset: u64, length: u64, fill: u8) -> Record {
    let payload = if kind == RecordKind::Write { Bytes::from((0..length).map(|i| fill.wrapping_add(i as u8)).collect::<Vec<u8>>()) } else { Bytes::new() };
    let length = if kind == RecordKind::Marker { 0 } else { length };
    let header = RecordHeader { kind, flags: 0, lsn, offset, length, payload_len: payload.len() as u32, synced_lsn: 0, timestamp_us: lsn };
    Record { header, payload }
}

fn apply(image: &mut [u8], kind: RecordKind, extent: Extent, data: &[u8]) {
    let range = extent.offset as usize..(extent.offset + extent.length) as usize;
    match kind {
        RecordKind::Write => image[range].copy_from_slice(data),
        RecordKind::WriteZeroes | RecordKind::Discard => image[range].fill(0),
        _ => {}
    }
}

fn op() -> impl Strategy<Value = (RecordKind, u64, u64, u8)> {
    let kind = prop_oneof![4 => Just(RecordKind::Write), 1 => Just(RecordKind::WriteZeroes), 1 => Just(RecordKind::Discard)];
    // Sizes from a byte to 16 KiB, at any offset (512-byte and unaligned both).
    (kind, 0..IMAGE, prop_oneof![1u64..16, 1u64..=16384, Just(4096u64)], any::<u8>()).prop_map(|(kind, offset, length, fill)| {
        let length = length.min(IMAGE - offset).max(1);
        (kind, offset.min(IMAGE - length), length, fill)
    })
}

proptest! {
    #[test]
    fn a_range_applied_equals_its_records_applied_in_order(ops in proptest::collection::vec(op(), 1..64), seed in any::<u8>()) {
        let initial: Vec<u8> = (0..IMAGE).map(|i| (i as u8) ^ seed).collect();
        let mut expected = initial.clone();
        let mut builder = RangeBuilder::default();
        for (i, &(kind, offset, length, fill)) in ops.iter().enumerate() {
            let r = record(10 + i as u64, kind, offset, length, fill);
            apply(&mut expected, kind, r.header.extent(), &r.payload);
            prop_assert!(builder.offer(&r).is_ok());
        }
        let range = builder.finish().expect("records were taken");
        prop_assert_eq!(range.first_lsn, 10);
        prop_assert_eq!(range.meta.last_lsn, 9 + ops.len() as u64);
        prop_assert_eq!(range.records, ops.len() as u64);
        let mut image = initial;
        let mut data = range.data.iter();
        let mut previous_end = 0;
        for piece in &range.meta.pieces {
            // Pieces are sorted and disjoint: each byte has one version.
            prop_assert!(piece.extent.offset >= previous_end);
            previous_end = piece.extent.offset + piece.extent.length;
            let bytes = if piece.kind == RecordKind::Write { data.next().expect("a write's data").clone() } else { Bytes::new() };
            prop_assert_eq!(bytes.len() as u64, if piece.kind == RecordKind::Write { piece.extent.length } else { 0 });
            apply(&mut image, piece.kind, piece.extent, &bytes);
        }
        prop_assert!(data.next().is_none());
        prop_assert_eq!(range.meta.data_len(), range.data.iter().map(|d| d.len() as u64).sum::<u64>());
        // The encoding the applier journals decodes to the same pieces.
        prop_assert_eq!(RangeMeta::decode(range.first_lsn, &range.meta.encode()).unwrap(), range.meta.clone());
        prop_assert!(image == expected, "coalesced image differs from the records applied in order");
    }
}

#[test]
fn a_range_ends_before_a_marker_and_when_full() {
    let mut builder = RangeBuilder::default();
    builder.offer(&record(1, RecordKind::Write, 0, 4096, 1)).unwrap();
    assert_eq!(builder.offer(&record(2, RecordKind::Marker, 0, 0, 0)), Err(Refused::Marker));
    let mut builder = RangeBuilder::default();
    let big = 3 << 20;
    builder.offer(&record(1, RecordKind::Write, 0, big, 1)).unwrap();
    // Overwriting the same bytes does not grow the range.
    builder.offer(&record(2, RecordKind::Write, 0, big, 2)).unwrap();
    builder.offer(&record(3, RecordKind::Write, big, big, 3)).unwrap();
    assert_eq!(builder.offer(&record(4, RecordKind::Write, 2 * big, big, 4)), Err(Refused::Full), "over the data cap");
    let range = builder.finish().unwrap();
    assert_eq!((range.records, range.meta.data_len(), range.source_bytes), (3, 2 * big, 3 * big));
}

#[test]
fn the_setting_parses_and_auto_waits_for_a_backlog() {
    assert_eq!("auto".parse::<Coalesce>().unwrap(), Coalesce::Auto);
    assert!("sometimes".parse::<Coalesce>().is_err());
    assert_eq!(Coalesce::default().to_string(), "auto");
    assert!(!Coalesce::Auto.wanted(AUTO_BACKLOG_BYTES - 1) && Coalesce::Auto.wanted(AUTO_BACKLOG_BYTES));
    assert!(Coalesce::On.wanted(0) && !Coalesce::Off.wanted(u64::MAX));
}
