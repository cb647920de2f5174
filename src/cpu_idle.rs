//! How much CPU the host has to spare: the idle time of the CPUs this process may run on
//! (its affinity), from /proc/stat, between two samples. `auto` compression asks it, so a
//! mirror only spends CPU on compression that nothing else on the source wants.

use std::time::Instant;

/// Idle time of a set of CPUs, sampled.
#[derive(Debug)]
pub struct IdleMeter {
    cpus: Vec<usize>,
    last: Option<(Instant, u64)>,
}

/// The shortest interval a sample measures: /proc/stat counts in ticks of 10 ms.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// USER_HZ, the unit of /proc/stat's times (100 on every Linux architecture we build for).
const TICKS_PER_SECOND: f64 = 100.0;

impl IdleMeter {
    /// A meter for the CPUs the calling thread may run on (every CPU when that cannot be read).
    pub fn for_this_process() -> IdleMeter {
        let cpus = rustix::process::sched_getaffinity(None)
            .map(|set| (0..rustix::process::CpuSet::MAX_CPU).filter(|&cpu| set.is_set(cpu)).collect())
            .unwrap_or_default();
        IdleMeter { cpus, last: None }
    }

    /// CPUs' worth of idle time since the previous sample (1.0: one CPU idle all along, summed
    /// over the set); `None` at the first sample, when /proc/stat cannot be read, or when
    /// less than [`MIN_INTERVAL`] passed (the previous sample then stays the start).
    pub fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        if self.last.is_some_and(|(then, _)| now.duration_since(then) < MIN_INTERVAL) {
            return None;
        }
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let idle = idle_ticks(&text, &self.cpus)?;
        let previous = self.last.replace((now, idle));
        let (then, idle_then) = previous?;
        let seconds = now.duration_since(then).as_secs_f64();
        Some(idle.saturating_sub(idle_then) as f64 / TICKS_PER_SECOND / seconds)
    }
}

/// Idle plus iowait ticks of `cpus` (all CPUs when empty) in /proc/stat's text.
fn idle_ticks(stat: &str, cpus: &[usize]) -> Option<u64> {
    let mut total = None;
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(cpu) = fields.next().and_then(|name| name.strip_prefix("cpu")).and_then(|n| n.parse::<usize>().ok()) else { continue };
        if !cpus.is_empty() && !cpus.contains(&cpu) {
            continue;
        }
        // user nice system idle iowait ...
        let times: Vec<u64> = fields.take(5).map(|f| f.parse().unwrap_or(0)).collect();
        if times.len() == 5 {
            *total.get_or_insert(0) += times[3] + times[4];
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_ticks_of_a_set_of_cpus() {
        let stat = "cpu  10 0 10 500 20 0 0 0 0 0\ncpu0 5 0 5 200 10 0 0 0 0 0\ncpu1 5 0 5 300 10 0 0 0 0 0\nintr 1 2\n";
        assert_eq!(idle_ticks(stat, &[0]), Some(210));
        assert_eq!(idle_ticks(stat, &[1]), Some(310));
        assert_eq!(idle_ticks(stat, &[]), Some(520));
        assert_eq!(idle_ticks(stat, &[7]), None);
        assert_eq!(idle_ticks("garbage\ncpu0 x\n", &[]), None);
    }

    #[test]
    fn a_busy_thread_leaves_less_idle_than_its_cpus() {
        let mut meter = IdleMeter::for_this_process();
        assert!(!meter.cpus.is_empty());
        assert_eq!(meter.sample(), None, "the first sample has nothing to compare with");
        assert_eq!(meter.sample(), None, "too soon to measure");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let idle = meter.sample().expect("a second sample");
        assert!((0.0..=meter.cpus.len() as f64 + 0.1).contains(&idle), "{idle} of {} CPUs", meter.cpus.len());
    }
}
