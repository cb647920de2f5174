//! `mirror add`, `mirror remove`, `mirror set` (applied at once to a running volume where it
//! can be), `mirror wait`, `mirror switchover` (`switchover.rs`) and `mirror verify`
//! (`verify.rs`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use ublk_mirror::layout::VolumeDir;
use ublk_mirror::mirror::coalesce::Coalesce;
use ublk_mirror::mirror::{self, MirrorConfig};
use ublk_mirror::protocol::compression::Compression;
use ublk_mirror::protocol::transport::Congestion;
use ublk_mirror::size::parse_size;
use ublk_mirror::status::MirrorStatus;

use super::status::running_volume;

#[derive(Subcommand)]
pub enum MirrorCommand {
    /// Mirror the volume to an applier, pinned by its certificate fingerprint. A running
    /// volume starts the mirror at once (initial synchronisation while it serves).
    Add(MirrorAddArgs),
    /// Stop mirroring to the named applier: a running volume stops its sender at once and
    /// releases its journal retention and dirty map. The replica on the applier stays.
    Remove(MirrorRemoveArgs),
    /// Change a mirror's bandwidth limit, idle timeout, verify schedule or compression. A
    /// running volume applies a new rate and compression at once; the idle timeout at the
    /// next connection.
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
    /// Compare replicas with the running volume chunk by chunk, each chunk at the same LSN on
    /// both sides (writes go on; no false differences). Reports the differing regions and
    /// exits 1 when any differ; `--repair` resends them through a resync.
    Verify(super::verify::MirrorVerifyArgs),
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
    /// Interval of the online verifies the running volume starts by itself, e.g. 7d, or
    /// "none" to stop them.
    #[arg(long, value_name = "INTERVAL|none")]
    verify_every: Option<String>,
    /// Compression of record batches on the wire: off, zstd:LEVEL (always; LEVEL 1..=22, or
    /// negative for zstd's fast modes) or auto (only while the link is the bottleneck).
    #[arg(long, value_name = "off|zstd:LEVEL|auto", value_parser = parse_compression)]
    compression: Option<Compression>,
    /// Coalescing of a backlog: off, on (always) or auto (while 64 MiB or more behind). A
    /// running volume's sender takes it at its next connection.
    #[arg(long, value_name = "off|on|auto")]
    coalesce: Option<Coalesce>,
}

/// clap's parser of `--compression`: the message says what is accepted.
fn parse_compression(text: &str) -> Result<Compression, String> {
    text.parse().map_err(|e: ublk_mirror::protocol::compression::CompressionError| e.to_string())
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
    /// Run an online verify (no repair) this often, e.g. 7d (default: only on request).
    #[arg(long, value_name = "INTERVAL")]
    verify_every: Option<String>,
    /// Compression of record batches on the wire: off, zstd:LEVEL (always; "zstd" alone is
    /// level 1) or auto (default: only while the link is the bottleneck: a max rate is set or
    /// the sender waits on the network). A batch that shrinks by less than 5% goes raw.
    #[arg(long, value_name = "off|zstd:LEVEL|auto", value_parser = parse_compression)]
    compression: Option<Compression>,
    /// Coalescing of a backlog (docs/coalescing.md): off, on (whenever records wait) or auto
    /// (default: while the mirror is 64 MiB or more behind, e.g. after an outage): for a run
    /// of records up to a marker only the newest version of each block is sent, applied as
    /// one step on the replica.
    #[arg(long, value_name = "off|on|auto")]
    coalesce: Option<Coalesce>,
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
        MirrorCommand::Remove(args) => remove(args),
        MirrorCommand::Wait(args) => wait(args),
        MirrorCommand::Set(args) => set(args),
        MirrorCommand::Switchover(args) => super::switchover::switchover(args),
        MirrorCommand::Verify(args) => super::verify::verify(args),
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
        verify_every: args.verify_every,
        compression: args.compression,
        coalesce: args.coalesce,
    };
    let dir = VolumeDir::new(&args.dir);
    mirror::add(&dir, &config).with_context(|| format!("add mirror to {}", args.dir.display()))?;
    if !ublk_mirror::volume::is_locked(&args.dir) {
        println!("added mirror {} -> {} (starts with the next `run`)", config.name, config.address);
        return Ok(());
    }
    // A running volume starts the mirror's sender now (its initial synchronisation runs
    // while the volume serves). If it cannot be told, nothing is left half done.
    let told = running_volume(&dir, "reload-mirrors");
    match told {
        Ok(reply) if reply["started"].as_array().is_some_and(|started| started.iter().any(|n| n.as_str() == Some(&config.name))) => {
            println!("added mirror {} -> {} (started on the running volume)", config.name, config.address);
            Ok(())
        }
        outcome => {
            let _ = mirror::remove(&dir, &config.name);
            let why = match outcome {
                Ok(reply) => format!("it did not start the mirror: {reply}"),
                Err(error) => format!("{error:#}"),
            };
            bail!("the volume at {} is running but could not start the mirror, so it was not added: {why}", args.dir.display())
        }
    }
}

fn remove(args: MirrorRemoveArgs) -> Result<()> {
    let dir = VolumeDir::new(&args.dir);
    // The same error for an unknown name whether the volume runs or not.
    mirror::load(&dir, &args.name).with_context(|| format!("remove mirror from {}", args.dir.display()))?;
    if ublk_mirror::volume::is_locked(&args.dir) {
        running_volume(&dir, &format!("remove-mirror {}", args.name))?;
        println!("removed mirror {} (its sender stopped on the running volume; journal hold and dirty map released)", args.name);
    } else {
        mirror::remove(&dir, &args.name)?;
        println!("removed mirror {}", args.name);
    }
    Ok(())
}

fn set(args: MirrorSetArgs) -> Result<()> {
    let max_rate = match args.max_rate.as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(text) => Some(Some(parse_size(text).context("--max-rate")?)),
    };
    let verify_every = args.verify_every.map(|every| if every == "none" { None } else { Some(every) });
    let changes = mirror::MirrorChanges { max_rate, idle_timeout: args.idle_timeout, verify_every, compression: args.compression, coalesce: args.coalesce };
    if changes.is_empty() {
        bail!("nothing to change: give --max-rate RATE|none, --idle-timeout SECONDS, --verify-every INTERVAL|none, --compression off|zstd:LEVEL|auto and/or --coalesce off|on|auto");
    }
    let config = mirror::set(&VolumeDir::new(&args.dir), &args.name, &changes)?;
    let rate = config.max_rate.map_or("none".to_string(), |r| format!("{}/s", ublk_mirror::size::format_size(r)));
    println!(
        "mirror {}: max rate {rate}, idle timeout {} s, verify every {}, compression {}, coalesce {}",
        config.name,
        config.idle_timeout().as_secs(),
        config.verify_every.as_deref().unwrap_or("(never)"),
        config.compression(),
        config.coalesce()
    );
    if ublk_mirror::volume::is_locked(&args.dir) {
        running_volume(&VolumeDir::new(&args.dir), "reload-mirrors")?;
        println!("applied to the running volume (the idle timeout at the next connection)");
    }
    Ok(())
}
