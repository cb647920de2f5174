//! Wall-clock time as the journal records it (append timestamps, for lag in seconds).

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Wall-clock time as HH:MM:SS UTC.
pub fn utc_time_of_day() -> String {
    let seconds = now_micros() / 1_000_000;
    format!("{:02}:{:02}:{:02} UTC", seconds / 3600 % 24, seconds / 60 % 60, seconds % 60)
}
