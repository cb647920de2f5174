//! Replication frames: length prefixes, control messages and record batches from the network.

use proptest::prelude::*;

use crate::journal::{RecordHeader, RecordKind};
use crate::protocol::wire::{self, Frame, MAX_FRAME};

/// `body` cut into chunks at `cuts` (as QUIC may hand it over).
fn chunked(body: &[u8], cuts: &[usize]) -> Vec<bytes::Bytes> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for point in points.into_iter().chain([body.len()]) {
        chunks.push(bytes::Bytes::copy_from_slice(&body[from..point]));
        from = point;
    }
    chunks
}

/// What every accepted batch must satisfy.
fn assert_batch_in_range(frame: &Frame, body: &[u8]) {
    let body_len = body.len();
    let Frame::Records(records) = frame else { return };
    let compressed = body_len > 0 && body[0] == 3;
    let mut payload_total = 0;
    for pair in records.windows(2) {
        assert_eq!(pair[0].lsn.checked_add(1), Some(pair[1].lsn), "LSNs of one batch follow on");
    }
    for record in records {
        assert!(record.extent.end().is_some(), "{:?}: extent overflows", record.extent);
        match record.kind {
            RecordKind::Write => assert_eq!(record.extent.length, record.payload.len() as u64),
            RecordKind::WriteZeroes | RecordKind::Discard => assert!(record.payload.is_empty()),
            RecordKind::Marker => assert_eq!(record.extent.length, 0),
            RecordKind::Range | RecordKind::Covered => panic!("a range kind in a batch"),
        }
        payload_total += record.payload.len();
    }
    // A raw batch's payloads are its bytes; a compressed one's never more than the bound.
    if compressed {
        assert!(payload_total <= crate::protocol::compression::MAX_DECOMPRESSED);
    } else {
        assert!(payload_total <= body_len);
    }
}

fn kind() -> impl Strategy<Value = RecordKind> {
    prop_oneof![Just(RecordKind::Write), Just(RecordKind::WriteZeroes), Just(RecordKind::Discard), Just(RecordKind::Marker)]
}

/// A batch as a sender encodes it, with arbitrary fields (LSNs may wrap, extents overflow),
/// most of them consistent so decoding goes on to the next record.
fn batch() -> impl Strategy<Value = Vec<u8>> {
    records().prop_map(|headers| {
        let borrowed: Vec<(RecordHeader, &[u8])> = headers.iter().map(|(h, p)| (*h, &p[..])).collect();
        let mut frame = wire::encode_batch_header(&borrowed);
        for (_, payload) in &headers {
            frame.extend_from_slice(payload);
        }
        frame.split_off(4)
    })
}

/// The same batches compressed (frame kind 3), the block made by zstd at any level whether
/// or not it saves anything, so the decoder meets real zstd frames to damage.
fn compressed_batch() -> impl Strategy<Value = Vec<u8>> {
    (records(), -5i32..=19).prop_map(|(headers, level)| {
        let borrowed: Vec<(RecordHeader, &[u8])> = headers.iter().map(|(h, p)| (*h, &p[..])).collect();
        let payloads: Vec<u8> = headers.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        let block = zstd::bulk::compress(&payloads, level).expect("zstd compresses");
        let mut frame = wire::encode_compressed_batch_header(&borrowed, block.len());
        frame.extend_from_slice(&block);
        frame.split_off(4)
    })
}

fn records() -> impl Strategy<Value = Vec<(RecordHeader, Vec<u8>)>> {
    let offset = prop_oneof![0u64..1 << 40, any::<u64>()];
    let record = (kind(), offset, prop_oneof![Just(None), any::<u64>().prop_map(Some)], proptest::collection::vec(any::<u8>(), 0..40));
    (prop_oneof![any::<u64>(), (u64::MAX - 3..=u64::MAX)], proptest::collection::vec(record, 0..6)).prop_map(|(first, records)| {
        records
            .into_iter()
            .enumerate()
            .map(|(i, (kind, offset, length, mut payload))| {
                if matches!(kind, RecordKind::WriteZeroes | RecordKind::Discard) {
                    payload.clear();
                }
                let length = length.unwrap_or(match kind {
                    RecordKind::Write => payload.len() as u64,
                    RecordKind::Marker => 0,
                    _ => 4096,
                });
                let header = RecordHeader {
                    kind,
                    flags: 0,
                    lsn: first.wrapping_add(i as u64),
                    offset,
                    length,
                    payload_len: payload.len() as u32,
                    synced_lsn: 0,
                    timestamp_us: 0,
                };
                (header, payload)
            })
            .collect()
    })
}

/// A decoding's answer with payloads as bytes (however they were sliced).
fn flat(result: &Result<Frame, wire::WireError>) -> String {
    match result {
        Ok(Frame::Records(records)) => {
            format!("{:?}", records.iter().map(|r| (r.lsn, r.kind, r.flags, r.extent, r.timestamp_us, r.payload.to_vec())).collect::<Vec<_>>())
        }
        other => format!("{other:?}"),
    }
}

/// Decodes `body` whole and in chunks: the same answer, never a panic, in range if accepted.
fn check(body: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let whole = wire::decode_body(body);
    let pieces = wire::decode_frame(chunked(body, cuts));
    prop_assert_eq!(flat(&whole), flat(&pieces));
    if let Ok(frame) = &whole {
        assert_batch_in_range(frame, body);
    }
    Ok(())
}

proptest! {
    #[test]
    fn length_prefixes_are_bounded(prefix in any::<[u8; 4]>()) {
        if let Ok(length) = wire::check_length(prefix) {
            prop_assert!((1..=MAX_FRAME as usize).contains(&length));
        }
    }

    #[test]
    fn arbitrary_bodies_decode_or_refuse(kind in 0u8..4, rest in proptest::collection::vec(any::<u8>(), 0..600), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        let mut body = vec![kind];
        body.extend_from_slice(&rest);
        check(&body, &cuts)?;
    }

    /// Control messages whose strings and lists claim huge lengths (bincode varints of up to
    /// u64) are refused within the 2 MiB limit, never allocated.
    #[test]
    fn control_messages_claiming_huge_lengths_are_refused(variant in 0u8..40, fields in proptest::collection::vec((0u8..4, any::<u64>()), 1..6), tail in proptest::collection::vec(any::<u8>(), 0..40), cuts in proptest::collection::vec(any::<usize>(), 0..3)) {
        let mut body = vec![1u8, variant];
        for (width, value) in fields {
            match width {
                0 => body.push(value as u8 % 251),
                1 => body.extend_from_slice(&[0xfb, value as u8, (value >> 8) as u8]),
                2 => {
                    body.push(0xfc);
                    body.extend_from_slice(&(value as u32).to_le_bytes());
                }
                _ => {
                    body.push(0xfd);
                    body.extend_from_slice(&value.to_le_bytes());
                }
            }
        }
        body.extend_from_slice(&tail);
        check(&body, &cuts)?;
    }

    #[test]
    fn encoded_batches_decode_in_range_even_damaged(body in batch(), damage in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..3), cut in any::<usize>(), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        check(&body, &cuts)?;
        let mut damaged = body.clone();
        for (at, value) in damage {
            let at = at % damaged.len();
            damaged[at] ^= value;
        }
        check(&damaged, &cuts)?;
        check(&body[..cut % (body.len() + 1)], &cuts)?;
    }

    /// Compressed batches, whole, damaged anywhere (header or zstd frame) and truncated:
    /// decoded to the records they were made of, or refused; never a panic.
    #[test]
    fn compressed_batches_decode_in_range_even_damaged(body in compressed_batch(), damage in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..3), cut in any::<usize>(), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        check(&body, &cuts)?;
        let mut damaged = body.clone();
        for (at, value) in damage {
            let at = at % damaged.len();
            damaged[at] ^= value;
        }
        check(&damaged, &cuts)?;
        check(&body[..cut % (body.len() + 1)], &cuts)?;
    }

    /// Arbitrary bytes after a valid compressed batch's header, as the zstd block.
    #[test]
    fn arbitrary_zstd_blocks_are_refused_or_decoded_in_range(body in compressed_batch(), block in proptest::collection::vec(any::<u8>(), 0..200), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        let header_len = u32::from_le_bytes(body[1..5].try_into().expect("4")) as usize;
        let mut forged = body[..5 + header_len].to_vec();
        forged.extend_from_slice(&block);
        check(&forged, &cuts)?;
    }
}

/// Found by the properties above: a batch whose LSNs run u64::MAX, 0 panicked computing the
/// successor of u64::MAX.
#[test]
fn regression_a_batch_past_lsn_u64_max_is_refused() {
    let header = |lsn| RecordHeader { kind: RecordKind::Discard, flags: 0, lsn, offset: 0, length: 4096, payload_len: 0, synced_lsn: 0, timestamp_us: 0 };
    let frame = wire::encode_batch_header(&[(header(u64::MAX), &[][..]), (header(0), &[][..])]);
    assert!(matches!(wire::decode_body(&frame[4..]), Err(wire::WireError::BadBatch(_))));
}
