//! Failpoints for crash tests, configured by the environment variable
//! `UBLK_MIRROR_FAILPOINTS`: a comma-separated list of
//! - `name`: fires every time the point is reached;
//! - `name=N`: fires once, the N-th time;
//! - `name=/some/path`: fires once, the first time the point is reached after the file exists
//!   (lets a test choose the moment from outside the process);
//! - `name=while:/some/path`: fires at every hit while the file exists (a disk that fails
//!   until it is "repaired" by removing the file).
//!
//! Disk errors are injected with [`disk_error`]: the points `OP-eio` and `OP-enospc` make
//! the I/O `OP` (e.g. `journal-write`, `backing-write`, `replica-image`) fail as a failing
//! or full disk would, without touching the data.
//!
//! Unset in production, where a check costs one load of an initialised `OnceLock`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

enum Trigger {
    Always,
    Nth(u64),
    WhenFileExists(PathBuf),
    WhileFileExists(PathBuf),
}

struct Point {
    trigger: Trigger,
    hits: AtomicU64,
    fired: AtomicBool,
}

fn points() -> &'static Option<HashMap<String, Point>> {
    static POINTS: OnceLock<Option<HashMap<String, Point>>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("UBLK_MIRROR_FAILPOINTS").ok()?;
        let mut map = HashMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, trigger) = match item.split_once('=') {
                Some((name, spec)) if spec.starts_with("while:/") => (name, Trigger::WhileFileExists(PathBuf::from(&spec["while:".len()..]))),
                Some((name, path)) if path.starts_with('/') => (name, Trigger::WhenFileExists(PathBuf::from(path))),
                Some((name, n)) => (name, n.parse().map(Trigger::Nth).unwrap_or(Trigger::Always)),
                None => (item, Trigger::Always),
            };
            map.insert(name.to_string(), Point { trigger, hits: AtomicU64::new(0), fired: AtomicBool::new(false) });
        }
        Some(map)
    })
}

/// True when the failpoint `name` fires at this hit.
pub fn hit(name: &str) -> bool {
    let Some(points) = points() else { return false };
    let Some(point) = points.get(name) else { return false };
    let count = point.hits.fetch_add(1, Ordering::Relaxed) + 1;
    let fires = match &point.trigger {
        Trigger::Always => true,
        Trigger::Nth(n) => count == *n,
        Trigger::WhenFileExists(path) | Trigger::WhileFileExists(path) => path.exists(),
    };
    match point.trigger {
        Trigger::Always | Trigger::WhileFileExists(_) => fires,
        _ => fires && !point.fired.swap(true, Ordering::Relaxed),
    }
}

/// An injected disk error for the I/O `op`: EIO when `OP-eio` fires, ENOSPC when
/// `OP-enospc` does, else `None`. Costs nothing when no failpoint is configured.
pub fn disk_error(op: &str) -> Option<std::io::Error> {
    points().as_ref()?;
    if hit(&format!("{op}-eio")) {
        tracing::error!(op, "failpoint: injecting EIO");
        return Some(std::io::Error::from_raw_os_error(libc::EIO));
    }
    if hit(&format!("{op}-enospc")) {
        tracing::error!(op, "failpoint: injecting ENOSPC");
        return Some(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    None
}

/// True if the failpoint `name` is configured at all (for "disable this behaviour" points).
pub fn enabled(name: &str) -> bool {
    points().as_ref().is_some_and(|p| p.contains_key(name))
}
