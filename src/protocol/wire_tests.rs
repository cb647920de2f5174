//! Round trips and refusals of the wire format (`wire.rs`).
use super::compression::CompressionError;
use super::*;
use crate::journal::{RecordHeader, RecordKind};

fn header(lsn: u64, kind: RecordKind, length: u64, payload_len: u32) -> RecordHeader {
    RecordHeader { kind, flags: 0, lsn, offset: 4096 * lsn, length, payload_len, synced_lsn: 0, timestamp_us: 7 }
}

fn frame_of(prefix: Vec<u8>, payloads: &[&[u8]]) -> Vec<u8> {
    let mut frame = prefix;
    for p in payloads {
        frame.extend_from_slice(p);
    }
    frame
}

#[test]
fn control_and_batch_round_trip() {
    let hello = Control::Hello(Hello {
        protocol: 1,
        volume_uuid: [1; 16],
        volume_name: "vol0".into(),
        size: 1 << 30,
        generation: [2; 16],
        first_lsn: 1,
        last_lsn: 9,
        history: vec![WireGeneration { id: [2; 16], parent: None, branch_lsn: 0, created_us: 0 }],
    });
    let frame = encode_control(&hello);
    let length = check_length(frame[0..4].try_into().unwrap()).unwrap();
    assert_eq!(length, frame.len() - 4);
    assert_eq!(decode_body(&frame[4..]).unwrap(), Frame::Control(hello));

    let data = vec![9u8; 4096];
    let records = [(header(5, RecordKind::Write, 4096, 4096), &data[..]), (header(6, RecordKind::Discard, 8192, 0), &[][..])];
    let frame = frame_of(encode_batch_header(&records), &[&data]);
    assert_eq!(check_length(frame[0..4].try_into().unwrap()).unwrap(), frame.len() - 4);
    let Frame::Records(decoded) = decode_body(&frame[4..]).unwrap() else { panic!("records expected") };
    assert_eq!(decoded.len(), 2);
    assert_eq!(decoded[0].payload.to_vec(), data);
    assert_eq!(decoded[1].kind, RecordKind::Discard);
}

#[test]
fn a_frame_decodes_the_same_whatever_chunks_it_arrives_in() {
    let first: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let second: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let records = [
        (header(1, RecordKind::Write, 5000, 5000), &first[..]),
        (header(2, RecordKind::Discard, 4096, 0), &[][..]),
        (header(3, RecordKind::Write, 300, 300), &second[..]),
    ];
    let frame = frame_of(encode_batch_header(&records), &[&first, &second]);
    let body = bytes::Bytes::copy_from_slice(&frame[4..]);
    let whole = decode_frame(vec![body.clone()]).unwrap();
    let payloads = |frame: &Frame| match frame {
        Frame::Records(records) => records.iter().map(|r| (r.lsn, r.payload.to_vec())).collect::<Vec<_>>(),
        Frame::Control(_) | Frame::Range(_) => panic!("records expected"),
    };
    assert_eq!(payloads(&whole), vec![(1, first.clone()), (2, Vec::new()), (3, second.clone())]);
    // Every two-chunk split, and many-chunk splits (empty chunks included).
    for cut in 0..=body.len() {
        let split = decode_frame(vec![body.slice(..cut), body.slice(cut..)]).unwrap();
        assert_eq!(payloads(&split), payloads(&whole), "cut at {cut}");
    }
    for step in [1, 3, 64, 1000, 4999] {
        let chunks: Vec<_> = (0..body.len()).step_by(step).map(|at| body.slice(at..(at + step).min(body.len()))).chain([bytes::Bytes::new()]).collect();
        let Frame::Records(split) = decode_frame(chunks).unwrap() else { panic!("records expected") };
        assert!(split[0].payload.parts().iter().all(|part| part.len() <= step), "payload pieces are slices of the chunks, not gathered (step {step})");
        assert_eq!(split.iter().map(|r| (r.lsn, r.payload.to_vec())).collect::<Vec<_>>(), payloads(&whole));
    }
    // Truncated anywhere, in pieces: an error.
    for cut in 0..body.len() {
        assert!(decode_frame(vec![body.slice(..cut / 2), body.slice(cut / 2..cut)]).is_err(), "truncated at {cut}");
    }
}

#[test]
fn garbage_and_truncation_are_errors_not_panics() {
    let data = vec![1u8; 100];
    let records = [(header(1, RecordKind::Write, 100, 100), &data[..]), (header(2, RecordKind::Write, 100, 100), &data[..])];
    let frame = frame_of(encode_batch_header(&records), &[&data, &data]);
    let body = &frame[4..];
    for cut in 0..body.len() {
        assert!(decode_body(&body[..cut]).is_err(), "truncated at {cut}");
    }
    let mut rng = 12345u64;
    for _ in 0..2000 {
        let mut garbled = body.to_vec();
        for _ in 0..3 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (rng >> 33) as usize % garbled.len();
            garbled[at] ^= (rng >> 8) as u8 | 1;
        }
        let _ = decode_body(&garbled); // must not panic
    }
    assert_eq!(check_length([0, 0, 0, 0]), Err(WireError::Empty));
    assert!(matches!(check_length(u32::MAX.to_le_bytes()), Err(WireError::TooLarge(_))));
    assert_eq!(decode_body(&[9]), Err(WireError::UnknownKind(9)));
    // A gap in LSNs inside a batch is refused.
    let gap = [(header(1, RecordKind::Discard, 1, 0), &[][..]), (header(3, RecordKind::Discard, 1, 0), &[][..])];
    assert!(matches!(decode_body(&encode_batch_header(&gap)[4..]), Err(WireError::BadBatch(_))));
}

#[test]
fn compressed_batches_round_trip_and_bound_what_they_decompress_to() {
    let text: Vec<u8> = b"ublk-mirror compresses record batches. ".iter().copied().cycle().take(12288).collect();
    let records = [
        (header(7, RecordKind::Write, 4096, 4096), &text[..4096]),
        (header(8, RecordKind::WriteZeroes, 4096, 0), &[][..]),
        (header(9, RecordKind::Write, 8192, 8192), &text[4096..]),
    ];
    let block = super::compression::BatchCompressor::new().compress(1, records.iter().map(|(_, p)| *p)).unwrap();
    let frame = frame_of(encode_compressed_batch_header(&records, block.len()), &[&block]);
    assert!(frame.len() < text.len() / 4, "{} bytes on the wire for {}", frame.len(), text.len());
    assert_eq!(check_length(frame[0..4].try_into().unwrap()).unwrap(), frame.len() - 4);
    let raw = frame_of(encode_batch_header(&records), &[&text]);
    // The same records as the raw frame gives, whatever chunks the frame arrives in.
    let body = bytes::Bytes::copy_from_slice(&frame[4..]);
    for cut in 0..=body.len() {
        assert_eq!(decode_frame(vec![body.slice(..cut), body.slice(cut..)]).unwrap(), decode_body(&raw[4..]).unwrap(), "cut at {cut}");
    }
    // A header claiming fewer payload bytes than the block holds (a bomb), or more, or a
    // damaged block: errors, never more allocated than the header claims.
    let short = [(header(7, RecordKind::Write, 4096, 4096), &text[..4096])];
    let bomb = frame_of(encode_compressed_batch_header(&short, block.len()), &[&block]);
    assert!(matches!(decode_body(&bomb[4..]), Err(WireError::Compressed(CompressionError::Corrupt(_)))), "{:?}", decode_body(&bomb[4..]));
    let long = [(header(7, RecordKind::Write, 4096, 4096), &text[..4096]), (header(8, RecordKind::Write, 16384, 16384), &text[..])];
    let claim = frame_of(encode_compressed_batch_header(&long, block.len()), &[&block]);
    assert!(matches!(decode_body(&claim[4..]), Err(WireError::Compressed(CompressionError::WrongLength { .. }))));
    for cut in 0..body.len() {
        assert!(decode_body(&body[..cut]).is_err(), "truncated at {cut}");
    }
    let mut damaged = body.to_vec();
    let at = damaged.len() - 5;
    damaged[at] ^= 0x55;
    assert!(decode_body(&damaged).is_err());
}

/// Both directions of a version mismatch name both versions. An applier of this version
/// refuses with `Refusal::Other`, whose place in the enums (Control 2, Refusal 7) protocol 5
/// senders decode; an applier of protocol 5 answers `Refusal::Protocol(ours)`, which this
/// sender explains as an older applier.
#[test]
fn protocol_mismatches_are_refused_naming_both_versions() {
    let hello = |protocol| Hello {
        protocol,
        volume_uuid: [1; 16],
        volume_name: "vol0".into(),
        size: 1 << 30,
        generation: [2; 16],
        first_lsn: 1,
        last_lsn: 9,
        history: vec![WireGeneration { id: [2; 16], parent: None, branch_lsn: 0, created_us: 0 }],
    };
    assert_eq!(check_protocol(&hello(PROTOCOL_VERSION)), Ok(()));
    for theirs in [5, 6, 8, 0] {
        let refusal = check_protocol(&hello(theirs)).unwrap_err();
        let text = refusal.to_string();
        assert!(text.contains(&format!("protocol {theirs} ")) && text.contains(&format!("protocol {PROTOCOL_VERSION}:")), "{text}");
        let frame = encode_control(&Control::Refused(refusal.clone()));
        assert_eq!(&frame[5..7], &[2, 7], "Control::Refused(Refusal::Other) as every version encodes it");
        assert_eq!(decode_body(&frame[4..]).unwrap(), Frame::Control(Control::Refused(refusal)));
    }
    // What a protocol 5 applier sends this sender, and how it reads (a protocol 6 one
    // refuses with `Other`, as above).
    let old = Refusal::Protocol(PROTOCOL_VERSION).to_string();
    assert!(old.contains("protocol 7") && old.contains("protocol 6 or earlier"), "{old}");
    // The Hello keeps protocol 5's layout (the version first): an older applier reads our
    // version and refuses it instead of failing to decode.
    let frame = encode_control(&Control::Hello(hello(PROTOCOL_VERSION)));
    assert_eq!(&frame[5..7], &[0, PROTOCOL_VERSION as u8]);
}

/// A coalesced range (protocol 7) decodes the same in any chunks, every truncation and
/// garbling is an error (never a panic), and batches never carry the journal's range kinds.
#[test]
fn coalesced_ranges_round_trip_and_refuse_bad_input() {
    use crate::journal::range::{Piece, RangeMeta};
    let meta = RangeMeta {
        last_lsn: 30,
        pieces: vec![
            Piece { kind: RecordKind::Write, extent: Extent::new(0, 700) },
            Piece { kind: RecordKind::Discard, extent: Extent::new(4096, 4096) },
            Piece { kind: RecordKind::Write, extent: Extent::new(9000, 3) },
        ],
    };
    let data: Vec<u8> = (0..703u32).map(|i| i as u8).collect();
    let mut frame = encode_range_header(20, 99, &meta);
    frame.extend_from_slice(&data);
    assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
    let body = bytes::Bytes::copy_from_slice(&frame[4..]);
    let Frame::Range(range) = decode_body(&body).unwrap() else { panic!("a range expected") };
    assert_eq!((range.first_lsn, range.last_lsn(), range.timestamp_us, &range.meta), (20, 30, 99, &meta));
    let pieces: Vec<_> = range.pieces().map(|(piece, parts)| (piece, parts.concat())).collect();
    assert_eq!(pieces[0].1, data[..700].to_vec());
    assert!(pieces[1].1.is_empty());
    assert_eq!(pieces[2].1, data[700..].to_vec());
    assert_eq!(range.encoded.len(), body.len() - 17, "the journal keeps the range encoding as it came");
    // Chunks change how the payloads are sliced, not what they hold.
    let flat = |frame: Frame| match frame {
        Frame::Range(r) => (r.first_lsn, r.meta.clone(), r.encoded.to_vec(), r.pieces().map(|(p, parts)| (p, parts.concat())).collect::<Vec<_>>()),
        other => panic!("a range expected, got {other:?}"),
    };
    let whole = flat(Frame::Range(range.clone()));
    for cut in 0..body.len() {
        assert_eq!(flat(decode_frame(vec![body.slice(..cut), body.slice(cut..)]).unwrap()), whole, "cut at {cut}");
        assert!(decode_body(&body[..cut]).is_err(), "truncated at {cut}");
    }
    let mut longer = body.to_vec();
    longer.push(0);
    assert!(decode_body(&longer).is_err(), "trailing bytes");
    for at in 0..body.len() {
        let mut garbled = body.to_vec();
        garbled[at] ^= 0xa5;
        let _ = decode_body(&garbled); // must not panic
    }
    // The range kinds (5, 6) are no record kinds of a batch.
    for kind in [RecordKind::Range, RecordKind::Covered] {
        let batch = encode_batch_header(&[(header(1, kind, 0, 0), &[][..])]);
        assert!(matches!(decode_body(&batch[4..]), Err(WireError::BadBatch(_))), "{kind:?}");
    }
}

/// A compressed coalesced range decodes to the same range as its raw frame (what the applier
/// journals is the decompressed encoding), and a lying length or a truncated, garbled block
/// is an error, never a panic.
#[test]
fn compressed_coalesced_ranges_decode_as_raw_ones() {
    use crate::journal::range::{Piece, RangeMeta};
    let meta = RangeMeta {
        last_lsn: 40,
        pieces: vec![Piece { kind: RecordKind::Write, extent: Extent::new(0, 8192) }, Piece { kind: RecordKind::WriteZeroes, extent: Extent::new(8192, 4096) }],
    };
    let data = vec![b'x'; 8192];
    let mut raw = encode_range_header(31, 7, &meta);
    raw.extend_from_slice(&data);
    let Frame::Range(expected) = decode_body(&raw[4..]).unwrap() else { panic!("a range expected") };
    let encoding = [meta.encode(), data.clone()].concat();
    let block = crate::protocol::compression::BatchCompressor::new().compress(3, [&encoding[..]].into_iter()).expect("repetitive data shrinks");
    let mut frame = super::encode_compressed_range_header(31, 7, encoding.len() as u64, block.len());
    frame.extend_from_slice(&block);
    assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
    assert!(frame.len() < raw.len() / 4, "{} bytes compressed against {} raw", frame.len(), raw.len());
    let Frame::Range(range) = decode_body(&frame[4..]).unwrap() else { panic!("a range expected") };
    assert_eq!((range.first_lsn, range.timestamp_us, &range.meta, range.encoded.to_vec()), (31, 7, &meta, expected.encoded.to_vec()));
    assert_eq!(
        range.pieces().map(|(p, parts)| (p, parts.concat())).collect::<Vec<_>>(),
        expected.pieces().map(|(p, parts)| (p, parts.concat())).collect::<Vec<_>>()
    );
    for cut in 0..frame.len() - 4 {
        assert!(decode_body(&frame[4..4 + cut]).is_err(), "truncated at {cut}");
    }
    // A stated length other than the block's, or beyond what a range may be.
    for length in [encoding.len() as u64 - 1, encoding.len() as u64 + 1, u64::MAX] {
        let mut lying = frame.clone();
        lying[21..29].copy_from_slice(&length.to_le_bytes());
        assert!(decode_body(&lying[4..]).is_err(), "length {length}");
    }
    for at in 4..frame.len() {
        let mut garbled = frame.clone();
        garbled[at] ^= 0xa5;
        let _ = decode_body(&garbled[4..]); // must not panic
    }
}

/// Region and chunk bytes go as serde bytes (one copy) rather than a sequence of u8 (a call
/// per byte: a resync spent a sixth of its CPU there), and the bytes on the wire are the
/// same: a peer of the same protocol version built before the change decodes them.
#[test]
fn byte_fields_encode_as_the_sequence_they_were() {
    #[derive(Serialize)]
    struct Before {
        chunk: u64,
        zero: bool,
        data: Vec<u8>,
        local_changes: Option<Vec<u8>>,
    }
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    let before = bincode::serde::encode_to_vec(Before { chunk: 9, zero: false, data: data.clone(), local_changes: None }, config()).unwrap();
    let frame = encode_control(&Control::SyncChunk { chunk: 9, zero: false, data: data.clone() });
    // Frame: length (4), kind (1), the variant's index (1), then the fields.
    assert_eq!(&frame[6..], &before[..before.len() - 1], "the same bytes for the same fields");
    assert_eq!(decode_body(&frame[4..]).unwrap(), Frame::Control(Control::SyncChunk { chunk: 9, zero: false, data }));
    let changes = vec![1u8, 2, 3];
    let welcome = Control::Welcome {
        received_lsn: 1,
        applied_lsn: 1,
        consistent: true,
        needs_sync: false,
        consistent_lsn: None,
        local_changes: Some(changes.clone()),
        codecs: vec![],
    };
    let frame = encode_control(&welcome);
    let old_option = bincode::serde::encode_to_vec(Some(changes), config()).unwrap();
    assert!(frame.windows(old_option.len()).any(|w| w == &old_option[..]), "an optional byte field as before");
    assert_eq!(decode_body(&frame[4..]).unwrap(), Frame::Control(welcome));
}
