//! What a frontend serves: a volume (read and written), or a read-only view of device bytes
//! (a replica snapshot: `applier snapshot export`), whose writes are refused with EPERM.

use std::sync::Arc;

use crate::store::ReadView;
use crate::volume::{Completion, Volume, VolumeError, WriteOp};

/// Reads of a read-only export are at most this large (as a volume's default).
const READ_ONLY_MAX_IO: u64 = crate::volume::config::MAX_IO_SIZE;

#[derive(Clone)]
pub enum Export {
    Volume(Arc<Volume>),
    ReadOnly(Arc<dyn ReadView>),
}

impl From<Arc<Volume>> for Export {
    fn from(volume: Arc<Volume>) -> Export {
        Export::Volume(volume)
    }
}

impl Export {
    pub fn size(&self) -> u64 {
        match self {
            Export::Volume(volume) => volume.size(),
            Export::ReadOnly(view) => view.size(),
        }
    }

    /// The largest read or write a client is told it may send.
    pub fn max_io(&self) -> u64 {
        match self {
            Export::Volume(volume) => volume.config().max_io(),
            Export::ReadOnly(_) => READ_ONLY_MAX_IO,
        }
    }

    pub fn read_only(&self) -> bool {
        matches!(self, Export::ReadOnly(_))
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        match self {
            Export::Volume(volume) => volume.read(offset, buf),
            Export::ReadOnly(view) => view.read_at(buf, offset).map_err(|source| VolumeError::Io { context: format!("read at {offset}"), source }),
        }
    }

    /// A write-side request; on a read-only export a flush succeeds and the rest fail with
    /// [`VolumeError::ReadOnly`].
    pub fn submit(&self, op: WriteOp, completion: Completion) {
        match self {
            Export::Volume(volume) => volume.submit(op, completion),
            Export::ReadOnly(_) if matches!(op, WriteOp::Flush) => completion(Ok(())),
            Export::ReadOnly(_) => completion(Err(VolumeError::ReadOnly)),
        }
    }
}
