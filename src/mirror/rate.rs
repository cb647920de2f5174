//! A mirror's bandwidth limit (`max_rate`): a pacing limiter that lets bytes pass at the
//! configured rate with at most [`BURST`] worth of credit saved up while idle. The rate is
//! shared with whoever changes it (`mirror set` on a running volume), so a new limit applies to
//! the next batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Credit an idle mirror may save up: short enough that a burst cannot flood a WAN queue.
const BURST: Duration = Duration::from_millis(50);

pub struct RateLimiter {
    /// Bytes per second; 0 means unlimited.
    rate: Arc<AtomicU64>,
    /// When the bytes let through so far will have passed at the rate.
    paid_until: Instant,
}

impl RateLimiter {
    pub fn new(rate: Arc<AtomicU64>) -> RateLimiter {
        RateLimiter { rate, paid_until: Instant::now() }
    }

    /// The most bytes worth putting in one batch: about 50 ms of the rate, so pacing stays smooth.
    pub fn batch_limit(&self, unlimited: usize) -> usize {
        match self.rate.load(Ordering::Relaxed) {
            0 => unlimited,
            rate => ((rate / 20) as usize).clamp(64 << 10, unlimited),
        }
    }

    /// A limit is set (compression's `auto` then compresses: the link is the bottleneck).
    pub fn limited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) != 0
    }

    /// How long to wait before sending `bytes` (and books them).
    pub fn book(&mut self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            self.paid_until = now;
            return Duration::ZERO;
        }
        let start = self.paid_until.max(now.checked_sub(BURST).unwrap_or(now));
        self.paid_until = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        // Send once the bytes before these have passed; these are paid for by the next wait.
        start.saturating_duration_since(now)
    }

    pub async fn pace(&mut self, bytes: u64) {
        let wait = self.book(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_holds_the_rate_and_bounds_the_burst() {
        let rate = Arc::new(AtomicU64::new(1_000_000));
        let mut limiter = RateLimiter::new(rate.clone());
        let start = Instant::now();
        // 10 MB in 100 KB pieces at 1 MB/s: the last piece may leave at 9.9 s, minus the burst.
        let mut clock = start;
        for _ in 0..100 {
            clock += limiter.book(100_000, clock);
        }
        let elapsed = clock - start;
        assert!(elapsed >= Duration::from_millis(9_850) && elapsed <= Duration::from_millis(9_900), "{elapsed:?}");
        // After an idle minute only the burst is credited.
        clock += Duration::from_secs(60);
        assert_eq!(limiter.book(10_000, clock), Duration::ZERO);
        assert_eq!(limiter.book(100_000, clock), Duration::ZERO);
        assert!(limiter.book(100_000, clock) >= Duration::from_millis(50));
        // Unlimited: never waits.
        rate.store(0, Ordering::Relaxed);
        assert_eq!(limiter.book(u64::MAX / 2, clock), Duration::ZERO);
        assert_eq!(limiter.batch_limit(4 << 20), 4 << 20);
        rate.store(1 << 20, Ordering::Relaxed);
        assert_eq!(limiter.batch_limit(4 << 20), 64 << 10);
    }
}
