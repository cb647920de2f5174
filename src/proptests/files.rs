//! Small metadata files and payloads: marker payloads, generation histories, snapshot chunk
//! maps, `markers.json`, the replica state file and a mirror's checkpoints, gaps and verify.

use proptest::prelude::*;

use super::cases_divided_by;
use crate::applier::snapshot::cow::{self, CowStore, MapHeader, ENTRY_BYTES, TOMBSTONE};
use crate::generation::{Generation, History, Relation};
use crate::layout::{ReplicaDir, VolumeDir};
use crate::marker::Marker;

/// JSON-looking text: a valid object's pieces in arbitrary order and with arbitrary values,
/// so decoding gets past the syntax now and then.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("null".to_string()),
        "\"[a-z_]{1,12}\"",
        "\"[0-9a-f-]{36}\"",
        any::<u64>().prop_map(|n| n.to_string()),
        "-?[0-9]{1,30}(\\.[0-9]+)?(e[0-9]{1,4})?",
        "\\PC{0,8}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat().into_bytes())
}

fn bytes_or_json() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), jsonish()]
}

fn uuid() -> impl Strategy<Value = uuid::Uuid> {
    (0u8..4).prop_map(|n| uuid::Uuid::from_bytes([n; 16]))
}

fn generations() -> impl Strategy<Value = Vec<Generation>> {
    let generation = (uuid(), proptest::option::of(uuid()), any::<u64>(), any::<u64>()).prop_map(|(id, parent, branch_lsn, created_us)| Generation {
        id,
        parent,
        branch_lsn,
        created_us,
    });
    proptest::collection::vec(generation, 0..5)
}

proptest! {
    #[test]
    fn marker_payloads_decode_to_safe_names_or_nothing(payload in bytes_or_json(), name in "\\PC{0,20}", group in proptest::option::of("\\PC{0,10}"), members in proptest::collection::vec("\\PC{0,10}", 0..3)) {
        if let Some(marker) = Marker::decode(&payload) {
            prop_assert!(marker.validate().is_ok(), "{:?}", marker);
        }
        let crafted = Marker { version: 1, name, id: uuid::Uuid::nil(), created_us: 0, group, members };
        if let Some(marker) = Marker::decode(&crafted.encode()) {
            prop_assert!(marker.validate().is_ok(), "{:?}", marker);
        }
    }

    #[test]
    fn generation_histories_decode_whole_and_compare_in_range(list in generations(), other in generations(), ours in any::<u64>(), theirs in any::<u64>(), noise in bytes_or_json()) {
        let _ = serde_json::from_slice::<History>(&noise);
        let Ok(history) = serde_json::from_slice::<History>(&serde_json::to_vec(&list).unwrap()) else { return Ok(()) };
        let generations = history.generations();
        prop_assert!(!generations.is_empty());
        for pair in generations.windows(2) {
            prop_assert_eq!(pair[1].parent, Some(pair[0].id));
            prop_assert!(pair[1].branch_lsn >= pair[0].branch_lsn);
        }
        let Ok(theirs_history) = serde_json::from_slice::<History>(&serde_json::to_vec(&other).unwrap()) else { return Ok(()) };
        if let Relation::Branched { common_lsn, ours_after, theirs_after } = history.relation(ours, &theirs_history, theirs) {
            prop_assert!(common_lsn <= ours && common_lsn <= theirs);
            prop_assert_eq!(ours_after, ours - common_lsn);
            prop_assert_eq!(theirs_after, theirs - common_lsn);
        }
    }

    #[test]
    fn chunk_map_headers_decode_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        if let Ok(header) = MapHeader::decode(&bytes) {
            prop_assert!(header.chunk_bytes > 0 && header.chunk_bytes % 4096 == 0);
        }
    }
}

proptest! {
    #![proptest_config(cases_divided_by(8))]

    #[test]
    fn chunk_maps_open_only_with_chunks_of_the_device(
        chunk_kb in prop_oneof![Just(4u64), Just(64)],
        device_size in prop_oneof![0u64..1 << 20, any::<u64>()],
        entries in proptest::collection::vec(prop_oneof![0u64..300, Just(TOMBSTONE), any::<u64>()], 0..8),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = CowStore::create(dir.path(), chunk_kb << 10, device_size).unwrap();
        let header = *store.header();
        drop(store);
        let mut map = std::fs::read(dir.path().join(cow::MAP_FILE)).unwrap();
        for (index, chunk) in entries.iter().enumerate() {
            map.extend_from_slice(&header.encode_entry(index as u64, *chunk, 0));
        }
        map.extend_from_slice(&tail);
        std::fs::write(dir.path().join(cow::MAP_FILE), &map).unwrap();
        let chunks = device_size.div_ceil(header.chunk_bytes);
        if let Ok(store) = CowStore::open(dir.path()) {
            for chunk in &entries {
                prop_assert!(*chunk < chunks || !store.is_preserved(*chunk), "chunk {} of a {}-chunk device accepted", chunk, chunks);
            }
            // A torn tail is cut to whole entries.
            prop_assert!(std::fs::metadata(dir.path().join(cow::MAP_FILE)).unwrap().len() % ENTRY_BYTES as u64 == MapHeader::entry_offset(0) % ENTRY_BYTES as u64);
        }
    }

    #[test]
    fn volume_and_mirror_state_files_of_arbitrary_bytes_read_or_refuse(markers in bytes_or_json(), state in bytes_or_json(), gaps in bytes_or_json(), verify in bytes_or_json(), replica in bytes_or_json()) {
        let dir = tempfile::tempdir().unwrap();
        let volume = VolumeDir::new(dir.path());
        std::fs::create_dir_all(volume.mirrors()).unwrap();
        std::fs::write(volume.markers(), &markers).unwrap();
        std::fs::write(volume.mirror_state("m"), &state).unwrap();
        std::fs::write(volume.mirror_gaps("m"), &gaps).unwrap();
        std::fs::write(volume.mirror_verify("m"), &verify).unwrap();
        let _ = crate::volume::marker_history(dir.path());
        let _ = crate::mirror::checkpoints::load(&volume, "m");
        let _ = crate::mirror::checkpoints::load_gaps(&volume, "m");
        let _ = crate::mirror::checkpoints::load_verify(&volume, "m");
        let replica_dir = ReplicaDir::new(dir.path().join("replica"));
        std::fs::create_dir_all(replica_dir.root()).unwrap();
        std::fs::write(replica_dir.state(), &replica).unwrap();
        if let Ok(state) = crate::applier::replica::ReplicaState::load(&replica_dir) {
            // Whatever a state file says is what it says again once saved.
            state.save(&replica_dir).unwrap();
            prop_assert_eq!(crate::applier::replica::ReplicaState::load(&replica_dir).unwrap(), state);
        }
    }
}

/// Found by the properties above: a chunk map entry that verifies but names a chunk past the
/// device was accepted (a restore then wrote outside the image, or overflowed computing where).
#[test]
fn regression_a_chunk_past_the_device_invalidates_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let store = CowStore::create(dir.path(), 4096, 8192).unwrap();
    let header = *store.header();
    drop(store);
    let mut map = std::fs::read(dir.path().join(cow::MAP_FILE)).unwrap();
    map.extend_from_slice(&header.encode_entry(0, 1, 0));
    map.extend_from_slice(&header.encode_entry(1, u64::MAX / 2, 0));
    std::fs::write(dir.path().join(cow::MAP_FILE), &map).unwrap();
    let error = CowStore::open(dir.path()).err().expect("refused");
    assert!(error.contains("damaged"), "{error}");
}
