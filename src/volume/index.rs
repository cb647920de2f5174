//! The pending index: which device bytes have been journaled but not yet applied to the
//! backing store, and what they hold. Reads overlay it on the backing store's bytes.
//!
//! A map of non-overlapping extents keyed by start offset; a newer record replaces the parts
//! of older extents it covers. When a record is applied, only the extents still tagged with
//! its LSN are dropped (later records over the same bytes stay).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::extent::Extent;

#[derive(Debug, Clone)]
pub enum ExtentData {
    /// Bytes of a write record; `start` is where the extent begins inside `buffer`.
    Bytes { buffer: Arc<Vec<u8>>, start: usize },
    /// Write-zeroes or discard.
    Zero,
}

/// One extent of the index (keyed by its start offset).
#[derive(Debug, Clone)]
struct Pending {
    end: u64,
    lsn: u64,
    data: ExtentData,
}

#[derive(Debug, Default)]
pub struct PendingIndex {
    extents: BTreeMap<u64, Pending>,
}

impl PendingIndex {
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// Records that `extent` now holds `data` as of `lsn` (the caller checked it fits the
    /// device).
    pub fn insert(&mut self, extent: Extent, lsn: u64, data: ExtentData) {
        if extent.is_empty() {
            return;
        }
        let (offset, end) = (extent.offset, extent.offset + extent.length);
        self.cut(offset, end);
        self.extents.insert(offset, Pending { end, lsn, data });
    }

    /// Removes whatever covers `[start, end)`, keeping the parts of extents outside it.
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<u64> = self.overlapping_starts(start, end);
        for key in overlapping {
            let extent = self.extents.remove(&key).expect("listed above");
            if key < start {
                let mut left = extent.clone();
                left.end = start;
                self.extents.insert(key, left);
            }
            if extent.end > end {
                let data = match &extent.data {
                    ExtentData::Bytes { buffer, start: buffer_start } => {
                        ExtentData::Bytes { buffer: buffer.clone(), start: buffer_start + (end - key) as usize }
                    }
                    ExtentData::Zero => ExtentData::Zero,
                };
                self.extents.insert(end, Pending { end: extent.end, lsn: extent.lsn, data });
            }
        }
    }

    fn overlapping_starts(&self, start: u64, end: u64) -> Vec<u64> {
        let mut keys = Vec::new();
        // The extent starting before `start` may reach into the range.
        if let Some((&key, extent)) = self.extents.range(..start).next_back() {
            if extent.end > start {
                keys.push(key);
            }
        }
        keys.extend(self.extents.range(start..end).map(|(&key, _)| key));
        keys
    }

    /// Drops the extents in `extent` that still belong to record `lsn`.
    pub fn remove_applied(&mut self, extent: Extent, lsn: u64) {
        for key in self.overlapping_starts(extent.offset, extent.offset + extent.length) {
            if self.extents.get(&key).is_some_and(|e| e.lsn == lsn) {
                self.extents.remove(&key);
            }
        }
    }

    /// The pieces of `extent` the index knows: (device offset, length, data).
    pub fn overlays(&self, extent: Extent) -> Vec<(u64, u64, ExtentData)> {
        let (offset, end) = (extent.offset, extent.offset + extent.length);
        self.overlapping_starts(offset, end)
            .into_iter()
            .map(|key| {
                let extent = &self.extents[&key];
                let from = key.max(offset);
                let to = extent.end.min(end);
                let data = match &extent.data {
                    ExtentData::Bytes { buffer, start } => ExtentData::Bytes { buffer: buffer.clone(), start: start + (from - key) as usize },
                    ExtentData::Zero => ExtentData::Zero,
                };
                (from, to - from, data)
            })
            .collect()
    }
}

/// Copies overlays into `out`, which holds the device bytes starting at `offset`.
pub fn apply_overlays(out: &mut [u8], offset: u64, overlays: &[(u64, u64, ExtentData)]) {
    for (from, len, data) in overlays {
        let at = (from - offset) as usize;
        let target = &mut out[at..at + *len as usize];
        match data {
            ExtentData::Bytes { buffer, start } => target.copy_from_slice(&buffer[*start..*start + *len as usize]),
            ExtentData::Zero => target.fill(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_byte_model_under_random_operations() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let size = 4096u64;
        let mut index = PendingIndex::default();
        let mut model_bytes = vec![0u8; size as usize];
        let mut backing = vec![0u8; size as usize];
        let mut records = Vec::new();
        for lsn in 1..=3000u64 {
            let offset = rng.gen_range(0..size - 1);
            let len = rng.gen_range(1..=(size - offset).min(300));
            if rng.gen_bool(0.8) {
                let buffer: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                model_bytes[offset as usize..(offset + len) as usize].copy_from_slice(&buffer);
                index.insert(Extent::new(offset, len), lsn, ExtentData::Bytes { buffer: Arc::new(buffer.clone()), start: 0 });
                records.push((lsn, offset, len, Some(buffer)));
            } else {
                model_bytes[offset as usize..(offset + len) as usize].fill(0);
                index.insert(Extent::new(offset, len), lsn, ExtentData::Zero);
                records.push((lsn, offset, len, None));
            }
            // Apply the oldest records now and then, in LSN order, like the applier thread.
            while records.len() > 20 || (rng.gen_bool(0.3) && !records.is_empty()) {
                let (lsn, offset, len, data) = records.remove(0);
                let target = &mut backing[offset as usize..(offset + len) as usize];
                match data {
                    Some(bytes) => target.copy_from_slice(&bytes),
                    None => target.fill(0),
                }
                index.remove_applied(Extent::new(offset, len), lsn);
            }
            // A read anywhere sees the model's bytes.
            let read_offset = rng.gen_range(0..size - 1);
            let read_len = rng.gen_range(1..=(size - read_offset).min(600));
            let mut out = backing[read_offset as usize..(read_offset + read_len) as usize].to_vec();
            apply_overlays(&mut out, read_offset, &index.overlays(Extent::new(read_offset, read_len)));
            assert_eq!(out, model_bytes[read_offset as usize..(read_offset + read_len) as usize], "lsn {lsn}");
        }
        while let Some((lsn, offset, len, _)) = (!records.is_empty()).then(|| records.remove(0)) {
            index.remove_applied(Extent::new(offset, len), lsn);
        }
        assert!(index.is_empty());
    }
}
