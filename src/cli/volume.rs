//! `volume create`, `volume set`, `volume demote` and `volume restore`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use ublk_mirror::control;
use ublk_mirror::journal::OnFull;
use ublk_mirror::layout::VolumeDir;
use ublk_mirror::size::parse_size;
use ublk_mirror::volume::{BackingWrites, CreateOptions, Volume, VolumeConfig};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume's state directory: config, journal, state and identity (key and certificate).
    ///
    /// Prints the identity's certificate fingerprint on a line of its own (sha256:<64 hex digits>);
    /// give it to the applier that will accept this volume's mirror.
    Create(CreateArgs),
    /// Change a volume's settings; a running volume applies them at once.
    Set(SetArgs),
    /// Turn a stale old source (its replica was promoted elsewhere) into a replica held by
    /// the applier in ADIR on this host, on its backing store where it is. What it wrote
    /// after the point the new primary holds is counted and kept as a map: when the new
    /// primary mirrors to this applier, only those regions and the ones it wrote since the
    /// promote are resynced (no full copy), and this volume ends equal to the new primary.
    Demote(DemoteArgs),
    /// Rebuild a volume whose backing store died from its replica at an applier: only the
    /// chunks that differ are fetched (an empty new disk: every non-zero chunk), then the
    /// volume's own journal is redone over them, so it holds every write it acknowledged.
    Restore(RestoreArgs),
}

#[derive(Args)]
pub struct RestoreArgs {
    /// State directory of the volume (not running).
    #[arg(long)]
    dir: PathBuf,
    /// The applier holding the volume's replica (HOST:PORT, UDP).
    #[arg(long, value_name = "HOST:PORT")]
    from: String,
    /// The applier's certificate fingerprint.
    #[arg(long)]
    fingerprint: String,
    /// A new backing file or device (exactly the volume's size) instead of the configured
    /// one; `volume.toml` is changed to name it.
    #[arg(long)]
    backing: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn restore(args: RestoreArgs) -> Result<()> {
    let restored = ublk_mirror::mirror::restore(&args.dir, &args.from, &args.fingerprint, args.backing.as_deref())
        .with_context(|| format!("restore volume {} from {}", args.dir.display(), args.from))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&restored)?);
        return Ok(());
    }
    println!("restored volume {} onto {}", args.dir.display(), restored.backing.display());
    println!(
        "  fetched {} of {} chunks ({}) from the replica at LSN {}; redid {} journal records after it",
        restored.chunks_fetched,
        restored.chunks,
        ublk_mirror::size::human_size(restored.bytes_fetched),
        restored.replica_lsn,
        restored.redone_records
    );
    Ok(())
}

#[derive(Args)]
pub struct DemoteArgs {
    /// State directory of the volume (not running).
    #[arg(long)]
    dir: PathBuf,
    /// The applier directory (made by `applier init`) that will hold the replica.
    #[arg(long)]
    applier: PathBuf,
    /// The mirror whose replica was promoted (default: the volume's only mirror).
    #[arg(long)]
    mirror: Option<String>,
    /// Let the new primary's data replace what this volume wrote after the branch even when
    /// that may be a split brain's (written after the promote, or not known).
    #[arg(long)]
    discard_local_changes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn demote(args: DemoteArgs) -> Result<()> {
    let options = ublk_mirror::applier::DemoteOptions { mirror: args.mirror, discard_local_changes: args.discard_local_changes };
    let report = ublk_mirror::applier::demote(&args.dir, &args.applier, &options).with_context(|| format!("demote volume {}", args.dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("demoted volume {}: it is now the replica in {}", report.volume, report.replica_dir.display());
    println!("  image      {} (the backing store, used where it is)", report.image.display());
    if report.local_records > 0 {
        println!(
            "  undone     {} records ({}) written after LSN {}, {} of them after the promote: the new primary's data replaces their regions ({}) at the first resync",
            report.local_records,
            ublk_mirror::size::human_size(report.local_bytes),
            report.common_lsn,
            report.after_promote,
            ublk_mirror::size::human_size(report.local_region_bytes)
        );
    } else {
        println!("  undone     nothing: it wrote nothing after LSN {}", report.common_lsn);
    }
    println!("next: allow the new primary's fingerprint (ublk-mirror applier allow --dir {} FP), run this applier,", args.applier.display());
    println!("      and on the new primary's host: ublk-mirror mirror add --dir VDIR --to THIS_HOST:PORT --fingerprint <this applier's>");
    Ok(())
}

/// What a volume does when its journal would fill because mirrors hold it.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OnFullArg {
    /// The mirrors holding the journal switch to dirty-region tracking and resync later;
    /// writes never wait for a mirror (the default).
    Track,
    /// Writes wait until the mirrors have received enough for the journal to be trimmed.
    Block,
}

impl From<OnFullArg> for OnFull {
    fn from(value: OnFullArg) -> OnFull {
        match value {
            OnFullArg::Track => OnFull::Track,
            OnFullArg::Block => OnFull::Block,
        }
    }
}

/// How writeback writes the backing store.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BackingWritesArg {
    /// Through the page cache, written out by the kernel and made durable at checkpoints
    /// (the default: the page cache absorbs overwrites and sorts random writes).
    Buffered,
    /// O_DIRECT in batches through io_uring, like QEMU's cache=none: no dirty pages in
    /// memory, every write a disk write.
    Direct,
}

impl From<BackingWritesArg> for BackingWrites {
    fn from(value: BackingWritesArg) -> BackingWrites {
        match value {
            BackingWritesArg::Buffered => BackingWrites::Buffered,
            BackingWritesArg::Direct => BackingWrites::Direct,
        }
    }
}

#[derive(Args)]
pub struct SetArgs {
    /// State directory of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// What happens when mirrors would fill the journal (track or block).
    #[arg(long, value_enum)]
    on_full: Option<OnFullArg>,
    /// How writeback writes the backing store (buffered or direct); a running volume
    /// takes it at its next start.
    #[arg(long, value_enum)]
    backing_writes: Option<BackingWritesArg>,
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
    /// When mirrors would fill the journal: track (they switch to dirty-region tracking and
    /// resync later; writes never wait; the default) or block (writes wait for them).
    #[arg(long, value_enum)]
    on_full: Option<OnFullArg>,
    /// How writeback writes the backing store: buffered (through the page cache; the
    /// default) or direct (O_DIRECT in batches, like QEMU's cache=none). Reads of the backing
    /// store bypass the page cache either way.
    #[arg(long, value_enum)]
    backing_writes: Option<BackingWritesArg>,
    /// Keep the journal's segments in this directory, e.g. on a dedicated SSD or a mirrored
    /// md device, instead of DIR/journal (which becomes a symlink to it). An absolute path
    /// that does not exist (its parent does; it is made, mode 0700) or is an empty directory,
    /// given to this volume only: an owner file there names the volume, and every command
    /// that opens the journal refuses a directory that is missing (not mounted), not
    /// writable, or another volume's.
    #[arg(long, value_name = "PATH")]
    journal_dir: Option<PathBuf>,
    /// Write every journal segment now (zero-filled, --journal-size in all) instead of as
    /// the journal first grows: reserves the space and spares a new volume's first writes
    /// the zero-filling. Takes as long as writing the journal once.
    #[arg(long)]
    preallocate_journal: bool,
}

pub fn execute(command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create(args) => create(args),
        VolumeCommand::Set(args) => set(args),
        VolumeCommand::Demote(args) => demote(args),
        VolumeCommand::Restore(args) => restore(args),
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
        on_full: args.on_full.map(Into::into),
        backing_writes: args.backing_writes.map(Into::into),
        journal_dir: args.journal_dir,
        preallocate_journal: args.preallocate_journal,
        origin: None,
    };
    let created = Volume::create(&args.dir, &options).with_context(|| format!("create volume in {}", args.dir.display()))?;
    let config = &created.config;
    println!("created volume {} ({})", config.name, config.uuid);
    println!("  size     {} bytes", config.size);
    println!("  backing  {} (writes: {})", config.backing.display(), config.backing_writes.as_str());
    println!("  journal  {} bytes in segments of {} bytes, on full: {}", config.journal.capacity, config.journal.segment_size, config.journal.on_full.as_str());
    if options.preallocate_journal {
        println!("  journal  preallocated: {} segment files written", config.journal.capacity / config.journal.segment_size);
    }
    if let Some(dir) = &options.journal_dir {
        println!("  journal  in {} (DIR/journal links to it)", dir.display());
    }
    println!("certificate fingerprint:");
    println!("{}", created.fingerprint);
    Ok(())
}

fn set(args: SetArgs) -> Result<()> {
    if args.on_full.is_none() && args.backing_writes.is_none() {
        bail!("nothing to change: give --on-full track|block or --backing-writes buffered|direct");
    }
    let layout = VolumeDir::new(&args.dir);
    let mut config = VolumeConfig::load(&layout).with_context(|| format!("open volume {}", args.dir.display()))?;
    let running = ublk_mirror::volume::is_locked(&args.dir);
    let writes = args.backing_writes.map(BackingWrites::from);
    let on_full = args.on_full.map(OnFull::from);
    config.backing_writes = writes.unwrap_or(config.backing_writes);
    config.journal.on_full = on_full.unwrap_or(config.journal.on_full);
    config.save(&layout)?;
    if let Some(writes) = writes {
        println!("volume {}: backing writes: {}{}", config.name, writes.as_str(), if running { " (from the volume's next start)" } else { "" });
    }
    let Some(on_full) = on_full else { return Ok(()) };
    println!("volume {}: on full: {}", config.name, on_full.as_str());
    if running {
        let reply = control::request(&layout.control_socket(), &format!("set-on-full {}", on_full.as_str())).context("tell the running volume")?;
        if let Some(error) = reply["error"].as_str() {
            bail!("the running volume could not apply the change: {error}");
        }
        println!("applied to the running volume");
    }
    Ok(())
}
