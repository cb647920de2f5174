//! `mirror add`, `mirror remove`, `mirror set` (applied at once to a running volume where it
//! can be), `mirror wait` and `mirror switchover` (`switchover.rs`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use ublk_mirror::control;
use ublk_mirror::layout::VolumeDir;
use ublk_mirror::mirror::{self, MirrorConfig};
use ublk_mirror::protocol::transport::Congestion;
use ublk_mirror::size::parse_size;
use ublk_mirror::status::MirrorStatus;

#[derive(Subcommand)]
pub enum MirrorCommand {
    /// Mirror the volume to an applier, pinned by its certificate fingerprint.
    Add(MirrorAddArgs),
    /// Stop mirroring to the named applier (its journal retention is released).
    Remove(MirrorRemoveArgs),
    /// Change a mirror's bandwidth limit or idle timeout. A running volume applies a new rate
    /// at once; the idle timeout at the next connection.
    Set(MirrorSetArgs),
    /// Wait until the mirrors have applied every write the running volume had journaled when
    /// the command started (e.g. before a planned failover, or in scripts). Exits 1 on timeout.
    Wait(MirrorWaitArgs),
    /// Planned swap: hold writes at this running volume, wait until the mirror has applied
    /// everything, promote its replica at that LSN (the replica's host gets a volume
    /// directory to `run`, same data, new generation) and make this volume its replica in a
    /// local applier. Nothing is resent. Unmount or stop the application first: writes sent
    /// after the hold fail (EIO). Failback later is the same command the other way.
    Switchover(super::switchover::SwitchoverArgs),
}

#[derive(Args)]
pub struct MirrorWaitArgs {
    /// State directory of the (running) volume.
    #[arg(long)]
    dir: PathBuf,
    /// Wait for this mirror only (default: all of them).
    #[arg(long)]
    name: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Args)]
pub struct MirrorSetArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "mirror")]
    name: String,
    /// Bytes per second at most, e.g. 50M (powers of 1024), or "none" for no limit.
    #[arg(long, value_name = "RATE|none")]
    max_rate: Option<String>,
    /// Seconds without a packet before the connection is re-established (1..600).
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<u64>,
}

#[derive(Args)]
pub struct MirrorAddArgs {
    /// State directory of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// The applier's address, HOST:PORT (UDP, QUIC).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// The applier's certificate fingerprint, as `applier init` printed it (sha256:...).
    #[arg(long)]
    fingerprint: String,
    /// Name of this mirror (default: "mirror").
    #[arg(long, default_value = "mirror")]
    name: String,
    /// Bandwidth limit: bytes per second at most, e.g. 50M (powers of 1024; default none).
    /// Journal records and initial-sync chunks both count.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    max_rate: Option<u64>,
    /// Seconds without a packet from the applier before the connection is declared dead
    /// and re-established (1..600, default 15).
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<u64>,
    /// Congestion control: bbr (default: keeps a lossy long path busy) or cubic (loss-based).
    #[arg(long, value_enum)]
    congestion: Option<CongestionArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CongestionArg {
    Bbr,
    Cubic,
}

impl From<CongestionArg> for Congestion {
    fn from(value: CongestionArg) -> Self {
        match value {
            CongestionArg::Bbr => Self::Bbr,
            CongestionArg::Cubic => Self::Cubic,
        }
    }
}

#[derive(Args)]
pub struct MirrorRemoveArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "mirror")]
    name: String,
}

pub fn execute(command: MirrorCommand) -> Result<()> {
    match command {
        MirrorCommand::Add(args) => add(args),
        MirrorCommand::Remove(args) => {
            mirror::remove(&VolumeDir::new(&args.dir), &args.name)?;
            println!("removed mirror {}", args.name);
            Ok(())
        }
        MirrorCommand::Wait(args) => wait(args),
        MirrorCommand::Set(args) => set(args),
        MirrorCommand::Switchover(args) => super::switchover::switchover(args),
    }
}

fn wait(args: MirrorWaitArgs) -> Result<()> {
    let query = || super::status::live_status(&args.dir);
    let target = query()?.volume.numbers.last_lsn;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    loop {
        let status = query()?;
        let mirrors: Vec<&MirrorStatus> = status.mirrors.iter().filter(|m| args.name.as_deref().is_none_or(|name| m.name == name)).collect();
        if mirrors.is_empty() {
            bail!("volume {} has no mirror{}", args.dir.display(), args.name.as_deref().map(|n| format!(" named {n}")).unwrap_or_default());
        }
        let behind: Vec<String> =
            mirrors.iter().filter(|m| !m.has_applied(target)).map(|m| format!("{} at {} ({})", m.name, m.applied_lsn, m.state())).collect();
        if behind.is_empty() {
            println!("mirrors applied through LSN {target}");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("timed out after {} s waiting for LSN {target}: {}", args.timeout, behind.join(", "));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn add(args: MirrorAddArgs) -> Result<()> {
    let config = MirrorConfig {
        name: args.name.clone(),
        address: args.to,
        fingerprint: args.fingerprint,
        max_rate: args.max_rate,
        idle_timeout: args.idle_timeout,
        congestion: args.congestion.map(Into::into),
    };
    mirror::add(&VolumeDir::new(&args.dir), &config).with_context(|| format!("add mirror to {}", args.dir.display()))?;
    println!("added mirror {} -> {} (starts with the next `run`)", config.name, config.address);
    Ok(())
}

fn set(args: MirrorSetArgs) -> Result<()> {
    let max_rate = match args.max_rate.as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(text) => Some(Some(parse_size(text).context("--max-rate")?)),
    };
    if max_rate.is_none() && args.idle_timeout.is_none() {
        bail!("nothing to change: give --max-rate RATE|none and/or --idle-timeout SECONDS");
    }
    let config = mirror::set(&VolumeDir::new(&args.dir), &args.name, max_rate, args.idle_timeout)?;
    let rate = config.max_rate.map_or("none".to_string(), |r| format!("{}/s", ublk_mirror::size::format_size(r)));
    println!("mirror {}: max rate {rate}, idle timeout {} s", config.name, config.idle_timeout().as_secs());
    if ublk_mirror::volume::is_locked(&args.dir) {
        let reply = control::request(&VolumeDir::new(&args.dir).control_socket(), "reload-mirrors").context("tell the running volume")?;
        if let Some(error) = reply["error"].as_str() {
            bail!("the running volume could not apply the change: {error}");
        }
        println!("applied to the running volume (the idle timeout at the next connection)");
    }
    Ok(())
}
