//! `volume create`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use ublk_mirror::size::parse_size;
use ublk_mirror::volume::{CreateOptions, Volume};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume's state directory: config, journal, state and identity (key and certificate).
    ///
    /// Prints the identity's certificate fingerprint on a line of its own (sha256:<64 hex digits>);
    /// give it to the applier that will accept this volume's mirror.
    Create(CreateArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// State directory of the volume (created; must not exist or be empty).
    #[arg(long)]
    dir: PathBuf,
    /// Volume name: also the NBD export name. Letters, digits, '.', '_' and '-'.
    #[arg(long)]
    name: String,
    /// Device size, e.g. 10G (suffixes K, M, G, T: powers of 1024). A multiple of 512.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Existing file or block device to hold the data; must be exactly --size bytes.
    /// Default: a sparse DIR/data.img.
    #[arg(long)]
    backing: Option<PathBuf>,
    /// Most disk space the journal may use (default 1G). Writes wait when it is full.
    #[arg(long, value_parser = parse_size)]
    journal_size: Option<u64>,
    /// Size of each journal segment file (default: 64M, or a quarter of the journal if smaller).
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<u64>,
    /// Journaled-but-unapplied bytes kept in memory before writes wait (default 64M).
    #[arg(long, value_parser = parse_size)]
    pending_window: Option<u64>,
}

pub fn execute(command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create(args) => create(args),
    }
}

fn create(args: CreateArgs) -> Result<()> {
    let options = CreateOptions {
        name: args.name,
        size: args.size,
        backing: args.backing,
        journal_size: args.journal_size,
        segment_size: args.segment_size,
        pending_window: args.pending_window,
    };
    let created = Volume::create(&args.dir, &options).with_context(|| format!("create volume in {}", args.dir.display()))?;
    let config = &created.config;
    println!("created volume {} ({})", config.name, config.uuid);
    println!("  size     {} bytes", config.size);
    println!("  backing  {}", config.backing.display());
    println!("  journal  {} bytes in segments of {} bytes", config.journal.capacity, config.journal.segment_size);
    println!("certificate fingerprint:");
    println!("{}", created.fingerprint);
    Ok(())
}
