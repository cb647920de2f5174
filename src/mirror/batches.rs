//! A sender's record batches as frames: raw, or with the payloads as one zstd frame when the
//! mirror's `compression` setting (and, for `auto`, the link) says so and the batch shrinks
//! enough (`protocol::compression`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::coalesce::Coalesced;
use super::link::frame_chunks;
use crate::cpu_idle::IdleMeter;
use crate::journal::Record;
use crate::lock;
use crate::protocol::compression::{self, AutoPolicy, BatchCompressor, Compression};
use crate::protocol::wire;

/// A batch ready to send.
pub(super) struct Encoded {
    pub chunks: Vec<bytes::Bytes>,
    /// Bytes of the whole frame.
    pub wire_bytes: u64,
    /// The zstd level the frame was compressed at (None: sent raw).
    pub level: Option<i32>,
}

pub(super) struct BatchEncoder {
    /// The mirror's setting, shared with `Senders::reload` (`mirror set` applies at once).
    setting: Arc<Mutex<Compression>>,
    /// The applier decodes zstd batches (it listed the codec in its `Welcome`).
    peer_zstd: bool,
    /// Taken while a batch is compressed on a blocking thread.
    compressor: Option<BatchCompressor>,
    policy: AutoPolicy,
    /// The source host's idle CPU, for `auto`: sampled once a period.
    idle: IdleMeter,
    idle_sampled: Instant,
}

impl BatchEncoder {
    pub fn new(setting: Arc<Mutex<Compression>>, peer_codecs: &[String]) -> BatchEncoder {
        let peer_zstd = peer_codecs.iter().any(|c| c == compression::ZSTD);
        let mut idle = IdleMeter::for_this_process();
        let _ = idle.sample();
        BatchEncoder { setting, peer_zstd, compressor: Some(BatchCompressor::new()), policy: AutoPolicy::default(), idle, idle_sampled: Instant::now() }
    }

    /// The stream starts with a large backlog: `auto` compresses from the first batch
    /// (`AutoPolicy::assume_link_bound`), at a level that suits the host's idle CPU while
    /// the mirror was away (`idle_before`).
    pub fn starts_behind(&mut self, idle_before: Option<f64>) {
        self.policy.assume_link_bound(Instant::now(), idle_before);
    }

    /// The sender waited on a full window while records were ready (the link is slower
    /// than the sender: evidence for `auto`).
    pub fn stalled(&mut self, waited: Duration) {
        self.policy.stalled(waited, Instant::now());
    }

    /// The frame of `batch`. Compression runs on a blocking thread: the sender's runtime
    /// also drives the QUIC connection, which must keep sending what is in the window
    /// meanwhile (a 4 MiB batch takes about 10 ms at level 1).
    pub async fn encode(&mut self, batch: &[Record], rate_limited: bool) -> Encoded {
        let pairs: Vec<_> = batch.iter().map(|r| (r.header, &r.payload[..])).collect();
        if let Some((level, block)) = self.compressed(rate_limited, || batch.iter().map(|r| r.payload.clone()).collect()).await {
            let header = wire::encode_compressed_batch_header(&pairs, block.len());
            let wire_bytes = (header.len() + block.len()) as u64;
            return Encoded { chunks: vec![bytes::Bytes::from(header), bytes::Bytes::from(block)], wire_bytes, level: Some(level) };
        }
        let header = wire::encode_batch_header(&pairs);
        let wire_bytes = (header.len() + batch.iter().map(|r| r.payload.len()).sum::<usize>()) as u64;
        Encoded { chunks: frame_chunks(header, batch), wire_bytes, level: None }
    }

    /// A coalesced range's frame, compressed as a batch would be (its piece headers and
    /// data as one zstd frame), else raw: the prefix and piece headers, then each write's data
    /// as it was in the journal (slices, not copied).
    pub async fn encode_range(&mut self, range: &Coalesced, rate_limited: bool) -> Encoded {
        let mut encoded_len = 0;
        let parts = || {
            let meta = bytes::Bytes::from(range.meta.encode());
            encoded_len = meta.len() as u64 + range.meta.data_len();
            std::iter::once(meta).chain(range.data.iter().cloned()).collect()
        };
        if let Some((level, block)) = self.compressed(rate_limited, parts).await {
            let header = wire::encode_compressed_range_header(range.first_lsn, range.timestamp_us, encoded_len, block.len());
            let wire_bytes = (header.len() + block.len()) as u64;
            return Encoded { chunks: vec![bytes::Bytes::from(header), bytes::Bytes::from(block)], wire_bytes, level: Some(level) };
        }
        let header = wire::encode_range_header(range.first_lsn, range.timestamp_us, &range.meta);
        let wire_bytes = header.len() as u64 + range.meta.data_len();
        let mut chunks = Vec::with_capacity(1 + range.data.len());
        chunks.push(bytes::Bytes::from(header));
        chunks.extend(range.data.iter().cloned());
        Encoded { chunks, wire_bytes, level: None }
    }

    /// The `payloads` as one zstd frame, when the setting (and for `auto` the link) says to
    /// compress and they shrink enough; None: send them raw. `payloads` is called only when
    /// compressing, so a raw frame costs no extra copy of its piece list.
    async fn compressed(&mut self, rate_limited: bool, payloads: impl FnOnce() -> Vec<bytes::Bytes>) -> Option<(i32, Vec<u8>)> {
        let setting = *lock(&self.setting);
        let now = Instant::now();
        if setting == Compression::Auto && now.duration_since(self.idle_sampled) >= compression::PERIOD {
            if let Some(idle) = self.idle.sample() {
                self.policy.idle_cpu(idle);
            }
            self.idle_sampled = now;
        }
        let level = if self.peer_zstd { self.policy.level(setting, rate_limited, now) } else { None };
        // The context is taken only when used (a `take()` beside a `None` level lost it).
        let (level, mut compressor) = level.and_then(|level| Some((level, self.compressor.take()?)))?;
        let payloads = payloads();
        let work = tokio::task::spawn_blocking(move || {
            let block = compressor.compress(level, payloads.iter().map(|p| &p[..]));
            (compressor, block)
        });
        let block = match work.await {
            Ok((compressor, block)) => {
                self.compressor = Some(compressor);
                block
            }
            // Only a panic in zstd gets here: send raw, with a fresh context.
            Err(_) => {
                self.compressor = Some(BatchCompressor::new());
                None
            }
        };
        if matches!(setting, Compression::Auto) {
            self.policy.outcome(block.is_some(), Instant::now());
        }
        block.map(|block| (level, block))
    }
}

/// The journal reader of a stream, with room for one record read and not sent yet (the
/// record a coalesced range ended before: a marker, or one that did not fit).
pub(super) struct Lookahead {
    reader: crate::journal::JournalReader,
    pending: Option<Record>,
}

impl Lookahead {
    pub fn new(reader: crate::journal::JournalReader) -> Lookahead {
        Lookahead { reader, pending: None }
    }

    /// LSN of the record `next_record` returns.
    pub fn next_lsn(&self) -> u64 {
        self.pending.as_ref().map_or_else(|| self.reader.next_lsn(), |record| record.header.lsn)
    }

    pub fn next_record(&mut self) -> Result<Option<Record>, crate::journal::JournalError> {
        match self.pending.take() {
            Some(record) => Ok(Some(record)),
            None => self.reader.next_record(),
        }
    }

    /// Gives back the record `next_record` just returned.
    pub fn put_back(&mut self, record: Record) {
        debug_assert!(self.pending.is_none());
        self.pending = Some(record);
    }
}
