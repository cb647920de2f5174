//! `status`: a volume's mode, LSNs, journal use and mirrors, live from a running `run`
//! (its control socket) or from the files of a stopped volume; `--json`, `--watch`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use ublk_mirror::layout::VolumeDir;
use ublk_mirror::status::{self, Status};
use ublk_mirror::{control, mirror};

#[derive(Args)]
pub struct StatusArgs {
    /// State directory of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// Print JSON (field names are stable) instead of text.
    #[arg(long)]
    json: bool,
    /// Redraw the table every --interval seconds until interrupted (or --count times).
    #[arg(long, conflicts_with = "json")]
    watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2.0, requires = "watch")]
    interval: f64,
    /// Stop after this many refreshes with --watch.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
}

pub fn execute(args: StatusArgs) -> Result<()> {
    let read = || read_status(&args.dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&read()?)?);
        return Ok(());
    }
    if !args.watch {
        print!("{}", status::render_text(&read()?));
        return Ok(());
    }
    if !(args.interval.is_finite() && args.interval >= 0.1) {
        bail!("--interval {} must be at least 0.1 seconds", args.interval);
    }
    let clear = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut shown = 0u64;
    loop {
        // A volume that stops meanwhile is shown from its files; only unreadable state ends the watch.
        let text = read()?;
        if clear {
            print!("\x1b[H\x1b[2J");
        }
        println!("{}  (every {}s)", ublk_mirror::clock::utc_time_of_day(), args.interval);
        print!("{}", status::render_text(&text));
        use std::io::Write;
        std::io::stdout().flush()?;
        shown += 1;
        if args.count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(args.interval));
    }
}

/// The volume's status: from the server if one runs, else from its files (changing nothing).
pub fn read_status(dir: &Path) -> Result<Status> {
    let layout = VolumeDir::new(dir);
    let socket = layout.control_socket();
    if ublk_mirror::volume::is_locked(dir) {
        let value = control::request(&socket, "status")
            .with_context(|| format!("volume {} is in use but its control socket {} does not answer", dir.display(), socket.display()))?;
        serde_json::from_value::<Status>(value).context("parse status from the running volume")
    } else {
        status::offline(&layout, |journal, size| mirror::offline_statuses(&layout, journal, size)).with_context(|| format!("read volume {}", dir.display()))
    }
}

/// The status of a running volume (for commands that need a server).
pub fn live_status(dir: &Path) -> Result<Status> {
    let socket = VolumeDir::new(dir).control_socket();
    let value = control::request(&socket, "status").with_context(|| format!("volume {} is not running (no answer on {})", dir.display(), socket.display()))?;
    serde_json::from_value(value).context("parse status")
}

/// Sends `request` to the running volume's control socket; an error reply is an error.
pub fn running_volume(dir: &VolumeDir, request: &str) -> Result<serde_json::Value> {
    let reply = control::request(&dir.control_socket(), request).with_context(|| format!("tell the running volume at {}", dir.root().display()))?;
    if let Some(error) = reply["error"].as_str() {
        bail!("the running volume refused: {error}");
    }
    Ok(reply)
}
