//! Compression of record batches on the wire (protocol 6): a mirror's `compression` setting,
//! the sender's per-batch choice (`BatchCompressor`, `AutoPolicy`) and the applier's bounded
//! decoder. Pure: no I/O, time is passed in. See docs/replication-protocol.md, "Compression".

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The codec names an applier lists in its `Welcome` (a list of names rather than an enum so
/// a newer sender's unknown codec is ignored, not a decoding error).
pub const ZSTD: &str = "zstd";
/// What this build's applier decodes.
pub const CODECS: &[&str] = &[ZSTD];
/// A batch is sent compressed only if it shrinks by at least this many percent: below that
/// the applier's decompression costs more than the few bytes saved.
pub const MIN_SAVING_PERCENT: usize = 5;
/// Batches with fewer payload bytes go raw: zstd's frame overhead eats what small ones save.
pub const MIN_COMPRESS_BYTES: usize = 512;
/// The level `auto` and a bare `zstd` use. 1 rather than zstd's default 3: on text and
/// filesystem metadata it gives most of level 3's ratio at about 1.5 times its speed, and the
/// sender's CPU is the source host's (the cost a user cares about).
pub const DEFAULT_LEVEL: i32 = 1;
/// Most bytes a compressed batch may decompress to: the frame limit, the same bound a raw
/// batch has (and a header claiming more is refused before anything is allocated).
pub const MAX_DECOMPRESSED: usize = super::MAX_FRAME as usize;

/// A mirror's `compression` setting: `off`, `zstd:LEVEL` (always tried) or `auto` (tried
/// only while the link, not the CPU, is the bottleneck). Default `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Compression {
    Off,
    Zstd(i32),
    #[default]
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    #[error("{0:?} is not a compression setting: give \"off\", \"auto\" or \"zstd:LEVEL\" with LEVEL {min}..={max} (\"zstd\" alone is level {DEFAULT_LEVEL})", min = level_range().start(), max = level_range().end())]
    BadSetting(String),
    #[error("a compressed batch claims {0} bytes of payload, more than the {MAX_DECOMPRESSED} a batch may hold")]
    TooLarge(u64),
    #[error("a compressed batch is corrupt or larger than its header says ({0})")]
    Corrupt(String),
    #[error("a compressed batch decompressed to {got} bytes, but its header says {expected}")]
    WrongLength { expected: usize, got: usize },
}

/// The levels zstd accepts (negative ones are its fast modes).
pub fn level_range() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

impl std::str::FromStr for Compression {
    type Err = CompressionError;

    fn from_str(text: &str) -> Result<Compression, CompressionError> {
        let bad = || CompressionError::BadSetting(text.to_string());
        match text {
            "off" => Ok(Compression::Off),
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd(DEFAULT_LEVEL)),
            _ => {
                let level = text.strip_prefix("zstd:").ok_or_else(bad)?.parse::<i32>().map_err(|_| bad())?;
                // 0 means "zstd's default" to the library: a user who writes 0 means something
                // else, so it is refused rather than silently made 3.
                if level == 0 || !level_range().contains(&level) {
                    return Err(bad());
                }
                Ok(Compression::Zstd(level))
            }
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Auto => f.write_str("auto"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

impl TryFrom<String> for Compression {
    type Error = CompressionError;
    fn try_from(text: String) -> Result<Compression, CompressionError> {
        text.parse()
    }
}

impl From<Compression> for String {
    fn from(value: Compression) -> String {
        value.to_string()
    }
}

/// The sender's zstd context, kept across batches (a new context per batch costs an
/// allocation of several hundred KiB), and the buffer payloads are gathered in.
pub struct BatchCompressor {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    gathered: Vec<u8>,
}

impl Default for BatchCompressor {
    fn default() -> Self {
        BatchCompressor::new()
    }
}

impl BatchCompressor {
    pub fn new() -> BatchCompressor {
        BatchCompressor { compressor: None, gathered: Vec::new() }
    }

    /// The payloads compressed as one zstd frame, or `None` when that does not save at least
    /// [`MIN_SAVING_PERCENT`] (the batch then goes raw) or the batch is too small to bother.
    pub fn compress<'a>(&mut self, level: i32, payloads: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
        self.gathered.clear();
        for payload in payloads {
            self.gathered.extend_from_slice(payload);
        }
        let raw = self.gathered.len();
        if raw < MIN_COMPRESS_BYTES {
            return None;
        }
        if self.compressor.as_ref().is_none_or(|(current, _)| *current != level) {
            self.compressor = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = self.compressor.as_mut()?;
        // A destination of exactly the largest worthwhile size: zstd gives up (an error)
        // as soon as the output would not fit, so an incompressible batch costs no more.
        let mut out = Vec::with_capacity(raw - raw * MIN_SAVING_PERCENT / 100);
        compressor.compress_to_buffer(&self.gathered[..], &mut out).ok()?;
        Some(out)
    }
}

thread_local! {
    /// One zstd context per receiving thread, reused: a new one per batch costs an allocation
    /// of over 100 KiB.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Decompresses a batch's payload block into exactly `expected` bytes: the header's
/// `payload_len`s, summed by the caller. A claim past [`MAX_DECOMPRESSED`] is refused before
/// any allocation; output beyond the claim (a bomb) stops zstd with an error, as does a
/// corrupt frame or trailing bytes. Never panics.
pub fn decompress(block: &[u8], expected: u64) -> Result<Vec<u8>, CompressionError> {
    if expected > MAX_DECOMPRESSED as u64 {
        return Err(CompressionError::TooLarge(expected));
    }
    let expected = expected as usize;
    let mut out = Vec::with_capacity(expected);
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| CompressionError::Corrupt(e.to_string()))?);
        }
        let decompressor = slot.as_mut().expect("just set");
        decompressor.decompress_to_buffer(block, &mut out).map(drop).map_err(|e| CompressionError::Corrupt(e.to_string()))
    })?;
    if out.len() != expected {
        return Err(CompressionError::WrongLength { expected, got: out.len() });
    }
    Ok(out)
}

/// When `auto` compresses. Compression pays only while the link (or the applier) is what
/// limits the mirror: then the sender's CPU is idle waiting for acknowledgements anyway. The
/// evidence is a `max_rate`, or the sender waiting on a full window while records are ready
/// to go for more than [`STALL_SHARE`] of the last period while the host had at least
/// [`SPARE_CPU`] idle. When compression makes the sender
/// CPU-bound it stops waiting on the window, the evidence goes and so does compression
/// (after [`PERIOD`]). A run of batches that did not shrink stops trying for [`BACKOFF`].
///
/// The level starts at [`DEFAULT_LEVEL`] and rises by one per period, up to
/// [`MAX_AUTO_LEVEL`], while the sender waited on the window for at least
/// [`RAISE_STALL_SHARE`] of the period and the host had [`RAISE_IDLE_CPU`] idle: then the link
/// is far slower than the compressor, and a better ratio is bytes the link does not carry. It
/// falls by one in a period that waited less than [`LOWER_STALL_SHARE`], and back to
/// [`DEFAULT_LEVEL`] as soon as the link no longer looks like the bottleneck.
#[derive(Debug)]
pub struct AutoPolicy {
    period_start: Option<Instant>,
    stalled: Duration,
    /// CPUs' worth of idle time the source host had lately (`idle_cpu`), if known.
    idle_cpu: Option<f64>,
    link_bound: bool,
    level: i32,
    raw_streak: u32,
    retry_at: Option<Instant>,
}

impl Default for AutoPolicy {
    fn default() -> Self {
        AutoPolicy { period_start: None, stalled: Duration::ZERO, idle_cpu: None, link_bound: false, level: DEFAULT_LEVEL, raw_streak: 0, retry_at: None }
    }
}

/// How often `auto` reconsiders whether the link is the bottleneck.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Waiting on a full window for this share of a period means the link limits.
pub const STALL_SHARE: f64 = 0.05;
/// ... unless the source host had less idle CPU than this (CPUs' worth, over the CPUs the
/// process may use): then the sender waits because the applier or the link is slow, but
/// compressing would take CPU from the guest's own writes (measured: a live mirror of 1 MiB
/// writes on a busy source CPU spent a fifth of it in zstd).
pub const SPARE_CPU: f64 = 0.25;
/// The highest level `auto` climbs to. Measured on the bench's ext4 image (a copy of
/// /usr/share/doc, part of /usr/lib and a database-like file) in 4 MiB batches: level 1
/// shrinks it 2.02x, level 3 2.13x for 38% more source CPU per MiB (a 20 MB/s link: 1.92x
/// -> 2.00x the link); level 7 2.27x for about 3.5 times level 1's CPU.
pub const MAX_AUTO_LEVEL: i32 = 3;
/// Waiting on the window for this share of a period lets the level rise...
pub const RAISE_STALL_SHARE: f64 = 0.5;
/// ... if the host also had this much idle CPU (CPUs' worth).
pub const RAISE_IDLE_CPU: f64 = 0.5;
/// Waiting less than this share of a period lowers the level by one.
pub const LOWER_STALL_SHARE: f64 = 0.25;
/// Batches in a row that did not shrink before `auto` stops trying.
pub const RAW_STREAK: u32 = 16;
/// How long `auto` stops trying after such a run (then it tries one batch again).
pub const BACKOFF: Duration = Duration::from_secs(10);

impl AutoPolicy {
    /// The sender waited `waited` on a full window while records were ready.
    pub fn stalled(&mut self, waited: Duration, now: Instant) {
        self.roll(now);
        self.stalled += waited;
    }

    fn roll(&mut self, now: Instant) {
        let start = *self.period_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= PERIOD {
            let share = self.stalled.as_secs_f64() / elapsed.as_secs_f64();
            let spare = self.idle_cpu.is_none_or(|idle| idle >= SPARE_CPU);
            self.link_bound = spare && share >= STALL_SHARE;
            let idle_enough = self.idle_cpu.is_some_and(|idle| idle >= RAISE_IDLE_CPU);
            self.level = if !self.link_bound {
                DEFAULT_LEVEL
            } else if share >= RAISE_STALL_SHARE && idle_enough {
                (self.level + 1).min(MAX_AUTO_LEVEL)
            } else if share < LOWER_STALL_SHARE {
                (self.level - 1).max(DEFAULT_LEVEL)
            } else {
                self.level
            };
            self.stalled = Duration::ZERO;
            self.period_start = Some(now);
        }
    }

    /// The source host's idle CPU lately, in CPUs' worth (see [`SPARE_CPU`]).
    pub fn idle_cpu(&mut self, idle: f64) {
        self.idle_cpu = Some(idle);
    }

    /// Takes the link as the bottleneck for the period starting `now`, before any evidence:
    /// a connection that starts with a large backlog (the applier was away, or the link
    /// could not keep up) would otherwise send its first period raw while the evidence
    /// gathers. After that period the evidence decides as always.
    ///
    /// `idle_before`: the host's idle CPU while the mirror was away (CPUs' worth, if known).
    /// With at least [`RAISE_IDLE_CPU`] of it the backlog starts at [`MAX_AUTO_LEVEL`]
    /// rather than climbing to it one period at a time: a backlog is bytes the link must
    /// carry, and a drain of a few seconds spent most of them at the lower levels (an ext4
    /// image through 50 MB/s: ratio 2.10x climbing, the whole image 2.17x at level 3). A
    /// compressor that cannot keep up stops the waiting on the window, and the level falls.
    pub fn assume_link_bound(&mut self, now: Instant, idle_before: Option<f64>) {
        self.link_bound = true;
        self.stalled = Duration::ZERO;
        self.period_start = Some(now);
        if let Some(idle) = idle_before {
            self.idle_cpu = Some(idle);
        }
        self.level = if idle_before.is_some_and(|idle| idle >= RAISE_IDLE_CPU) { MAX_AUTO_LEVEL } else { DEFAULT_LEVEL };
    }

    /// Whether to try compressing the next batch, and at which level.
    pub fn level(&mut self, setting: Compression, rate_limited: bool, now: Instant) -> Option<i32> {
        match setting {
            Compression::Off => None,
            Compression::Zstd(level) => Some(level),
            Compression::Auto => {
                self.roll(now);
                if self.retry_at.is_some_and(|at| now < at) {
                    return None;
                }
                (rate_limited || self.link_bound).then_some(self.level)
            }
        }
    }

    /// A batch `auto` tried went out compressed (`shrunk`) or raw.
    pub fn outcome(&mut self, shrunk: bool, now: Instant) {
        if shrunk {
            self.raw_streak = 0;
            self.retry_at = None;
            return;
        }
        self.raw_streak += 1;
        if self.raw_streak >= RAW_STREAK || self.retry_at.is_some() {
            // After a backoff one failed try is enough to back off again.
            self.retry_at = Some(now + BACKOFF);
        }
    }

    /// Whether `auto` currently sees the link as the bottleneck (for status).
    pub fn link_bound(&self) -> bool {
        self.link_bound
    }
}

#[cfg(test)]
#[path = "compression_tests.rs"]
mod tests;
