//! Failpoints for crash tests, configured by the environment variable
//! `UBLK_MIRROR_FAILPOINTS`: a comma-separated list of `name` (fires every time) or
//! `name=N` (fires once, on the N-th time the point is reached). Unset in production, where a
//! check costs one load of an initialised `OnceLock`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Point {
    fire_at: Option<u64>,
    hits: AtomicU64,
}

fn points() -> &'static Option<HashMap<String, Point>> {
    static POINTS: OnceLock<Option<HashMap<String, Point>>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("UBLK_MIRROR_FAILPOINTS").ok()?;
        let mut map = HashMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, fire_at) = match item.split_once('=') {
                Some((name, n)) => (name, n.parse().ok()),
                None => (item, None),
            };
            map.insert(name.to_string(), Point { fire_at, hits: AtomicU64::new(0) });
        }
        Some(map)
    })
}

/// True when the failpoint `name` fires at this hit.
pub fn hit(name: &str) -> bool {
    let Some(points) = points() else { return false };
    let Some(point) = points.get(name) else { return false };
    let count = point.hits.fetch_add(1, Ordering::Relaxed) + 1;
    match point.fire_at {
        None => true,
        Some(n) => count == n,
    }
}

/// True if the failpoint `name` is configured at all (for "disable this behaviour" points).
pub fn enabled(name: &str) -> bool {
    points().as_ref().is_some_and(|p| p.contains_key(name))
}
