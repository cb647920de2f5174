//! Journal: append, iterate, recover, torn tails, stale records, corruption, trimming.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use ublk_mirror::extent::Extent;
use ublk_mirror::journal::{AppendError, Journal, JournalError, JournalOptions, JournalReader, RecordKind};

const MIB: u64 = 1 << 20;

fn options(segment_size: u64, capacity: u64) -> JournalOptions {
    JournalOptions { segment_size, capacity, journal_id: *b"journal-test-id!" }
}

/// Deterministic, distinguishable payload for record `i`.
fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i.wrapping_mul(31).wrapping_add(j as u64 * 7) % 251) as u8).collect()
}

fn read_all(journal: &std::sync::Arc<Journal>, from: u64) -> Vec<ublk_mirror::journal::Record> {
    let mut reader = JournalReader::new(journal.clone(), from).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        records.push(record);
    }
    records
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().chars().next().unwrap().is_ascii_digit())
        .collect();
    files.sort();
    files
}

#[test]
fn append_iterate_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let opts = options(MIB, 8 * MIB);
    Journal::create(&dir, opts).unwrap();
    {
        let (journal, mut writer, report) = Journal::open(&dir, opts).unwrap();
        assert_eq!(report.last_lsn, 0);
        for i in 1..=200u64 {
            let lsn = match i % 4 {
                0 => writer.append(RecordKind::WriteZeroes, Extent::new(i * 4096, 8192), &[], 0),
                1 => writer.append(RecordKind::Discard, Extent::new(i * 4096, 4096), &[], 0),
                2 => writer.append(RecordKind::Marker, Extent::new(0, 0), b"snap", 0),
                _ => writer.append(RecordKind::Write, Extent::new(i * 512, 30_000 + i), &payload(i, 30_000 + i as usize), 0),
            }
            .map_err(|e| format!("{e:?}"))
            .unwrap();
            assert_eq!(lsn, i, "LSNs go up by one");
            if i % 17 == 0 {
                writer.commit(i % 34 == 0).unwrap();
            }
        }
        writer.commit(true).unwrap();
        assert_eq!(journal.synced_lsn(), 200);
        let records = read_all(&journal, 1);
        assert_eq!(records.len(), 200);
        assert_eq!(read_all(&journal, 150)[0].header.lsn, 150);
    }
    let (journal, mut writer, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.last_lsn, 200);
    assert!(report.torn_tail.is_none());
    assert!(report.segments > 1, "several segments were used");
    let records = read_all(&journal, 1);
    for (i, record) in (1..=200u64).zip(&records) {
        assert_eq!(record.header.lsn, i);
        if i % 4 == 3 {
            assert_eq!(record.header.kind, RecordKind::Write);
            assert_eq!(record.payload, payload(i, 30_000 + i as usize));
        }
    }
    // Appending continues the LSN sequence after recovery, in the partial last block.
    assert_eq!(writer.append(RecordKind::Write, Extent::new(0, 3), b"abc", 0).map_err(|e| format!("{e:?}")).unwrap(), 201);
    writer.commit(true).unwrap();
    drop((journal, writer));
    let (journal, _writer, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.last_lsn, 201);
    assert_eq!(read_all(&journal, 201)[0].payload, &b"abc"[..]);
}

#[test]
fn torn_tail_at_every_byte_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let opts = options(MIB, 4 * MIB);
    Journal::create(&base, opts).unwrap();
    let (last_position, last_len) = {
        let (journal, mut writer, _) = Journal::open(&base, opts).unwrap();
        for i in 1..=20u64 {
            writer.append(RecordKind::Write, Extent::new(i * 4096, 100), &payload(i, 100), 0).map_err(|e| format!("{e:?}")).unwrap();
        }
        writer.commit(true).unwrap();
        let before = journal.usage().used_bytes;
        writer.append(RecordKind::Write, Extent::new(0, 300), &payload(21, 300), 0).map_err(|e| format!("{e:?}")).unwrap();
        writer.commit(false).unwrap();
        let after = journal.usage().used_bytes;
        (4096 + before, after - before)
    };
    let segment = segment_files(&base).pop().unwrap();
    let original = std::fs::read(&segment).unwrap();
    let work = tmp.path().join("work");
    // Cut the last record at every byte: bytes from `cut` on never reached the disk.
    assert_eq!(last_len, 368, "64-byte header + 300 bytes, aligned to 8");
    for cut in 0..(64 + 300) {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        let mut torn = original.clone();
        for byte in &mut torn[(last_position + cut) as usize..(last_position + last_len) as usize] {
            *byte = 0;
        }
        std::fs::write(work.join(segment.file_name().unwrap()), &torn).unwrap();
        let (journal, mut writer, report) = Journal::open(&work, opts).unwrap();
        assert_eq!(report.last_lsn, 20, "cut at byte {cut}: the torn record is dropped");
        let records = read_all(&journal, 1);
        assert_eq!(records.len(), 20);
        assert_eq!(records[19].payload, payload(20, 100));
        // The journal accepts new records after the cut and keeps them.
        assert_eq!(writer.append(RecordKind::Write, Extent::new(0, 5), b"after", 0).map_err(|e| format!("{e:?}")).unwrap(), 21);
        writer.commit(true).unwrap();
        drop((journal, writer));
        let (journal, _, report) = Journal::open(&work, opts).unwrap();
        assert_eq!(report.last_lsn, 21);
        assert_eq!(read_all(&journal, 21)[0].payload, &b"after"[..]);
    }
    // Untouched, the last record is there.
    let (_, _, report) = Journal::open(&base, opts).unwrap();
    assert_eq!(report.last_lsn, 21);
}

#[test]
fn torn_commit_with_later_records_is_cut_not_called_corruption() {
    // A multi-record commit that never synced: its middle record lost, a later one arrived.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let opts = options(MIB, 4 * MIB);
    Journal::create(&dir, opts).unwrap();
    let (journal, mut writer, _) = Journal::open(&dir, opts).unwrap();
    writer.append(RecordKind::Write, Extent::new(0, 100), &payload(1, 100), 0).map_err(|e| format!("{e:?}")).unwrap();
    writer.commit(true).unwrap();
    let start = 4096 + journal.usage().used_bytes;
    for i in 2..=4u64 {
        writer.append(RecordKind::Write, Extent::new(0, 100), &payload(i, 100), 0).map_err(|e| format!("{e:?}")).unwrap();
    }
    writer.commit(false).unwrap();
    drop((journal, writer));
    let segment = segment_files(&dir).pop().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0u8; 40], start + 20).unwrap(); // damage LSN 2 only
    let (journal, mut writer, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.last_lsn, 1);
    assert!(report.torn_tail.is_some());
    // The unsynced LSNs 3 and 4 left behind must not come back after new appends.
    writer.append(RecordKind::Write, Extent::new(0, 100), &payload(9, 100), 0).map_err(|e| format!("{e:?}")).unwrap();
    writer.commit(true).unwrap();
    drop((journal, writer));
    let (journal, _, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.last_lsn, 2);
    assert_eq!(read_all(&journal, 2)[0].payload, payload(9, 100));
}

#[test]
fn flipped_bit_mid_journal_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(MIB, 8 * MIB);
    let dir = tmp.path().join("j");
    Journal::create(&dir, opts).unwrap();
    let mut positions = Vec::new();
    {
        let (journal, mut writer, _) = Journal::open(&dir, opts).unwrap();
        for i in 1..=40u64 {
            positions.push(4096 + journal.usage().used_bytes);
            writer.append(RecordKind::Write, Extent::new(0, 200), &payload(i, 200), 0).map_err(|e| format!("{e:?}")).unwrap();
            writer.commit(true).unwrap();
        }
    }
    let segment = segment_files(&dir).pop().unwrap();
    let pristine = std::fs::read(&segment).unwrap();
    // In the last segment: a later record proves the damaged one was durable.
    let mut damaged = pristine.clone();
    damaged[positions[19] as usize + 64 + 50] ^= 0x04;
    std::fs::write(&segment, &damaged).unwrap();
    let error = Journal::open(&dir, opts).err().expect("corruption must not be accepted");
    let text = error.to_string();
    assert!(matches!(error, JournalError::Corrupt(_)), "{text}");
    assert!(text.contains("expected record LSN 20"), "{text}");
    assert!(text.contains(&format!("offset {}", positions[19])), "{text}");
    assert!(text.contains(segment.file_name().unwrap().to_str().unwrap()), "{text}");
    // Nothing was changed by the failed open.
    assert_eq!(std::fs::read(&segment).unwrap(), damaged);
    assert!(Journal::inspect(&dir).is_err());
    std::fs::write(&segment, &pristine).unwrap();
    assert_eq!(Journal::open(&dir, opts).unwrap().2.last_lsn, 40);
}

#[test]
fn flipped_bit_in_sealed_segment_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(MIB, 8 * MIB);
    let dir = tmp.path().join("j");
    Journal::create(&dir, opts).unwrap();
    {
        let (_journal, mut writer, _) = Journal::open(&dir, opts).unwrap();
        for i in 1..=600u64 {
            writer.append(RecordKind::Write, Extent::new(0, 4096), &payload(i, 4096), 0).map_err(|e| format!("{e:?}")).unwrap();
        }
        writer.commit(true).unwrap();
    }
    let files = segment_files(&dir);
    assert!(files.len() >= 2);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&files[0]).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 4096 * 40 + 999).unwrap();
    file.write_all_at(&[byte[0] ^ 1], 4096 * 40 + 999).unwrap();
    let text = Journal::open(&dir, opts).err().expect("corrupt").to_string();
    assert!(text.contains("expected record LSN") && text.contains("next segment"), "{text}");
}

#[test]
fn trimming_recycles_segments_and_stale_records_never_return() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let opts = options(MIB, 4 * MIB); // four segment files at most
    Journal::create(&dir, opts).unwrap();
    let (journal, mut writer, _) = Journal::open(&dir, opts).unwrap();
    let mut lsn = 0;
    // Forty segments' worth of records through four files.
    for round in 0..40u64 {
        for _ in 0..60 {
            lsn = writer.append(RecordKind::Write, Extent::new(round * 4096, 16000), &payload(round, 16000), 0).map_err(|e| format!("{e:?}")).unwrap();
        }
        writer.commit(true).unwrap();
        // Keep the last 100 records readable, trim the rest.
        let keep_from = lsn.saturating_sub(100).max(1);
        journal.trim_through(keep_from - 1).unwrap();
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert!(files <= 4, "never more files than the capacity allows ({files})");
        let records = read_all(&journal, keep_from.max(journal.first_lsn()));
        assert_eq!(records.last().unwrap().header.lsn, lsn);
    }
    assert!(journal.first_lsn() > 1000);
    let first = journal.first_lsn();
    drop((journal, writer));
    // Recovery over recycled files: stale records of earlier incarnations are ignored.
    let (journal, mut writer, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.last_lsn, lsn);
    assert_eq!(report.first_lsn, first);
    let records = read_all(&journal, first);
    assert_eq!(records.len() as u64, lsn - first + 1);
    // Reading a trimmed LSN is refused with a clear error.
    assert!(matches!(JournalReader::new(journal.clone(), 1), Err(JournalError::NotRetained { .. })));

    // Without trimming the journal fills up and says so instead of overwriting.
    let mut full = false;
    for _ in 0..1000 {
        match writer.append(RecordKind::Write, Extent::new(0, 16000), &payload(1, 16000), 0) {
            Ok(_) => {}
            Err(AppendError::JournalFull) => {
                full = true;
                break;
            }
            Err(AppendError::Failed(e)) => panic!("{e}"),
        }
    }
    assert!(full && journal.is_full());
    assert!(!writer.wait_for_space(Duration::from_millis(50)));
    writer.commit(true).unwrap();
    journal.trim_through(journal.synced_lsn()).unwrap();
    assert!(writer.wait_for_space(Duration::from_millis(50)));
    writer.append(RecordKind::Write, Extent::new(0, 16000), &payload(1, 16000), 0).map_err(|e| format!("{e:?}")).unwrap();
    assert!(!journal.is_full());
}

#[test]
fn foreign_and_invalid_journals_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    Journal::create(&dir, options(MIB, 4 * MIB)).unwrap();
    let other = JournalOptions { journal_id: *b"another-journal!", ..options(MIB, 4 * MIB) };
    let text = Journal::open(&dir, other).err().unwrap().to_string();
    assert!(text.contains("belongs to another journal"), "{text}");
    assert!(Journal::create(&tmp.path().join("k"), options(1000, 4 * MIB)).is_err());
    assert!(Journal::create(&tmp.path().join("k"), options(MIB, MIB)).is_err());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(Journal::open(&empty, options(MIB, 4 * MIB)).err().unwrap().to_string().contains("no segment files"));
}

/// A reader that read ahead past the written end (zeros, or a recycled file's old records)
/// must still see the records appended later, at every point, across segment switches.
#[test]
fn reader_keeps_up_with_a_writer_across_read_ahead_and_recycled_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let opts = options(4 * MIB, 12 * MIB);
    Journal::create(&dir, opts).unwrap();
    let (journal, mut writer, _) = Journal::open(&dir, opts).unwrap();
    let mut reader = JournalReader::new(journal.clone(), 1).unwrap();
    let mut next_expected = 1u64;
    let mut appended = 0u64;
    // 40 rounds: append a burst (sizes vary, so records straddle the read-ahead's edges), read
    // part of it, trim what was read so segments are recycled and reused with old bytes in them.
    for round in 0..40u64 {
        for _ in 0..(round % 7 + 1) * 40 {
            appended += 1;
            let len = (appended * 4093 % 20_000 + 1) as usize;
            assert_eq!(
                writer.append(RecordKind::Write, Extent::new(0, len as u64), &payload(appended, len), 0).map_err(|e| format!("{e:?}")).unwrap(),
                appended
            );
        }
        writer.commit(round % 3 == 0).unwrap();
        let stop = if round % 2 == 0 { appended } else { appended - 30 };
        while next_expected <= stop {
            let record = reader.next_record().unwrap().expect("a written record");
            assert_eq!(record.header.lsn, next_expected);
            let len = (next_expected * 4093 % 20_000 + 1) as usize;
            assert_eq!(record.payload, payload(next_expected, len), "LSN {next_expected}");
            next_expected += 1;
        }
        journal.sync().unwrap();
        journal.trim_through(next_expected.saturating_sub(1)).unwrap();
    }
    assert!(next_expected > 3000, "read {next_expected} records");
}

/// A preallocated journal has every segment file from the start: it grows into its spares
/// (no file is made while writing), and recovers as any other.
#[test]
fn a_preallocated_journal_grows_into_its_spares_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let opts = options(MIB, 8 * MIB);
    Journal::create(&dir, opts).unwrap();
    assert_eq!(Journal::preallocate(&dir, &opts).unwrap(), 7, "one segment exists, seven more are made");
    assert_eq!(Journal::preallocate(&dir, &opts).unwrap(), 0, "a second time makes nothing");
    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    let before = names(&dir);
    assert_eq!(before.len(), 8, "{before:?}");
    for name in &before {
        assert_eq!(std::fs::metadata(dir.join(name)).unwrap().len(), MIB, "{name} is a whole segment");
    }
    {
        let (journal, mut writer, report) = Journal::open(&dir, opts).unwrap();
        assert_eq!(report.spare_segments, 7);
        for i in 1..=100u64 {
            writer.append(RecordKind::Write, Extent::new(i * 4096, 40_000), &payload(i, 40_000), 0).map_err(|e| format!("{e:?}")).unwrap();
        }
        writer.commit(true).unwrap();
        assert_eq!(journal.synced_lsn(), 100);
    }
    let after = names(&dir);
    assert_eq!(after.len(), 8, "no file was made or lost: {after:?}");
    assert!(segment_files(&dir).len() >= 4, "the journal grew into its spares: {after:?}");
    let (journal, _writer, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.last_lsn, 100);
    let records = read_all(&journal, 1);
    assert_eq!(records.len(), 100);
    assert_eq!(records[99].payload, payload(100, 40_000));
}

/// The inode of each `.seg` file in `dir`, by name.
fn seg_inodes(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().ino()))
        .collect()
}

/// A journal that replaces another (a replica's after a sync) takes the old one's files as
/// spares, up to its capacity: no file is made beyond its first segment, none is lost from
/// the count. The new journal continues after the old one's LSNs (the rule its caller keeps),
/// so the old records left in those files never surface: not when the new journal writes
/// over them and recovers, and not after a crash between a writer's rename of such a spare
/// and its new header (the file is returned to the pool).
#[test]
fn a_replacing_journal_adopts_the_old_ones_files_and_no_old_record_surfaces() {
    use ublk_mirror::journal::format::segment_file_name;
    let tmp = tempfile::tempdir().unwrap();
    let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
    let opts = options(MIB, 8 * MIB);
    Journal::create(&old, opts).unwrap();
    Journal::preallocate(&old, &opts).unwrap();
    {
        let (_journal, mut writer, _) = Journal::open(&old, opts).unwrap();
        for i in 1..=100u64 {
            writer.append(RecordKind::Write, Extent::new(i * 4096, 40_000), &payload(i, 40_000), 0).map_err(|e| format!("{e:?}")).unwrap();
        }
        writer.commit(true).unwrap();
    }
    let old_files = seg_inodes(&old);
    assert_eq!(old_files.len(), 8);
    Journal::create_at(&new, opts, 101).unwrap();
    assert_eq!(Journal::adopt_segments(&new, &old, &opts).unwrap(), 7, "room for seven beside the new first segment");
    let new_files = seg_inodes(&new);
    let inodes = |files: &std::collections::BTreeMap<String, u64>| files.values().copied().collect::<std::collections::BTreeSet<u64>>();
    assert_eq!(new_files.len(), 8);
    assert_eq!(inodes(&new_files).intersection(&inodes(&old_files)).count(), 7, "{new_files:?}");
    assert_eq!(seg_inodes(&old).len(), 1, "the one that found no room stays behind");

    // A crash right after a writer renamed an adopted spare to its next segment's name.
    let adopted = new_files.keys().find(|name| name.starts_with("free-adopted-")).unwrap();
    let next = segment_file_name(130);
    std::fs::rename(new.join(adopted), new.join(&next)).unwrap();
    let (journal, mut writer, report) = Journal::open(&new, opts).unwrap();
    assert_eq!((report.first_lsn, report.last_lsn, report.spare_segments), (101, 100, 7), "{report:?}");
    assert!(!new.join(&next).exists(), "returned to the pool");
    assert!(read_all(&journal, 101).is_empty(), "nothing of the old journal shows");
    for i in 101..=250u64 {
        writer.append(RecordKind::Write, Extent::new(i * 4096, 40_000), &payload(i + 1000, 40_000), 0).map_err(|e| format!("{e:?}")).unwrap();
    }
    writer.commit(true).unwrap();
    drop((journal, writer));
    assert_eq!(seg_inodes(&new).len(), 8, "it grew into the adopted files, making none");
    let (journal, _writer, report) = Journal::open(&new, opts).unwrap();
    assert_eq!(report.last_lsn, 250);
    let records = read_all(&journal, report.first_lsn);
    assert_eq!(records.len() as u64, 251 - report.first_lsn);
    assert!(records.iter().all(|r| r.payload == payload(r.header.lsn + 1000, 40_000)), "only the new journal's records");
}

/// A spare that is not a whole segment (its zero-filling cut by a crash) is removed when the
/// journal is opened for writing, so no writer ever rolls into it; a whole one is kept.
#[test]
fn a_spare_that_is_not_a_whole_segment_is_removed_at_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let opts = options(MIB, 8 * MIB);
    Journal::create(&dir, opts).unwrap();
    std::fs::write(dir.join("free-prepared-0000000000000001.seg"), vec![0u8; 65536]).unwrap();
    std::fs::write(dir.join("free-prepared-0000000000000002.seg"), vec![0u8; MIB as usize]).unwrap();
    let (_journal, report) = Journal::open_read_only(&dir).unwrap();
    assert_eq!(report.spare_segments, 1, "inspection leaves the short one out");
    assert!(dir.join("free-prepared-0000000000000001.seg").exists(), "and changes nothing");
    let (_journal, mut writer, report) = Journal::open(&dir, opts).unwrap();
    assert_eq!(report.spare_segments, 1);
    assert!(!dir.join("free-prepared-0000000000000001.seg").exists(), "repair removes it");
    for i in 1..=60u64 {
        writer.append(RecordKind::Write, Extent::new(i * 4096, 40_000), &payload(i, 40_000), 0).map_err(|e| format!("{e:?}")).unwrap();
    }
    writer.commit(true).unwrap();
    for path in segment_files(&dir) {
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB, "{}", path.display());
    }
}
