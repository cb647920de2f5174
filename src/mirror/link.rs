//! What a sender's connection is made of, apart from the session that drives it: the QUIC
//! connection to the applier (pinned by its fingerprint), the `Hello` that opens every
//! connection (sessions, switchovers, restores), record batches cut into QUIC chunks, and the
//! connection's transport statistics copied into the mirror's status.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock;
use crate::status::MirrorStatus;

use crate::protocol::framing::LinkError;
use crate::protocol::tls;
use crate::protocol::transport;
use crate::protocol::wire::{self, Hello};
use crate::volume::Volume;

/// How long one connection attempt of a sender waits for the applier's answer at most
/// (never longer than the idle timeout). quinn resends an unanswered Initial after 1 s, then
/// 2 s, 4 s, 8 s: an attempt begun while the applier was down would complete only at its next
/// resend, up to 8 s after the applier came back. Attempts bounded at 5 s (Initials at 0, 1
/// and 3 s), each followed at once by the next (`Sender::run` does not back off after one),
/// find a returning applier within about 2 s. One-shot callers (a switchover, a restore),
/// which do not try again, wait the whole idle timeout instead.
pub(super) const HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(5);

/// A QUIC connection to the applier at `address` (HOST:PORT), pinned by its fingerprint and
/// authenticated with `identity`, opened with the TLS `server_name` (`"applier"`, or a
/// sender's, see `transport::sender_server_name`). The endpoint is returned to be kept while
/// the connection is. An applier that does not answer within `attempt` (or the idle timeout,
/// if shorter) is `LinkError::Unanswered`.
pub(super) async fn connect(
    identity: &tls::Identity,
    address: &str,
    fingerprint: &str,
    idle_timeout: Duration,
    congestion: transport::Congestion,
    server_name: &str,
    attempt: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), LinkError> {
    let resolved: SocketAddr = tokio::net::lookup_host(address).await?.next().ok_or_else(|| LinkError::Protocol(format!("cannot resolve {address}")))?;
    let local: SocketAddr = if resolved.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    let mut endpoint = transport::endpoint(local, None)?;
    endpoint.set_default_client_config(transport::client_config(identity, fingerprint, idle_timeout, congestion)?);
    let connecting = endpoint.connect(resolved, server_name)?;
    let bound = attempt.min(idle_timeout);
    match tokio::time::timeout(bound, connecting).await {
        Ok(connection) => Ok((endpoint, connection?)),
        Err(_) => Err(LinkError::Unanswered { address: address.to_string(), waited: bound }),
    }
}

/// A mirror's sender id: the same for every connection of that mirror of that volume, also
/// across restarts of `run`, so a reconnect supersedes the mirror's own stale session at the
/// applier and nothing else's.
pub(super) fn sender_id(volume: &crate::volume::VolumeConfig, mirror: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::new().chain_update(volume.uuid.as_bytes()).chain_update(mirror.as_bytes()).finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(id)
}

/// Who this volume is, for the applier (the first message of a connection).
pub(super) fn hello_of(volume: &Volume) -> Hello {
    let journal = volume.journal();
    hello(volume.config(), volume.history(), journal.first_lsn(), journal.written_lsn())
}

/// The Hello of a volume with `config` and `history` whose journal holds `first_lsn` to
/// `last_lsn` (also for a volume nobody serves: a restore).
pub(super) fn hello(config: &crate::volume::VolumeConfig, history: &crate::generation::History, first_lsn: u64, last_lsn: u64) -> Hello {
    Hello {
        protocol: wire::PROTOCOL_VERSION,
        volume_uuid: *config.uuid.as_bytes(),
        volume_name: config.name.clone(),
        size: config.size,
        generation: *history.current().id.as_bytes(),
        first_lsn,
        last_lsn,
        history: wire::wire_history(history),
    }
}

/// A batch frame as chunks for QUIC, all handed over in one call: large payloads move in as
/// they are (no copy), runs of small ones are gathered into one chunk. (quinn finds the bytes
/// of each packet by walking its unacknowledged chunks from the oldest, so a 16 MiB window in
/// 4 KiB chunks would cost a walk of thousands per packet: more than the copy.)
pub(super) fn frame_chunks(header: Vec<u8>, batch: &[crate::journal::Record]) -> Vec<bytes::Bytes> {
    const OWN_CHUNK: usize = 64 << 10;
    let mut chunks = vec![bytes::Bytes::from(header)];
    let mut rest = batch;
    while let Some(first) = rest.first() {
        if first.payload.len() >= OWN_CHUNK {
            chunks.push(first.payload.clone());
            rest = &rest[1..];
            continue;
        }
        let run = rest.iter().position(|r| r.payload.len() >= OWN_CHUNK).unwrap_or(rest.len());
        let mut gathered = Vec::with_capacity(rest[..run].iter().map(|r| r.payload.len()).sum());
        for record in &rest[..run] {
            gathered.extend_from_slice(&record.payload);
        }
        if !gathered.is_empty() {
            chunks.push(bytes::Bytes::from(gathered));
        }
        rest = &rest[run..];
    }
    chunks
}

/// Copies the connection's transport statistics into the mirror's status every second, for as
/// long as it lives (dropped with the session).
pub(super) struct LinkStatsTask(tokio::task::JoinHandle<()>);

impl LinkStatsTask {
    pub(super) fn start(connection: &quinn::Connection, status: Arc<Mutex<MirrorStatus>>) -> LinkStatsTask {
        let connection = connection.clone();
        LinkStatsTask(tokio::spawn(async move {
            while connection.close_reason().is_none() {
                let stats = connection.stats();
                let link = crate::status::LinkStats {
                    rtt_ms: stats.path.rtt.as_secs_f64() * 1e3,
                    congestion_window_bytes: stats.path.cwnd,
                    sent_datagrams: stats.udp_tx.datagrams,
                    sent_udp_bytes: stats.udp_tx.bytes,
                    lost_packets: stats.path.lost_packets,
                    lost_bytes: stats.path.lost_bytes,
                    congestion_events: stats.path.congestion_events,
                    mtu_bytes: u64::from(stats.path.current_mtu),
                };
                {
                    // Only while the mirror counts as connected: `disconnect` clears it.
                    let mut shown = lock(&status);
                    if shown.connected() {
                        shown.link = Some(link);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    }
}

impl Drop for LinkStatsTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Record, RecordHeader, RecordKind};

    fn record(lsn: u64, len: usize) -> Record {
        let payload: Vec<u8> = (0..len).map(|i| (lsn as usize * 31 + i) as u8).collect();
        let kind = if len == 0 { RecordKind::WriteZeroes } else { RecordKind::Write };
        let header = RecordHeader { kind, flags: 0, lsn, offset: 0, length: len.max(4096) as u64, payload_len: len as u32, synced_lsn: 0, timestamp_us: 0 };
        Record { header, payload: bytes::Bytes::from(payload) }
    }

    /// The chunks carry the header, then every payload in LSN order; large payloads travel as
    /// the very buffers they were read into, runs of small ones as one gathered chunk each.
    #[test]
    fn frame_chunks_keep_payload_order_and_gather_only_small_runs() {
        let sizes = [4096, 0, 512, 65536, 4096, 4096, 1 << 20, 0, 100];
        let batch: Vec<Record> = sizes.iter().enumerate().map(|(i, &len)| record(i as u64 + 1, len)).collect();
        let chunks = frame_chunks(vec![7, 7, 7], &batch);
        let mut expected = vec![7u8, 7, 7];
        for record in &batch {
            expected.extend_from_slice(&record.payload);
        }
        assert_eq!(chunks.concat(), expected);
        // header | 4096+0+512 | 65536 | 4096+4096 | 1 MiB | 0+100
        let lengths: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(lengths, vec![3, 4608, 65536, 8192, 1 << 20, 100]);
        assert_eq!(chunks[2].as_ptr(), batch[3].payload.as_ptr(), "a large payload is not copied");
        assert_eq!(chunks[4].as_ptr(), batch[6].payload.as_ptr(), "a large payload is not copied");
    }
}
