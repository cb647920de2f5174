//! Congestion control of the replication link: quinn's BBR with its congestion window held to
//! a multiple of the path's bandwidth-delay product, which this module measures itself.
//!
//! Why: quinn paces at 1.25 congestion windows per smoothed RTT, whatever the controller's
//! own pacing rate, and its (experimental) BBR adds the ACK aggregation it sees to the
//! window. Through the bench's bottleneck (50 ms RTT, 50 MB/s, 100 ms of tail-drop buffer:
//! a 2.5 MB bandwidth-delay product) the window grew to 30-60 MB, the RTT to 150 ms (a full
//! queue), and 10-14% of the packets overflowed the queue: a 1 GiB backlog went out as
//! 1.26 GB and drained at 0.55-0.90x the link. Held to two bandwidth-delay products (BBR's
//! own cwnd gain), at most one BDP waits in the bottleneck's queue, so a buffer of one BDP
//! or more loses nothing, and the pacer's bursts shrink with the window.
//!
//! After startup the bound only ever lowers BBR's window, never raises it: BBR keeps deciding
//! everything else (drain, its RTT probes, loss recovery), and random loss still costs little.
//!
//! Startup is ours: until the measured delivery rate stops growing (BBR's full-pipe test:
//! three intervals in a row without a quarter more) or a packet is lost, the window *is* the
//! bound, which doubles every round trip while the path keeps up. Why: quinn's BBR (0.11.19,
//! and upstream as of 2026-07) takes its first ACK for an expired minimum RTT
//! (`probe_rtt_last_started_at` starts as None) and enters ProbeRtt at once: four packets
//! in flight for 200 ms and a round, then startup again from a few dozen KB. Through the
//! bench's 50 ms, 50 MB/s path the first 4 MiB took 0.9 s to arrive, and a 1 GiB stream
//! reached 0.93x the link; with this startup the pipe is full after about 0.3 s.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The window is at most this many bandwidth-delay products (BBR's cwnd gain).
const BDP_GAIN: u64 = 2;
/// The window in startup, in bandwidth-delay products: BBR's startup gain (2/ln 2, rounded
/// up), so that the window doubles each round trip.
const STARTUP_GAIN: u64 = 3;
/// Delivery is measured over intervals of one minimum RTT: longer ones smooth ACK bursts
/// better but slow down startup, where the bound must let the window double every RTT (with
/// two-RTT intervals it grew 1.35x per 100 ms at 50 ms RTT, and took 1.3 s to reach 5 MB).
const INTERVAL_RTTS: u32 = 1;
/// ... and at least this long, so that on paths with a tiny RTT (loopback, a LAN) a burst of
/// ACKs does not pass for bandwidth.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The delivery rate is the highest of this many recent intervals (BBR's ten rounds).
const SAMPLES: usize = 10;

/// Builds [`BoundedBbr`] controllers.
#[derive(Debug, Default)]
pub struct BoundedBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for BoundedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = self.bbr.clone().build(now, current_mtu);
        let floor = inner.initial_window();
        Box::new(BoundedBbr { inner, delivery: DeliveryRate::default(), floor, lost_in_startup: false, first_ack: None })
    }
}

/// BBR whose window never exceeds [`BDP_GAIN`] x the measured delivery rate x the minimum RTT
/// (and never falls below BBR's initial window on account of the bound).
pub struct BoundedBbr {
    inner: Box<dyn Controller>,
    delivery: DeliveryRate,
    floor: u64,
    /// A packet was lost before the pipe was full: startup ends there, BBR's loss recovery
    /// takes over (a path whose buffer is shallower than our window).
    lost_in_startup: bool,
    /// When the first ACK arrived. Packets lost before it say nothing about the path's
    /// capacity: they are the Initial packets of a connection attempt made while the applier
    /// was not listening yet (a sender retrying after an outage), which quinn counts as lost.
    first_ack: Option<Instant>,
}

impl Clone for BoundedBbr {
    fn clone(&self) -> Self {
        BoundedBbr {
            inner: self.inner.clone_box(),
            delivery: self.delivery.clone(),
            floor: self.floor,
            lost_in_startup: self.lost_in_startup,
            first_ack: self.first_ack,
        }
    }
}

impl BoundedBbr {
    /// The bound on the window: two bandwidth-delay products, or BBR's initial window while
    /// nothing has been measured yet.
    fn bound(&self) -> u64 {
        self.delivery.bdp(BDP_GAIN).max(self.floor)
    }

    fn in_startup(&self) -> bool {
        !self.delivery.pipe_full() && !self.lost_in_startup
    }
}

impl Controller for BoundedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.first_ack.get_or_insert(now);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.delivery.on_ack(now, sent, bytes, app_limited, rtt.min());
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        // `sent`: when the newest of the lost packets was sent.
        self.lost_in_startup |= lost_bytes > 0 && self.first_ack.is_some_and(|first| sent >= first);
        self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        if self.in_startup() {
            return self.delivery.bdp(STARTUP_GAIN).max(self.floor);
        }
        self.inner.window().min(self.bound())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = self.inner.metrics();
        metrics.congestion_window = self.window();
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The path's delivery rate: acknowledged bytes per interval of about a minimum RTT, the
/// highest of the last [`SAMPLES`] intervals. As in BBR's rate samples, an interval's bytes
/// are divided by the longer of the time its ACKs took to arrive and the time its packets
/// took to be sent: ACKs that arrive bunched (delayed, aggregated, or held up behind a busy
/// CPU) cannot make the path look faster than the sender sent, nor a burst from quinn's pacer
/// faster than the ACKs came back. An interval in which the sender had nothing to send
/// (app-limited) says little about the path: it may raise the estimate, never lower it.
#[derive(Debug, Clone, Default)]
struct DeliveryRate {
    interval: Option<Interval>,
    /// Recent intervals, bytes per second, newest last.
    samples: Vec<f64>,
    min_rtt: Duration,
    pipe: FullPipe,
}

/// BBR's full-pipe test on the measured intervals: the pipe is full once [`FLAT_INTERVALS`]
/// busy intervals in a row brought less than [`GROWTH`] times the best rate seen.
#[derive(Debug, Clone, Copy, Default)]
struct FullPipe {
    best: f64,
    flat: u32,
    full: bool,
}

const GROWTH: f64 = 1.25;
const FLAT_INTERVALS: u32 = 3;

impl FullPipe {
    fn on_busy_interval(&mut self, rate: f64) {
        if self.full {
            return;
        }
        if rate >= self.best * GROWTH {
            self.best = rate;
            self.flat = 0;
        } else {
            self.flat += 1;
            self.full = self.flat >= FLAT_INTERVALS;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Interval {
    /// When its first ACK arrived.
    started: Instant,
    /// Send times of the earliest and latest packet it acknowledged.
    first_sent: Instant,
    last_sent: Instant,
    bytes: u64,
    app_limited: bool,
}

impl DeliveryRate {
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, min_rtt: Duration) {
        self.min_rtt = min_rtt;
        let interval = self.interval.get_or_insert(Interval { started: now, first_sent: sent, last_sent: sent, bytes: 0, app_limited: false });
        interval.bytes += bytes;
        interval.app_limited |= app_limited;
        interval.first_sent = interval.first_sent.min(sent);
        interval.last_sent = interval.last_sent.max(sent);
        let acked_over = now.saturating_duration_since(interval.started);
        if acked_over < (min_rtt * INTERVAL_RTTS).max(MIN_INTERVAL) {
            return;
        }
        let sent_over = interval.last_sent.saturating_duration_since(interval.first_sent);
        let rate = interval.bytes as f64 / acked_over.max(sent_over).as_secs_f64();
        let app_limited = interval.app_limited;
        let counts = !app_limited || rate >= self.rate();
        if !app_limited {
            self.pipe.on_busy_interval(rate);
        }
        self.interval = None;
        if counts {
            if self.samples.len() == SAMPLES {
                self.samples.remove(0);
            }
            self.samples.push(rate);
        }
    }

    /// Bytes per second (0 before the first interval ends).
    fn rate(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }

    /// Whether the delivery rate stopped growing while the sender was busy.
    fn pipe_full(&self) -> bool {
        self.pipe.full
    }

    /// `gain` bandwidth-delay products in bytes (0 before anything was measured).
    fn bdp(&self, gain: u64) -> u64 {
        (self.rate() * self.min_rtt.as_secs_f64()) as u64 * gain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acknowledgements of a path that delivers `rate` bytes per second with `rtt`, in bursts
    /// of `burst` bytes (aggregated ACKs, each for packets sent evenly over the burst's time),
    /// for `seconds`.
    fn deliver(delivery: &mut DeliveryRate, start: Instant, rate: f64, rtt: Duration, burst: u64, seconds: f64, app_limited: bool) -> Instant {
        let step = Duration::from_secs_f64(burst as f64 / rate);
        let mut now = start + rtt;
        while now.duration_since(start).as_secs_f64() < seconds {
            now += step;
            // The burst's packets: the first sent a step before the last.
            delivery.on_ack(now, now - rtt - step, burst / 2, app_limited, rtt);
            delivery.on_ack(now, now - rtt, burst - burst / 2, app_limited, rtt);
        }
        now
    }

    /// ACKs held up and then delivered all at once (a stalled receiver or relay) do not pass
    /// for bandwidth: the packets they acknowledge were sent at the path's rate.
    #[test]
    fn bunched_acks_are_measured_at_the_rate_they_were_sent() {
        let mut delivery = DeliveryRate::default();
        let rtt = Duration::from_millis(50);
        let start = Instant::now();
        // 50 MB/s sent in 1500-byte packets for two seconds; the ACKs for each 200 ms of it
        // come back squeezed into 60 ms (3.3 times the rate).
        let packet = Duration::from_secs_f64(1500.0 / 50e6);
        let per_bunch = 200_000 / 30;
        for bunch in 0..10u32 {
            let first_ack = start + rtt + Duration::from_millis(200) * (bunch + 1);
            for i in 0..per_bunch {
                let sent = start + Duration::from_millis(200) * bunch + packet * i;
                delivery.on_ack(first_ack + Duration::from_millis(60) * i / per_bunch, sent, 1500, false, rtt);
            }
        }
        let rate = delivery.rate();
        assert!(rate <= 56e6, "bunched ACKs made 50 MB/s look like {rate}");
    }

    #[test]
    fn delivery_rate_is_the_path_rate_despite_ack_bursts() {
        let mut delivery = DeliveryRate::default();
        let rtt = Duration::from_millis(50);
        // 50 MB/s acknowledged in 250 KB bursts (every 5 ms).
        deliver(&mut delivery, Instant::now(), 50e6, rtt, 250_000, 3.0, false);
        let rate = delivery.rate();
        assert!((45e6..=56e6).contains(&rate), "{rate}");
        let bdp = delivery.bdp(2);
        assert!((4_500_000..=5_600_000).contains(&bdp), "two BDPs of 50 MB/s x 50 ms: {bdp}");
    }

    #[test]
    fn idle_intervals_do_not_lower_the_rate_but_busy_ones_do() {
        let mut delivery = DeliveryRate::default();
        let rtt = Duration::from_millis(20);
        let start = Instant::now();
        let now = deliver(&mut delivery, start, 100e6, rtt, 100_000, 1.0, false);
        // A trickle while the sender had nothing to send: the path is as fast as before.
        let now = deliver(&mut delivery, now, 1e6, rtt, 10_000, 2.0, true);
        assert!(delivery.rate() > 90e6, "{}", delivery.rate());
        // A slower path, measured while busy: the estimate follows within a few intervals.
        deliver(&mut delivery, now, 10e6, rtt, 10_000, 1.0, false);
        let rate = delivery.rate();
        assert!((9e6..=11e6).contains(&rate), "{rate}");
    }

    fn controller(now: Instant) -> BoundedBbr {
        let inner = Arc::new(BbrConfig::default()).build(now, 1200);
        BoundedBbr { floor: inner.initial_window(), inner, delivery: DeliveryRate::default(), lost_in_startup: false, first_ack: None }
    }

    /// Out of startup, the window ends where the pipe is full.
    fn fill_the_pipe(controller: &mut BoundedBbr, now: Instant, rate: f64, rtt: Duration) -> Instant {
        let now = deliver(&mut controller.delivery, now, rate, rtt, 1_000, 0.5, false);
        assert!(!controller.in_startup());
        now
    }

    #[test]
    fn startup_window_follows_the_delivery_rate_until_it_stops_growing() {
        let now = Instant::now();
        let mut controller = controller(now);
        // Nothing measured: BBR's initial window.
        assert_eq!(controller.window(), controller.inner.initial_window());
        let rtt = Duration::from_millis(50);
        // The rate doubles every interval: still in startup, the window three BDPs (far
        // above what quinn's BBR, stuck in its first ProbeRtt, would allow).
        let mut at = now + rtt;
        for rate in [2e6, 4e6, 8e6, 16e6, 32e6] {
            // One round trip of ACKs at this rate, 1000 bytes each.
            let step = Duration::from_secs_f64(1_000.0 / rate);
            let round_end = at + rtt;
            while at < round_end {
                at += step;
                controller.delivery.on_ack(at, at - rtt, 1_000, false, rtt);
            }
            assert!(controller.in_startup(), "rate {rate}");
        }
        let window = controller.window();
        assert_eq!(window, controller.delivery.bdp(STARTUP_GAIN));
        // (The newest round's interval is still open: measured a round behind.)
        assert!(window >= 3 * 800_000, "three BDPs of at least 16 MB/s x 50 ms: {window}");
        assert!(window > controller.inner.window(), "{window}");
        // Three intervals without a quarter more: the pipe is full, BBR's window (bounded)
        // from now on.
        fill_the_pipe(&mut controller, at, 32e6, rtt);
        assert_eq!(controller.window(), controller.inner.window().min(controller.bound()));
    }

    #[test]
    fn a_loss_ends_startup_unless_it_was_sent_before_the_first_ack() {
        let now = Instant::now();
        let mut controller = controller(now);
        // The Initial packets of an attempt nobody answered, declared lost after the handshake.
        // (quinn's RttEstimator cannot be made outside quinn: the first ACK as `on_ack` notes it.)
        controller.first_ack = Some(now + Duration::from_millis(100));
        controller.on_congestion_event(now + Duration::from_millis(120), now, false, 6000);
        assert!(controller.in_startup(), "handshake-era losses say nothing about the path");
        // A data packet lost: BBR's loss handling takes over.
        controller.on_congestion_event(now + Duration::from_millis(300), now + Duration::from_millis(200), false, 1200);
        assert!(!controller.in_startup());
    }

    #[test]
    fn after_startup_the_bound_lowers_bbr_never_raises_it() {
        let now = Instant::now();
        let mut controller = controller(now);
        // 1 MB/s at 10 ms: two BDPs are 20 KB, below BBR's initial window: held at the floor.
        let at = fill_the_pipe(&mut controller, now, 1e6, Duration::from_millis(10));
        assert_eq!(controller.window(), controller.floor.min(controller.inner.window()));
        // A fast path: the bound is far above BBR's window, which stands.
        deliver(&mut controller.delivery, at, 10e9, Duration::from_millis(100), 10_000_000, 1.0, false);
        assert_eq!(controller.window(), controller.inner.window());
    }
}
