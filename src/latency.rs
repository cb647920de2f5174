//! Request latency histograms, updated from any thread without locks: the volume observes
//! each request's time to completion, metrics render the counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// Latency of a volume's requests, by operation.
#[derive(Debug, Default)]
pub struct RequestLatency {
    pub write: Histogram,
    pub flush: Histogram,
    pub discard: Histogram,
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
}
