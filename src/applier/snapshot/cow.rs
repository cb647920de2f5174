//! The copy-on-write store of one snapshot: before the replica image changes a chunk for the
//! first time after the snapshot's LSN, the chunk's old content is copied here, made durable,
//! and only then is its mapping committed (dm-snapshot's order: data, then mapping), and only
//! after that is the image written. A snapshot reads a preserved chunk from here and every
//! other chunk from the image.
//!
//! Files (in the snapshot's directory):
//! - `chunks.data`: preserved chunk contents; the n-th mapping's chunk at `n * chunk_bytes`.
//! - `chunks.map`: a 64-byte header (magic `UBMSNAPM`, version 1, chunk size, device size, a
//!   random salt, CRC32C) and then 16-byte entries, appended: chunk index (u64), CRC32C of
//!   the preserved bytes (u32), CRC32C of the entry with the salt and the entry's index (u32).
//!   Chunk index `u64::MAX` is a tombstone: the snapshot was invalidated.
//!
//! A crash can leave data past the last entry (overwritten later) or a torn last commit of
//! entries; the entries from the first one that does not verify are dropped at open. Their
//! image writes never happened: they wait for the map's fdatasync.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::store::Store;

pub const MAP_FILE: &str = "chunks.map";
pub const DATA_FILE: &str = "chunks.data";
const MAGIC: [u8; 8] = *b"UBMSNAPM";
const VERSION: u32 = 1;
const HEADER_BYTES: u64 = 64;
pub const ENTRY_BYTES: usize = 16;
pub const TOMBSTONE: u64 = u64::MAX;
/// Preserved bytes gathered into one data write at most.
const WRITE_BATCH: usize = 4 << 20;

/// The map file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapHeader {
    pub chunk_bytes: u64,
    pub device_size: u64,
    pub salt: u64,
}

impl MapHeader {
    fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut bytes = [0u8; HEADER_BYTES as usize];
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&(self.chunk_bytes as u32).to_le_bytes());
        bytes[16..24].copy_from_slice(&self.device_size.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<MapHeader, String> {
        if bytes.len() < HEADER_BYTES as usize {
            return Err("the chunk map is shorter than its header".into());
        }
        if bytes[0..8] != MAGIC {
            return Err("the chunk map has no snapshot map magic".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if u32_at(60) != crc32c::crc32c(&bytes[..60]) {
            return Err("the chunk map's header fails its checksum".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!("chunk map version {} is not supported (this build reads {VERSION})", u32_at(8)));
        }
        let header = MapHeader { chunk_bytes: u32_at(12) as u64, device_size: u64_at(16), salt: u64_at(24) };
        if header.chunk_bytes == 0 || !header.chunk_bytes.is_multiple_of(4096) {
            return Err(format!("the chunk map's chunk size {} is not a multiple of 4096", header.chunk_bytes));
        }
        Ok(header)
    }

    pub fn entry_crc(&self, index: u64, chunk: u64, data_crc: u32) -> u32 {
        let mut bytes = [0u8; 28];
        bytes[0..8].copy_from_slice(&self.salt.to_le_bytes());
        bytes[8..16].copy_from_slice(&index.to_le_bytes());
        bytes[16..24].copy_from_slice(&chunk.to_le_bytes());
        bytes[24..28].copy_from_slice(&data_crc.to_le_bytes());
        crc32c::crc32c(&bytes)
    }

    pub fn encode_entry(&self, index: u64, chunk: u64, data_crc: u32) -> [u8; ENTRY_BYTES] {
        let mut bytes = [0u8; ENTRY_BYTES];
        bytes[0..8].copy_from_slice(&chunk.to_le_bytes());
        bytes[8..12].copy_from_slice(&data_crc.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.entry_crc(index, chunk, data_crc).to_le_bytes());
        bytes
    }

    /// Entry `index` from its bytes; `None` if it does not verify (torn, or not yet written).
    pub fn decode_entry(&self, index: u64, bytes: &[u8]) -> Option<(u64, u32)> {
        let chunk = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
        let data_crc = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
        let crc = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
        (crc == self.entry_crc(index, chunk, data_crc)).then_some((chunk, data_crc))
    }

    /// Chunks of the device (the last one may be short): every mapped chunk is below this.
    pub fn chunks(&self) -> u64 {
        self.device_size.div_ceil(self.chunk_bytes)
    }

    /// Bytes of chunk `chunk` (the device's last chunk may be short).
    pub fn chunk_length(&self, chunk: u64) -> u64 {
        self.chunk_bytes.min(self.device_size.saturating_sub(chunk * self.chunk_bytes))
    }

    pub fn entry_offset(index: u64) -> u64 {
        HEADER_BYTES + index * ENTRY_BYTES as u64
    }
}

/// One snapshot's store, open for preserving (the applier's side).
pub struct CowStore {
    dir: PathBuf,
    header: MapHeader,
    map: File,
    data: File,
    /// Chunk index -> entry index (its slot in the data file).
    slots: HashMap<u64, u64>,
    entries: u64,
}

fn io_at(path: &Path, what: &str) -> impl FnOnce(io::Error) -> io::Error {
    let context = format!("{what} {}", path.display());
    move |error| io::Error::new(error.kind(), format!("{context}: {error}"))
}

impl CowStore {
    /// A new, empty store in `dir` (which exists), durable.
    pub fn create(dir: &Path, chunk_bytes: u64, device_size: u64) -> io::Result<CowStore> {
        let header = MapHeader { chunk_bytes, device_size, salt: rand::random() };
        let map_path = dir.join(MAP_FILE);
        let data_path = dir.join(DATA_FILE);
        let map = crate::permissions::private_options().read(true).write(true).create_new(true).open(&map_path).map_err(io_at(&map_path, "create"))?;
        map.write_all_at(&header.encode(), 0).map_err(io_at(&map_path, "write"))?;
        map.sync_all().map_err(io_at(&map_path, "sync"))?;
        let data = crate::permissions::private_options().read(true).write(true).create_new(true).open(&data_path).map_err(io_at(&data_path, "create"))?;
        data.sync_all().map_err(io_at(&data_path, "sync"))?;
        crate::fsutil::sync_dir(dir).map_err(io_at(dir, "sync"))?;
        Ok(CowStore { dir: dir.to_path_buf(), header, map, data, slots: HashMap::new(), entries: 0 })
    }

    /// Opens a store after a restart. `Err` when it cannot be used (missing, damaged,
    /// invalidated): the snapshot is invalid for that reason. A torn tail of entries is cut.
    pub fn open(dir: &Path) -> Result<CowStore, String> {
        let map_path = dir.join(MAP_FILE);
        let data_path = dir.join(DATA_FILE);
        let map = OpenOptions::new().read(true).write(true).open(&map_path).map_err(|e| format!("its chunk map {}: {e}", map_path.display()))?;
        let data = OpenOptions::new().read(true).write(true).open(&data_path).map_err(|e| format!("its chunk data {}: {e}", data_path.display()))?;
        let bytes = std::fs::read(&map_path).map_err(|e| format!("read {}: {e}", map_path.display()))?;
        let header = MapHeader::decode(&bytes).map_err(|e| format!("{}: {e}", map_path.display()))?;
        let mut slots = HashMap::new();
        let mut entries = 0u64;
        for raw in bytes[HEADER_BYTES as usize..].chunks(ENTRY_BYTES) {
            let Some((chunk, _)) = (raw.len() == ENTRY_BYTES).then(|| header.decode_entry(entries, raw)).flatten() else { break };
            if chunk == TOMBSTONE {
                return Err("it was invalidated (a chunk could not be preserved)".into());
            }
            // A verified entry past the device is damage, not a torn tail: a restore would
            // write it outside the image (or overflow computing where).
            if chunk >= header.chunks() {
                return Err(format!("its chunk map is damaged: entry {entries} maps chunk {chunk} of a {}-chunk device", header.chunks()));
            }
            slots.insert(chunk, entries);
            entries += 1;
        }
        let valid_len = MapHeader::entry_offset(entries);
        if valid_len < bytes.len() as u64 {
            tracing::info!(path = %map_path.display(), dropped_bytes = bytes.len() as u64 - valid_len, "cut the torn tail of a snapshot's chunk map");
            map.set_len(valid_len).and_then(|_| map.sync_all()).map_err(|e| format!("cut {}: {e}", map_path.display()))?;
        }
        Ok(CowStore { dir: dir.to_path_buf(), header, map, data, slots, entries })
    }

    pub fn header(&self) -> &MapHeader {
        &self.header
    }

    pub fn is_preserved(&self, chunk: u64) -> bool {
        self.slots.contains_key(&chunk)
    }

    /// Bytes the store holds on disk.
    pub fn bytes(&self) -> u64 {
        self.entries * self.header.chunk_bytes + MapHeader::entry_offset(self.entries)
    }

    /// Copies `chunks` (sorted, none preserved yet) from `image` into the store and commits
    /// their mappings: data written and synced, then the entries appended and synced.
    pub fn preserve(&mut self, image: &Store, chunks: &[u64]) -> io::Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let data_path = self.dir.join(DATA_FILE);
        let chunk_bytes = self.header.chunk_bytes;
        let mut entries = Vec::with_capacity(chunks.len() * ENTRY_BYTES);
        let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH.min(chunks.len() * chunk_bytes as usize));
        let mut batch_start = self.entries;
        let mut chunk_buffer = vec![0u8; chunk_bytes as usize];
        for (n, &chunk) in chunks.iter().enumerate() {
            let index = self.entries + n as u64;
            let length = self.header.chunk_length(chunk) as usize;
            let buffer = &mut chunk_buffer[..length];
            image.read_exact_at(buffer, chunk * chunk_bytes).map_err(io_at(image.path(), "read"))?;
            let data_crc = crc32c::crc32c(buffer);
            entries.extend_from_slice(&self.header.encode_entry(index, chunk, data_crc));
            // Slots are whole chunks apart, so a batch is contiguous in the data file.
            batch.extend_from_slice(buffer);
            batch.resize(batch.len() + (chunk_bytes as usize - length), 0);
            if batch.len() >= WRITE_BATCH {
                self.data.write_all_at(&batch, batch_start * chunk_bytes).map_err(io_at(&data_path, "write"))?;
                batch.clear();
                batch_start = index + 1;
            }
        }
        if !batch.is_empty() {
            self.data.write_all_at(&batch, batch_start * chunk_bytes).map_err(io_at(&data_path, "write"))?;
        }
        if crate::failpoint::hit("snapshot-preserve-before-data-sync") {
            std::process::abort();
        }
        self.data.sync_data().map_err(io_at(&data_path, "sync"))?;
        let map_path = self.dir.join(MAP_FILE);
        self.map.write_all_at(&entries, MapHeader::entry_offset(self.entries)).map_err(io_at(&map_path, "write"))?;
        if crate::failpoint::hit("snapshot-preserve-before-map-sync") {
            std::process::abort();
        }
        self.map.sync_data().map_err(io_at(&map_path, "sync"))?;
        for (n, &chunk) in chunks.iter().enumerate() {
            self.slots.insert(chunk, self.entries + n as u64);
        }
        self.entries += chunks.len() as u64;
        Ok(())
    }

    /// Writes every preserved chunk back over `image` and syncs it: the image becomes the
    /// snapshot's state (a promote from a snapshot). Idempotent, so a crash midway is
    /// finished by running it again. Returns the bytes written.
    pub fn restore(&self, image: &Store) -> io::Result<u64> {
        let data_path = self.dir.join(DATA_FILE);
        let chunk_bytes = self.header.chunk_bytes;
        let mut chunks: Vec<(u64, u64)> = self.slots.iter().map(|(&chunk, &slot)| (chunk, slot)).collect();
        chunks.sort_unstable();
        let mut buffer = vec![0u8; chunk_bytes as usize];
        let mut written = 0;
        for (chunk, slot) in chunks {
            let length = self.header.chunk_length(chunk) as usize;
            self.data.read_exact_at(&mut buffer[..length], slot * chunk_bytes).map_err(io_at(&data_path, "read"))?;
            image.write_all_at(&buffer[..length], chunk * chunk_bytes).map_err(io_at(image.path(), "write"))?;
            written += length as u64;
        }
        image.sync_data().map_err(io_at(image.path(), "sync"))?;
        Ok(written)
    }

    /// Marks the store invalid for a reader that has it open (best effort: the caller also
    /// removes the files, which a reader notices too).
    pub fn tombstone(&mut self) {
        let entry = self.header.encode_entry(self.entries, TOMBSTONE, 0);
        if self.map.write_all_at(&entry, MapHeader::entry_offset(self.entries)).and_then(|_| self.map.sync_data()).is_ok() {
            self.entries += 1;
        }
    }
}
