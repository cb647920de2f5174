//! What the campaign wrote and what a device may hold after it.
//!
//! Every 4 KiB block a trial writes names its trial, the write's sequence number and the
//! block's index, so any block read back identifies exactly one write (or garbage). Writes
//! are issued one at a time (queue depth 1), so sequence order is both issue order and
//! acknowledgement order, and the journal's LSN order agrees with it.
//!
//! A state is a **prefix state** of a history if there is a sequence point P such that every
//! block holds the newest surviving write with seq <= P covering it. Writes whose fate is
//! unknown (no reply before a crash, or an error reply) may be present or absent; a write known
//! to be lost (beyond the point a crashed source recovered to) must be absent.

pub const BLOCK: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"TORTURE1");

/// The exact contents of block `index` as written by write `seq` of trial `trial`: a header
/// (magic, trial, seq, index), fill bytes derived from all three, and an FNV-1a checksum of
/// everything before it in the last 8 bytes.
pub fn stamp(trial: u64, seq: u64, index: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    for (i, field) in [MAGIC, trial, seq, index].into_iter().enumerate() {
        block[i * 8..i * 8 + 8].copy_from_slice(&field.to_le_bytes());
    }
    let mut key = super::rng::mix(trial ^ seq.rotate_left(21) ^ index.rotate_left(42));
    for chunk in block[32..BLOCK - 8].chunks_mut(8) {
        key = super::rng::mix(key);
        chunk.copy_from_slice(&key.to_le_bytes()[..chunk.len()]);
    }
    let sum = fnv(&block[..BLOCK - 8]);
    block[BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
    block
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Which write a block read back is: `Ok(0)` for zeros (never written), `Ok(seq)` for an
/// intact block of this trial's write `seq` at this index, `Err` for anything else.
pub fn identify(trial: u64, index: u64, block: &[u8]) -> Result<u64, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let field = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap());
    if field(0) != MAGIC {
        return Err(format!("block {index} is garbage (no stamp: {:02x?})", &block[..16]));
    }
    if fnv(&block[..BLOCK - 8]).to_le_bytes() != block[BLOCK - 8..] {
        return Err(format!("block {index} is torn (checksum wrong; header says seq {} index {})", field(2), field(3)));
    }
    if field(1) != trial || field(3) != index {
        return Err(format!("block {index} holds trial {} block {}'s data (seq {})", field(1), field(3), field(2)));
    }
    let seq = field(2);
    if block != stamp(trial, seq, index).as_slice() {
        return Err(format!("block {index} has a valid checksum but is not write {seq}'s content"));
    }
    Ok(seq)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The server replied success.
    Acked,
    /// No reply (the server died) or an error reply: may or may not have been applied.
    Unknown,
    /// Known not to have survived: beyond the point a crashed source recovered to.
    Lost,
}

#[derive(Debug, Clone)]
pub struct Write {
    pub seq: u64,
    pub first: u64,
    pub count: u64,
    pub fate: Fate,
}

impl Write {
    pub fn covers(&self, index: u64) -> bool {
        (self.first..self.first + self.count).contains(&index)
    }
}

/// A trial's whole history, and the source's state at its last recovery (its base).
pub struct History {
    pub trial: u64,
    pub blocks: u64,
    /// Every write, in seq order (seq = position + 1).
    pub writes: Vec<Write>,
    /// The source's content (seq per block, 0 = zero) at the start of the current epoch: the
    /// state checked after its last crash, or all zeros.
    pub base: Vec<u64>,
    /// Writes from this seq on belong to the current epoch (after the last source recovery).
    pub epoch_start: u64,
    /// Highest seq made durable by a completed FLUSH (or a FUA write) in this epoch.
    pub durable: u64,
}

impl History {
    pub fn new(trial: u64, blocks: u64) -> History {
        History { trial, blocks, writes: Vec::new(), base: vec![0; blocks as usize], epoch_start: 1, durable: 0 }
    }

    pub fn next_seq(&self) -> u64 {
        self.writes.len() as u64 + 1
    }

    /// Records a write about to be sent (fate unknown until its reply).
    pub fn push(&mut self, first: u64, count: u64) -> u64 {
        let seq = self.next_seq();
        self.writes.push(Write { seq, first, count, fate: Fate::Unknown });
        seq
    }

    pub fn set_fate(&mut self, seq: u64, fate: Fate) {
        self.writes[seq as usize - 1].fate = fate;
    }

    /// A FLUSH that completed after every write up to `seq` was answered.
    pub fn flushed_through(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }

    /// True if the current epoch has a write of unknown fate (then only a crash check can
    /// tell what the source holds).
    pub fn epoch_has_unknown(&self) -> bool {
        self.writes[self.epoch_start as usize - 1..].iter().any(|w| w.fate == Fate::Unknown)
    }

    /// What the source must hold now if nothing was lost: the base plus every acknowledged
    /// write of this epoch.
    pub fn expected(&self) -> Vec<u64> {
        let mut state = self.base.clone();
        for w in &self.writes[self.epoch_start as usize - 1..] {
            if w.fate == Fate::Acked {
                for b in w.first..w.first + w.count {
                    state[b as usize] = w.seq;
                }
            }
        }
        state
    }

    /// Checks the source after a crash (or at any moment, with `min_p` = the last seq to
    /// demand that nothing acknowledged is missing): it must be a prefix state of this epoch
    /// on top of the base, with P at least the durable point. Then starts a new epoch: writes
    /// after P are marked lost, the observed state becomes the base. Returns P.
    pub fn recover_source(&mut self, image: &[u8], min_p: u64) -> Result<u64, String> {
        let observed = self.identify_all(image)?;
        let window: Vec<&Write> = self.writes[self.epoch_start as usize - 1..].iter().collect();
        let p = prefix_point(&observed, &self.base, &window, min_p.max(self.durable))
            .map_err(|e| format!("source is not a prefix state of its history (flushed through {}): {e}", self.durable))?;
        for w in &mut self.writes[self.epoch_start as usize - 1..] {
            // Beyond P nothing survived (a survivor would show in a block, raising P); up to
            // P a write of unknown fate is lost if one of its blocks shows something older.
            let shows_older = (w.first..w.first + w.count).any(|b| observed[b as usize] < w.seq);
            if w.seq > p || (w.fate == Fate::Unknown && shows_older) {
                w.fate = Fate::Lost;
            }
        }
        self.base = observed;
        self.epoch_start = self.next_seq();
        self.durable = 0;
        Ok(p)
    }

    /// Checks that a replica image is a prefix state of the source's surviving history
    /// (every write of the trial not known lost) from the zero state. Returns P.
    pub fn check_replica(&self, image: &[u8]) -> Result<u64, String> {
        let observed = self.identify_all(image)?;
        let window: Vec<&Write> = self.writes.iter().collect();
        prefix_point(&observed, &vec![0; self.blocks as usize], &window, 0).map_err(|e| format!("replica is not a prefix state: {e}"))
    }

    fn identify_all(&self, image: &[u8]) -> Result<Vec<u64>, String> {
        if image.len() < self.blocks as usize * BLOCK {
            return Err(format!("image is {} bytes, expected {}", image.len(), self.blocks as usize * BLOCK));
        }
        (0..self.blocks).map(|b| identify(self.trial, b, &image[b as usize * BLOCK..(b as usize + 1) * BLOCK])).collect()
    }
}

/// The smallest sequence point P >= `min_p` that makes `observed` a prefix state of `window`
/// on top of `base`, or why there is none. The smallest P is the easiest to satisfy (a larger
/// one only adds writes that must be present), so it decides.
fn prefix_point(observed: &[u64], base: &[u64], window: &[&Write], min_p: u64) -> Result<u64, String> {
    let first_seq = window.first().map_or(u64::MAX, |w| w.seq);
    let mut p = min_p;
    for (b, (&o, &was)) in observed.iter().zip(base).enumerate() {
        if o == was {
            continue;
        }
        if o < first_seq {
            return Err(format!("block {b} holds write {o}, older than this history's base ({was}) and not the base"));
        }
        let Some(w) = window.get((o - first_seq) as usize) else {
            return Err(format!("block {b} holds write {o}, which was never sent"));
        };
        if !w.covers(b as u64) {
            return Err(format!("block {b} holds write {o}, which did not cover it"));
        }
        if w.fate == Fate::Lost {
            return Err(format!("block {b} holds write {o}, which the source lost in a crash"));
        }
        p = p.max(o);
    }
    // The newest write certain to have survived (acknowledged, not lost) up to P, per block.
    let mut certain: Vec<u64> = vec![0; observed.len()];
    for w in window.iter().filter(|w| w.seq <= p && w.fate == Fate::Acked) {
        for b in w.first..w.first + w.count {
            certain[b as usize] = w.seq;
        }
    }
    for (b, &c) in certain.iter().enumerate() {
        let o = observed[b];
        // (A base value is older than every write of the window.)
        if c != 0 && o < c {
            return Err(format!(
                "block {b} holds {} but acknowledged write {c} covered it and P is {p} (so an older state shows through)",
                if o == 0 { "zeros".to_string() } else { format!("write {o}") }
            ));
        }
    }
    Ok(p)
}
