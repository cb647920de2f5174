//! The journal's writer and a reader following it from memory (`Journal::follow`, a mirror's
//! sender) when the disk fails: a failed commit or a failed `Journal::sync`. Its own test
//! binary: the failpoints are read once per process, from the environment, and set by the
//! one test here (another test in this file would run with them set, in parallel threads).

use std::path::Path;

use bytes::Bytes;
use ublk_mirror::extent::Extent;
use ublk_mirror::journal::{Journal, JournalOptions, JournalReader, JournalWriter, RecordKind};

const FAULTS: &str = "follow-test";

fn payload(lsn: u64) -> Bytes {
    Bytes::from((0..4096).map(|j| (lsn as usize * 31 + j) as u8).collect::<Vec<u8>>())
}

/// Appends records `lsns` as volume writes do (one shared buffer each); returns the buffers.
fn append(writer: &mut JournalWriter, lsns: std::ops::RangeInclusive<u64>) -> Vec<Bytes> {
    lsns.map(|lsn| {
        let bytes = payload(lsn);
        let appended = writer.append_parts(RecordKind::Write, Extent::new(lsn * 4096, 4096), std::slice::from_ref(&bytes), 0);
        assert_eq!(appended.map_err(|e| format!("{e:?}")).unwrap(), lsn);
        bytes
    })
    .collect()
}

/// Reads what the follower has next and checks it against `buffers` (LSNs from `first`):
/// how many came from memory (the very buffer the writer was given).
fn read(follower: &mut JournalReader, first: u64, buffers: &[Bytes]) -> usize {
    let mut from_memory = 0;
    for (i, bytes) in buffers.iter().enumerate() {
        let record = follower.next_record().unwrap().unwrap_or_else(|| panic!("record {} is not there", first + i as u64));
        assert_eq!(record.header.lsn, first + i as u64);
        assert!(record.payload == bytes, "LSN {}: payload differs", first + i as u64);
        from_memory += usize::from(record.payload.as_ptr() == bytes.as_ptr());
    }
    assert!(follower.next_record().unwrap().is_none(), "nothing past LSN {}", first + buffers.len() as u64 - 1);
    from_memory
}

/// A record whose write failed is never read; once written by the retry it is read from the
/// files (memory was cleared with the failure), at the position the follower kept, and later
/// records come from memory again. A failed background sync clears memory too; everything
/// written reads back whole after a reopen.
#[test]
fn a_follower_never_reads_a_failed_write_and_reads_what_followed_from_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let failing = tmp.path().join("disk-failing");
    let spec = format!("{FAULTS}-eio=while:{},journal-sync-eio=while:{}", failing.display(), failing.display());
    std::env::set_var("UBLK_MIRROR_FAILPOINTS", spec);
    let fail = |on: bool| if on { std::fs::write(&failing, b"").unwrap() } else { std::fs::remove_file(&failing).unwrap() };
    let dir = tmp.path().join("journal");
    let options = JournalOptions { segment_size: 1 << 20, capacity: 16 << 20, journal_id: [7; 16] };
    Journal::create(&dir, options).unwrap();
    let mut written = Vec::new();
    {
        let (journal, mut writer, _) = Journal::open(&dir, options).unwrap();
        writer.set_fault_op(FAULTS);
        let _following = journal.follow();
        let mut follower = JournalReader::new(journal.clone(), 1).unwrap();

        let batch = append(&mut writer, 1..=20);
        writer.commit(false).unwrap();
        assert_eq!(read(&mut follower, 1, &batch), 20, "all from memory");
        written.extend(batch);

        // A commit that fails: nothing of it is readable.
        let batch = append(&mut writer, 21..=30);
        fail(true);
        assert!(writer.commit(false).is_err());
        fail(false);
        assert!(follower.next_record().unwrap().is_none(), "a record whose write failed is not read");
        // The retry writes the same records; they are read from the files.
        writer.commit(false).unwrap();
        assert_eq!(read(&mut follower, 21, &batch), 0, "read back from the files");
        written.extend(batch);
        let batch = append(&mut writer, 31..=40);
        writer.commit(false).unwrap();
        assert_eq!(read(&mut follower, 31, &batch), 10, "from memory again");
        written.extend(batch);

        // A background sync that fails: what was written is read from the files, past a
        // segment roll (1 MiB segments: about 250 records of 4 KiB).
        let batch = append(&mut writer, 41..=300);
        writer.commit(false).unwrap();
        fail(true);
        assert!(journal.sync().is_err());
        fail(false);
        assert_eq!(read(&mut follower, 41, &batch), 0, "memory was cleared with the failed sync");
        written.extend(batch);
        assert!(journal.sync().is_ok());
    }
    reread(&dir, options, &written);
}

fn reread(dir: &Path, options: JournalOptions, written: &[Bytes]) {
    let (journal, _writer, report) = Journal::open(dir, options).unwrap();
    assert_eq!(report.last_lsn, written.len() as u64);
    let mut reader = JournalReader::new(journal, 1).unwrap();
    assert_eq!(read(&mut reader, 1, written), 0);
}
