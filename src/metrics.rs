//! Prometheus text exposition (format 0.0.4) for `run --metrics ADDR` and `applier run
//! --metrics ADDR`: a latency histogram type, the rendering of a volume's and an applier's
//! status, and a small HTTP server answering `GET /metrics`. Every number is taken from the
//! same status structures `status --json` prints, so the two always agree.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::replication::applier::ApplierStatus;
use crate::replication::sender::MirrorStatus;
use crate::status::Status;

/// Upper bounds of the latency buckets, in seconds: 25 µs (a cached write) to 10 s (a
/// writer held by a full journal).
pub const LATENCY_BUCKETS: [f64; 16] = [25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 2.5, 10.0];

/// A latency histogram updated from any thread without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last counts everything above the largest bound.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A copy of a histogram's numbers, cumulative as Prometheus wants them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations at or below each bound of [`LATENCY_BUCKETS`], then the total count.
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|count| {
                total += count.load(Ordering::Relaxed);
                total
            })
            .collect();
        HistogramSnapshot { cumulative, sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9 }
    }
}

/// Builds an exposition: `# HELP`/`# TYPE` once per family, then its samples.
#[derive(Default)]
pub struct Exposition {
    text: String,
    declared: Vec<&'static str>,
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n").replace('"', "\\\"")
}

fn label_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels.iter().map(|(name, value)| format!("{name}=\"{}\"", escape(value))).collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    fn declare(&mut self, name: &'static str, kind: &str, help: &str) {
        if !self.declared.contains(&name) {
            self.declared.push(name);
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
    }

    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, "gauge", help);
        let _ = writeln!(self.text, "{name}{} {value}", label_text(labels));
    }

    /// `name` must end in `_total`.
    pub fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, "counter", help);
        let _ = writeln!(self.text, "{name}{} {value}", label_text(labels));
    }

    pub fn histogram(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], snapshot: &HistogramSnapshot) {
        self.declare(name, "histogram", help);
        for (index, count) in snapshot.cumulative.iter().enumerate() {
            let bound = LATENCY_BUCKETS.get(index).map_or("+Inf".to_string(), |b| b.to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &bound));
            let _ = writeln!(self.text, "{name}_bucket{} {count}", label_text(&with_le));
        }
        let _ = writeln!(self.text, "{name}_sum{} {}", label_text(labels), snapshot.sum_seconds);
        let _ = writeln!(self.text, "{name}_count{} {}", label_text(labels), snapshot.count());
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// Latency of a volume's requests, by operation.
#[derive(Debug, Default)]
pub struct RequestLatency {
    pub write: Histogram,
    pub flush: Histogram,
    pub discard: Histogram,
}

const MODES: [&str; 4] = ["journaling", "full", "failed", "stopped"];
const MIRROR_STATES: [&str; 3] = ["syncing", "replicating", "disconnected"];

/// The metrics page of a running volume.
pub fn render_volume(status: &Status, latency: &RequestLatency) -> String {
    let mut out = Exposition::default();
    let v = &status.volume;
    let n = &v.numbers;
    let volume = v.name.as_str();
    let labels = [("volume", volume)];
    let uuid = v.uuid.to_string();
    let generation = v.generation.to_string();
    out.gauge("ublk_mirror_volume_info", "Always 1; the labels identify the volume.", &[("volume", volume), ("uuid", &uuid), ("generation", &generation)], 1.0);
    let mode = serde_json::to_value(n.mode).ok().and_then(|m| m.as_str().map(String::from)).unwrap_or_default();
    for candidate in MODES {
        out.gauge("ublk_mirror_volume_mode", "1 for the volume's current mode (journaling, full, failed, stopped), else 0.", &[("volume", volume), ("mode", candidate)], (candidate == mode) as u8 as f64);
    }
    out.gauge("ublk_mirror_volume_size_bytes", "Size of the volume.", &labels, v.size as f64);
    out.gauge("ublk_mirror_volume_last_lsn", "Newest LSN assigned to a write.", &labels, n.last_lsn as f64);
    out.gauge("ublk_mirror_volume_synced_lsn", "Newest LSN durable in the journal.", &labels, n.synced_lsn as f64);
    out.gauge("ublk_mirror_volume_applied_lsn", "Newest LSN applied to the backing store.", &labels, n.applied_lsn as f64);
    out.gauge("ublk_mirror_volume_checkpoint_lsn", "Newest LSN durable in the backing store (checkpointed).", &labels, n.checkpoint_lsn as f64);
    out.gauge("ublk_mirror_volume_pending_bytes", "Journaled bytes not yet applied to the backing store.", &labels, n.pending_bytes as f64);
    out.counter("ublk_mirror_volume_writes_total", "Write requests completed.", &labels, n.writes as f64);
    out.counter("ublk_mirror_volume_written_bytes_total", "Bytes written.", &labels, n.written_bytes as f64);
    out.counter("ublk_mirror_volume_flushes_total", "Flush requests completed.", &labels, n.flushes as f64);
    out.counter("ublk_mirror_volume_reads_total", "Read requests completed.", &labels, n.reads as f64);
    out.counter("ublk_mirror_volume_read_bytes_total", "Bytes read.", &labels, n.read_bytes as f64);
    let j = &status.journal;
    out.gauge("ublk_mirror_journal_used_bytes", "Bytes of records the journal holds.", &labels, j.used_bytes as f64);
    out.gauge("ublk_mirror_journal_capacity_bytes", "Most bytes of records the journal can hold.", &labels, j.capacity_bytes as f64);
    let fill = if j.capacity_bytes > 0 { j.used_bytes as f64 / j.capacity_bytes as f64 } else { 0.0 };
    out.gauge("ublk_mirror_journal_fill_ratio", "used_bytes / capacity_bytes (writes wait at 1).", &labels, fill);
    out.gauge("ublk_mirror_journal_first_lsn", "Oldest LSN the journal retains.", &labels, j.first_lsn as f64);
    out.gauge("ublk_mirror_journal_segments", "Segment files in use.", &labels, j.segments as f64);
    for (op, histogram) in [("write", &latency.write), ("flush", &latency.flush), ("discard", &latency.discard)] {
        out.histogram(
            "ublk_mirror_request_latency_seconds",
            "Time from a request's submission to its completion (write includes write-zeroes).",
            &[("volume", volume), ("op", op)],
            &histogram.snapshot(),
        );
    }
    for value in &status.mirrors {
        let Ok(mirror) = serde_json::from_value::<MirrorStatus>(value.clone()) else { continue };
        render_mirror(&mut out, volume, &mirror);
    }
    out.finish()
}

fn render_mirror(out: &mut Exposition, volume: &str, m: &MirrorStatus) {
    let labels = [("volume", volume), ("mirror", m.name.as_str())];
    for state in MIRROR_STATES {
        out.gauge("ublk_mirror_mirror_state", "1 for the mirror's current state (syncing, replicating, disconnected), else 0.", &[("volume", volume), ("mirror", &m.name), ("state", state)], (m.state == state) as u8 as f64);
    }
    out.gauge("ublk_mirror_mirror_connected", "1 while connected to the applier.", &labels, m.connected as u8 as f64);
    out.gauge("ublk_mirror_mirror_consistent", "1 when the replica is a consistent past state of the volume.", &labels, m.consistent as u8 as f64);
    out.gauge("ublk_mirror_mirror_received_lsn", "Newest LSN durable in the applier's journal.", &labels, m.received_lsn as f64);
    out.gauge("ublk_mirror_mirror_applied_lsn", "Newest LSN applied to the replica.", &labels, m.applied_lsn as f64);
    out.gauge("ublk_mirror_mirror_lag_bytes", "Payload bytes of records the replica has not applied.", &labels, m.lag_bytes as f64);
    out.gauge("ublk_mirror_mirror_lag_records", "Records the replica has not applied.", &labels, m.lag_records as f64);
    out.gauge("ublk_mirror_mirror_lag_seconds", "Age of the oldest record the replica has not applied.", &labels, m.lag_seconds);
    out.gauge("ublk_mirror_mirror_throughput_bytes_per_second", "Payload bytes the replica applied per second, over about the last second.", &labels, m.throughput_bytes_per_second);
    if let Some(rate) = m.max_rate {
        out.gauge("ublk_mirror_mirror_max_rate_bytes_per_second", "The mirror's bandwidth limit.", &labels, rate as f64);
    }
    out.counter("ublk_mirror_mirror_sent_bytes_total", "Payload bytes sent (records and synchronisation chunks).", &labels, m.sent_bytes as f64);
    out.counter("ublk_mirror_mirror_sent_records_total", "Journal records sent.", &labels, m.sent_records as f64);
    out.counter("ublk_mirror_mirror_reconnects_total", "Connections lost or refused (each followed by a retry).", &labels, m.reconnects as f64);
    out.gauge("ublk_mirror_mirror_sync_chunks", "Chunks of the current or last initial synchronisation.", &labels, m.sync_chunks_total as f64);
    out.gauge("ublk_mirror_mirror_sync_chunks_compared", "Chunks compared so far.", &labels, m.sync_chunks_compared as f64);
    out.gauge("ublk_mirror_mirror_sync_chunks_sent", "Chunks sent so far (as data or as zeros).", &labels, m.sync_chunks_sent as f64);
}

/// The metrics page of a running applier.
pub fn render_applier(status: &ApplierStatus) -> String {
    let mut out = Exposition::default();
    out.gauge("ublk_mirror_applier_replicas", "Replicas this applier keeps.", &[], status.replicas.len() as f64);
    for r in &status.replicas {
        let labels = [("volume", r.volume.as_str())];
        out.gauge("ublk_mirror_replica_received_lsn", "Newest LSN durable in the replica's journal.", &labels, r.received_lsn as f64);
        out.gauge("ublk_mirror_replica_applied_lsn", "Newest LSN applied to the replica image.", &labels, r.applied_lsn as f64);
        out.gauge("ublk_mirror_replica_consistent", "1 when the image is a consistent past state of the source.", &labels, r.consistent as u8 as f64);
        out.gauge("ublk_mirror_replica_connected", "1 while the source is connected.", &labels, r.connected as u8 as f64);
        out.counter("ublk_mirror_replica_records_received_total", "Records received and made durable.", &labels, r.records_received as f64);
        out.counter("ublk_mirror_replica_records_duplicated_total", "Records received again after a reconnect (skipped).", &labels, r.records_duplicated as f64);
        out.counter("ublk_mirror_replica_received_bytes_total", "Payload bytes received (records and synchronisation chunks).", &labels, r.bytes_received as f64);
        out.counter("ublk_mirror_replica_connections_total", "Connections accepted from the source.", &labels, r.connections as f64);
    }
    out.finish()
}

/// Produces the page at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A minimal HTTP/1.1 server for `GET /metrics` (one short-lived thread per scrape).
pub struct MetricsServer {
    address: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(address: SocketAddr, render: Render) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(address).map_err(|e| std::io::Error::new(e.kind(), format!("metrics: bind {address}: {e}")))?;
        let address = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let render = render.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &render);
                });
            }
        })?;
        tracing::info!(%address, "serving metrics at /metrics");
        Ok(MetricsServer { address, stopping, thread: Some(thread) })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

fn answer(stream: TcpStream, render: &Render) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Headers are read and ignored (bounded: a scrape sends a handful).
    for _ in 0..100 {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
    };
    let mut stream = stream;
    write!(stream, "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    stream.flush()
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(10));
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_secs(20));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.cumulative[0], 1);
        assert_eq!(snapshot.cumulative[3], 1, "300 µs is above the 250 µs bound");
        assert_eq!(snapshot.cumulative[4], 2);
        assert_eq!(snapshot.cumulative[LATENCY_BUCKETS.len() - 1], 2);
        assert_eq!(snapshot.count(), 3);
        assert!((snapshot.sum_seconds - 20.00031).abs() < 1e-9);
    }

    #[test]
    fn labels_are_escaped() {
        let mut out = Exposition::default();
        out.gauge("x", "help", &[("name", "a\"b\\c\nd")], 1.0);
        assert!(out.finish().contains(r#"x{name="a\"b\\c\nd"} 1"#));
    }
}
