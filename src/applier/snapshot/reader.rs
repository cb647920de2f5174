//! Reading a snapshot while the applier goes on applying to the replica (another process:
//! `applier snapshot export`). A reflink snapshot is its own file. A copy-on-write snapshot
//! reads preserved chunks from its store and the others from the image, without a lock: the
//! applier commits a chunk's mapping before it writes that chunk of the image, so after
//! reading a chunk from the image the reader looks at the map again; if the chunk was
//! preserved meanwhile, the image read may have seen the new data, and the chunk is read from
//! the store instead. The same look notices an invalidation (a tombstone, or the map file
//! removed) before any byte read from the image is returned.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Mutex;

use super::cow::{MapHeader, DATA_FILE, ENTRY_BYTES, MAP_FILE, TOMBSTONE};
use super::{SnapshotError, SnapshotKind, SnapshotMeta, IMAGE_FILE};
use crate::layout::ReplicaDir;
use crate::lock;

enum Source {
    Whole(File),
    Cow(Box<CowView>),
}

struct CowView {
    image: File,
    data: File,
    map: File,
    header: MapHeader,
    known: Mutex<Known>,
}

/// The part of the map read so far.
struct Known {
    slots: HashMap<u64, (u64, u32)>,
    entries: u64,
    invalid: Option<String>,
}

/// A snapshot opened for reading; it keeps the snapshot from being deleted (a shared lock on
/// its `export.lock`) while it lives.
pub struct SnapshotReader {
    meta: SnapshotMeta,
    source: Source,
    _export_lock: File,
}

fn invalid(name: &str, reason: impl Into<String>) -> io::Error {
    io::Error::other(format!("snapshot {name} became invalid: {}", reason.into()))
}

impl SnapshotReader {
    pub fn open(dir: &ReplicaDir, name: &str) -> Result<SnapshotReader, SnapshotError> {
        let snapshot_dir = dir.snapshot(name);
        if !snapshot_dir.join(super::META_FILE).exists() {
            SnapshotMeta::load(dir, name)?;
        }
        // Locked before reading the metadata: a delete that comes after waits for no one, one
        // that came before leaves no metadata to read.
        let export_lock = super::lock_for_export(&snapshot_dir)?;
        let meta = SnapshotMeta::load(dir, name)?;
        if let Some(reason) = &meta.invalid_reason {
            return Err(SnapshotError::Invalid { name: name.to_string(), reason: reason.clone() });
        }
        let open =
            |file: &str| File::open(snapshot_dir.join(file)).map_err(|source| SnapshotError::io(format!("open {}", snapshot_dir.join(file).display()), source));
        let source = match meta.kind {
            SnapshotKind::Reflink => Source::Whole(open(IMAGE_FILE)?),
            SnapshotKind::Cow => {
                let state = crate::applier::replica::ReplicaState::load(dir).map_err(|e| SnapshotError::Other(e.to_string()))?;
                let image = File::open(&state.image).map_err(|source| SnapshotError::io(format!("open {}", state.image.display()), source))?;
                let map = open(MAP_FILE)?;
                let mut head = [0u8; 64];
                map.read_exact_at(&mut head, 0).map_err(|source| SnapshotError::io(format!("read {}", snapshot_dir.join(MAP_FILE).display()), source))?;
                let header = MapHeader::decode(&head).map_err(|reason| SnapshotError::Invalid { name: name.to_string(), reason })?;
                let view =
                    CowView { image, data: open(DATA_FILE)?, map, header, known: Mutex::new(Known { slots: HashMap::new(), entries: 0, invalid: None }) };
                view.refresh();
                if let Some(reason) = lock(&view.known).invalid.clone() {
                    return Err(SnapshotError::Invalid { name: name.to_string(), reason });
                }
                Source::Cow(Box::new(view))
            }
        };
        Ok(SnapshotReader { meta, source, _export_lock: export_lock })
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// Reads `buf.len()` bytes at `offset` as the replica was at the snapshot's LSN.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.meta.size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read past the end of the snapshot"));
        }
        match &self.source {
            Source::Whole(file) => file.read_exact_at(buf, offset),
            Source::Cow(view) => {
                let chunk_bytes = view.header.chunk_bytes;
                let mut done = 0usize;
                while done < buf.len() {
                    let at = offset + done as u64;
                    let chunk = at / chunk_bytes;
                    let within = at % chunk_bytes;
                    let length = ((chunk_bytes - within) as usize).min(buf.len() - done);
                    view.read_piece(&self.meta.name, chunk, within, &mut buf[done..done + length])?;
                    done += length;
                }
                Ok(())
            }
        }
    }
}

impl CowView {
    /// Reads map entries appended since the last look; notes a tombstone or a removed map.
    fn refresh(&self) {
        let mut known = lock(&self.known);
        if known.invalid.is_some() {
            return;
        }
        match self.map.metadata() {
            Ok(meta) if meta.nlink() == 0 => {
                known.invalid = Some("its store was removed".into());
                return;
            }
            Err(error) => {
                known.invalid = Some(format!("its chunk map cannot be read: {error}"));
                return;
            }
            Ok(_) => {}
        }
        let mut raw = vec![0u8; 64 * 1024];
        loop {
            let n = match self.map.read_at(&mut raw, MapHeader::entry_offset(known.entries)) {
                Ok(n) => n,
                Err(error) => {
                    known.invalid = Some(format!("its chunk map cannot be read: {error}"));
                    return;
                }
            };
            let whole = n / ENTRY_BYTES;
            // An entry that does not verify yet is being written: look again next time.
            for bytes in raw[..whole * ENTRY_BYTES].chunks(ENTRY_BYTES) {
                let Some((chunk, data_crc)) = self.header.decode_entry(known.entries, bytes) else { return };
                if chunk == TOMBSTONE {
                    known.invalid = Some("a chunk could not be preserved".into());
                    return;
                }
                if chunk >= self.header.chunks() {
                    known.invalid = Some(format!("its chunk map is damaged: entry {} maps chunk {chunk}, past the device", known.entries));
                    return;
                }
                let index = known.entries;
                known.slots.insert(chunk, (index, data_crc));
                known.entries += 1;
            }
            if whole < raw.len() / ENTRY_BYTES {
                return;
            }
        }
    }

    fn lookup(&self, name: &str, chunk: u64) -> io::Result<Option<(u64, u32)>> {
        let known = lock(&self.known);
        if let Some(reason) = &known.invalid {
            return Err(invalid(name, reason.clone()));
        }
        Ok(known.slots.get(&chunk).copied())
    }

    fn read_preserved(&self, name: &str, chunk: u64, (slot, data_crc): (u64, u32), within: u64, buf: &mut [u8]) -> io::Result<()> {
        let length = self.header.chunk_length(chunk) as usize;
        let mut whole = vec![0u8; length];
        self.data.read_exact_at(&mut whole, slot * self.header.chunk_bytes)?;
        if crc32c::crc32c(&whole) != data_crc {
            return Err(io::Error::other(format!("snapshot {name}: preserved chunk {chunk} fails its checksum")));
        }
        buf.copy_from_slice(&whole[within as usize..within as usize + buf.len()]);
        Ok(())
    }

    fn read_piece(&self, name: &str, chunk: u64, within: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(slot) = self.lookup(name, chunk)? {
            return self.read_preserved(name, chunk, slot, within, buf);
        }
        self.image.read_exact_at(buf, chunk * self.header.chunk_bytes + within)?;
        // Preserved (or invalidated) while we read? Then the image may have changed under us.
        self.refresh();
        match self.lookup(name, chunk)? {
            Some(slot) => self.read_preserved(name, chunk, slot, within, buf),
            None => Ok(()),
        }
    }
}

impl crate::store::ReadView for SnapshotReader {
    fn size(&self) -> u64 {
        self.meta.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        SnapshotReader::read_at(self, buf, offset)
    }
}
