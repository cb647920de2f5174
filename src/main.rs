//! The `ublk-mirror` command line. Exit status: 0 success, 1 failure (the message on stderr
//! says why), 2 invalid command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use ublk_mirror::journal::{Journal, JournalReader};
use ublk_mirror::nbd::{NbdAddress, NbdServer};
use ublk_mirror::size::parse_size;
use ublk_mirror::volume::config::{CONTROL_SOCKET, JOURNAL_DIR};
use ublk_mirror::volume::{CreateOptions, Volume};
use ublk_mirror::ublk::{self, UblkOptions, UblkServer};
use ublk_mirror::{control, daemon, status};

// Payload buffers are allocated on connection threads and freed on the applier thread; glibc's
// per-thread arenas answer that pattern with constant heap growing and trimming (mprotect).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ublk-mirror",
    version,
    about = "Asynchronous block-level mirroring: a journaled virtual disk, replicated in order",
    long_about = "ublk-mirror serves a virtual disk (a \"volume\") whose every write is first appended to a \
journal and acknowledged at local-disk speed, then applied to the backing store in order.\n\n\
Typical use:\n  ublk-mirror volume create --dir /var/lib/ublk-mirror/vol0 --name vol0 --size 10G\n  \
ublk-mirror run --dir /var/lib/ublk-mirror/vol0 --nbd unix:/run/vol0.sock\n  \
qemu-io -f raw nbd+unix:///vol0?socket=/run/vol0.sock\n  ublk-mirror status --dir /var/lib/ublk-mirror/vol0\n\n\
Exit status: 0 success, 1 failure (stderr says why), 2 invalid command line.\n\
Logging: RUST_LOG=debug (or info, warn) sets the detail written to stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and inspect volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Serve a volume until SIGTERM or SIGINT (then drain, flush and exit 0).
    Run(RunArgs),
    /// Show a volume's mode, LSNs and journal use (live if it is running).
    Status(StatusArgs),
    /// Read a volume's journal.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Configure where a volume is mirrored (takes effect at the next `run`).
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// The receiving side: a daemon that keeps replicas of volumes from allowed sources.
    #[command(subcommand)]
    Applier(ApplierCommand),
    /// Install the binary, systemd units (ublk-mirror@.service, ublk-mirror-applier.service),
    /// udev rules, the ublk module-load snippet and /etc/default/ublk-mirror (kept if present).
    InstallUnits(InstallArgs),
    /// Remove what install-units installed (state directories and an edited
    /// /etc/default/ublk-mirror are kept). Stop the services first.
    UninstallUnits(InstallArgs),
}

#[derive(Args)]
struct InstallArgs {
    /// Install under this directory instead of / (a staged install, like DESTDIR).
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

#[derive(Subcommand)]
enum MirrorCommand {
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
}

#[derive(Args)]
struct MirrorWaitArgs {
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
struct MirrorSetArgs {
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
struct MirrorAddArgs {
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

impl From<CongestionArg> for ublk_mirror::replication::tls::Congestion {
    fn from(value: CongestionArg) -> Self {
        match value {
            CongestionArg::Bbr => Self::Bbr,
            CongestionArg::Cubic => Self::Cubic,
        }
    }
}

#[derive(Args)]
struct MirrorRemoveArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "mirror")]
    name: String,
}

#[derive(Subcommand)]
enum ApplierCommand {
    /// Create an applier directory and its identity; prints its certificate fingerprint.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Accept a source volume, identified by the fingerprint `volume create` printed.
    Allow {
        #[arg(long)]
        dir: PathBuf,
        fingerprint: String,
    },
    /// Replicas managed by hand.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Serve replicas until SIGTERM or SIGINT. Settings come from DIR/applier.toml; flags
    /// override them.
    Run {
        #[arg(long)]
        dir: PathBuf,
        /// UDP address to listen on, e.g. 0.0.0.0:7420 (default: `listen` in DIR/applier.toml).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Also accept this source fingerprint (repeatable), besides ADIR/allowed.
        #[arg(long)]
        allow: Vec<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (default: `metrics` in applier.toml).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Show the replicas: LSNs received and applied, consistency, connection.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Use an existing file or block device as the replica of volume NAME (instead of a new
    /// sparse image made on the first connection). It must be exactly the volume's size; on
    /// the first connection an initial synchronisation compares it chunk by chunk, so a copy
    /// of the source (a seeded replica) costs hashes, not data.
    Add {
        #[arg(long)]
        dir: PathBuf,
        /// The source volume's name.
        #[arg(long)]
        volume: String,
        /// The image file or block device.
        #[arg(long)]
        image: PathBuf,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume's state directory: config, journal, state and identity (key and certificate).
    ///
    /// Prints the identity's certificate fingerprint on a line of its own (sha256:<64 hex digits>);
    /// give it to the applier that will accept this volume's mirror.
    Create(CreateArgs),
}

#[derive(Args)]
struct CreateArgs {
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

#[derive(Args)]
struct RunArgs {
    /// State directory of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// Serve the volume over NBD at unix:PATH or tcp:HOST:PORT (repeatable). The export name is
    /// the volume name.
    #[arg(long = "nbd", value_name = "ADDRESS")]
    nbd: Vec<String>,
    /// Serve the volume as a Linux block device /dev/ublkbN through the ublk driver (root;
    /// needs ublk_drv: Linux >= 6.0 with CONFIG_BLK_DEV_UBLK). The device is removed on
    /// SIGTERM/SIGINT after the queued requests complete and the journal is flushed.
    #[arg(long)]
    ublk: bool,
    /// Device id N for /dev/ublkbN (default: the lowest free one).
    #[arg(long, requires = "ublk")]
    ublk_id: Option<u32>,
    /// Hardware queues of the ublk device, each served by its own thread and io_uring
    /// (default 1, or run.queues).
    #[arg(long, requires = "ublk")]
    queues: Option<u16>,
    /// Requests in flight per queue (default 128, or run.depth).
    #[arg(long, requires = "ublk")]
    depth: Option<u16>,
    /// Re-attach to the ublk device left behind by a server that was killed (user recovery):
    /// I/O the kernel held meanwhile is re-issued, a mounted filesystem sees no error. The
    /// device id comes from DIR/ublk-device.json unless --ublk-id is given.
    #[arg(long, requires = "ublk")]
    recover: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9420 (default:
    /// run.metrics in DIR/volume.toml).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct StatusArgs {
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

#[derive(Subcommand)]
enum JournalCommand {
    /// Print the journal's records (read-only; safe while the volume runs).
    Dump(DumpArgs),
}

#[derive(Args)]
struct DumpArgs {
    /// State directory of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// First LSN to print (default: the oldest retained).
    #[arg(long)]
    from: Option<u64>,
    /// Print at most this many records.
    #[arg(long)]
    limit: Option<u64>,
    /// One JSON object per line: lsn, kind, offset, length, flags, timestamp_us, payload_crc32c.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Volume(VolumeCommand::Create(args)) => create(args),
        Command::Run(args) => run(args),
        Command::Status(args) => show_status(args),
        Command::Journal(JournalCommand::Dump(args)) => dump(args),
        Command::Mirror(MirrorCommand::Add(args)) => mirror_add(args),
        Command::Mirror(MirrorCommand::Remove(args)) => {
            ublk_mirror::replication::mirror::remove(&args.dir, &args.name).map_err(anyhow::Error::from).map(|()| println!("removed mirror {}", args.name))
        }
        Command::Mirror(MirrorCommand::Wait(args)) => mirror_wait(args),
        Command::Mirror(MirrorCommand::Set(args)) => mirror_set(args),
        Command::Applier(command) => applier(command),
        Command::InstallUnits(args) => install_units(args),
        Command::UninstallUnits(args) => uninstall_units(args),
    };
    if let Err(error) = result {
        eprintln!("ublk-mirror: error: {}", describe(&error));
        std::process::exit(1);
    }
}

/// The error and its causes, like `{:#}`, but without repeating a cause that a message
/// already quotes (errors that say "context: cause" and also report the cause as source).
fn describe(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn mirror_wait(args: MirrorWaitArgs) -> Result<()> {
    let socket = args.dir.join(CONTROL_SOCKET);
    let query = || -> Result<status::Status> {
        let value = control::request(&socket, "status").with_context(|| format!("volume {} is not running (no answer on {})", args.dir.display(), socket.display()))?;
        serde_json::from_value(value).context("parse status")
    };
    let target = query()?.volume.numbers.last_lsn;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    loop {
        let status = query()?;
        let mirrors: Vec<&serde_json::Value> = status.mirrors.iter().filter(|m| args.name.as_deref().is_none_or(|name| m["name"] == name)).collect();
        if mirrors.is_empty() {
            bail!("volume {} has no mirror{}", args.dir.display(), args.name.as_deref().map(|n| format!(" named {n}")).unwrap_or_default());
        }
        let behind: Vec<String> = mirrors
            .iter()
            .filter(|m| m["applied_lsn"].as_u64().unwrap_or(0) < target || m["consistent"] != true)
            .map(|m| format!("{} at {} ({})", m["name"].as_str().unwrap_or("?"), m["applied_lsn"], m["state"].as_str().unwrap_or("?")))
            .collect();
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

fn run(args: RunArgs) -> Result<()> {
    // The volume's file first: a bad [run] table must be reported before anything starts.
    let config = ublk_mirror::volume::VolumeConfig::load(&args.dir).with_context(|| format!("open volume {}", args.dir.display()))?;
    let settings = config.run.clone();
    // So are the mirrors' files.
    ublk_mirror::replication::mirror::list(&args.dir)?;
    let config_file = args.dir.join(ublk_mirror::volume::config::CONFIG_FILE);
    // Exports: the command line's --nbd/--ublk, if any, replace the configured ones.
    let (nbd, use_ublk) = if args.nbd.is_empty() && !args.ublk { (settings.nbd.clone(), settings.ublk) } else { (args.nbd.clone(), args.ublk) };
    if nbd.is_empty() && !use_ublk {
        bail!(
            "nothing to serve: give --ublk and/or at least one --nbd unix:PATH or --nbd tcp:HOST:PORT, or set run.ublk / run.nbd in {}",
            config_file.display()
        );
    }
    let addresses = nbd.iter().map(|a| a.parse::<NbdAddress>()).collect::<Result<Vec<_>, _>>()?;
    let from_file = !args.ublk;
    let ublk_options = UblkOptions {
        id: args.ublk_id.or(if from_file { settings.ublk_id } else { None }),
        queues: args.queues.or(if from_file { settings.queues } else { None }).unwrap_or(1),
        depth: args.depth.or(if from_file { settings.depth } else { None }).unwrap_or(128),
        recover: args.recover,
    };
    let metrics_address = match args.metrics {
        Some(address) => Some(address),
        None => settings.metrics.as_deref().map(|text| ublk_mirror::volume::config::parse_listen_address(text).map_err(anyhow::Error::msg)).transpose()?,
    };
    if use_ublk {
        // Before opening the volume: a missing driver must change nothing.
        ublk::preflight(&ublk_options)?;
    }
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]).context("install signal handlers")?;
    let volume = Arc::new(Volume::open(&args.dir).with_context(|| format!("open volume {}", args.dir.display()))?);
    let name = volume.config().name.clone();
    let server = NbdServer::start(&addresses, volume.clone(), &name)?;
    let mut exports: Vec<String> = server.bound_addresses().iter().map(|a| a.to_string()).collect();
    let ublk_server = if use_ublk {
        let started = UblkServer::start(volume.clone(), &args.dir, &ublk_options).context("start ublk device")?;
        // The device path alone on a line, for scripts.
        println!("{}", started.record().device);
        exports.push(format!("ublk:{}", started.record().device));
        Some(started)
    } else {
        None
    };
    let device = ublk_server.as_ref().map(|s| s.record().device.clone());
    let senders = Arc::new(ublk_mirror::replication::sender::Senders::start(&args.dir, volume.clone()).context("start mirrors")?);
    let live_status: Arc<dyn Fn() -> status::Status + Send + Sync> = {
        let (volume, exports, device, senders) = (volume.clone(), exports.clone(), device.clone(), senders.clone());
        Arc::new(move || {
            let mut status = status::live(&volume, &exports);
            status.volume.device = device.clone();
            status.mirrors = senders.statuses().into_iter().filter_map(|m| serde_json::to_value(m).ok()).collect();
            status
        })
    };
    let control = {
        let (live_status, senders) = (live_status.clone(), senders.clone());
        control::ControlServer::start(
            &args.dir.join(CONTROL_SOCKET),
            Arc::new(move |command: &str| match command {
                "status" => serde_json::to_value(live_status()).unwrap_or_default(),
                "reload-mirrors" => match senders.reload() {
                    Ok(()) => serde_json::json!({ "reloaded": true }),
                    Err(error) => serde_json::json!({ "error": format!("{error:#}") }),
                },
                other => serde_json::json!({ "error": format!("unknown request {other:?}") }),
            }),
        )
        .context("start control socket")?
    };
    let metrics = match metrics_address {
        Some(address) => {
            let (live_status, volume) = (live_status.clone(), volume.clone());
            Some(ublk_mirror::metrics::MetricsServer::start(address, Arc::new(move || ublk_mirror::metrics::render_volume(&live_status(), volume.latency())))?)
        }
        None => None,
    };
    tracing::info!(volume = %name, exports = ?exports, "serving");
    daemon::notify(&format!("READY=1\nSTATUS=serving {name} on {}", exports.join(", ")));
    let reporter = daemon::StatusReporter::start({
        let live_status = live_status.clone();
        move || status::one_line(&live_status())
    });
    let mut signals = signals;
    let signal = signals.forever().next().unwrap_or(signal_hook::consts::SIGTERM);
    tracing::info!(signal, "stopping: draining requests, flushing the journal");
    drop(reporter);
    daemon::notify("STOPPING=1\nSTATUS=stopping: draining requests, flushing the journal");
    volume.begin_shutdown();
    if let Some(ublk_server) = ublk_server {
        if let Err(error) = ublk_server.shutdown() {
            tracing::error!("remove ublk device: {error:#}");
        }
    }
    server.shutdown();
    drop(control);
    drop(metrics);
    drop(live_status);
    volume.shutdown().context("shut down volume")?;
    if let Ok(senders) = Arc::try_unwrap(senders) {
        senders.shutdown();
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

fn show_status(args: StatusArgs) -> Result<()> {
    let read = || -> Result<status::Status> {
        let socket = args.dir.join(CONTROL_SOCKET);
        if ublk_mirror::volume::is_locked(&args.dir) {
            let value = control::request(&socket, "status").with_context(|| {
                format!("volume {} is in use but its control socket {} does not answer", args.dir.display(), socket.display())
            })?;
            serde_json::from_value::<status::Status>(value).context("parse status from the running volume")
        } else {
            status::offline(&args.dir).with_context(|| format!("read volume {}", args.dir.display()))
        }
    };
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
        println!("{}  (every {}s)", utc_clock_text(), args.interval);
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

/// Wall-clock time as HH:MM:SS UTC, for the --watch header.
fn utc_clock_text() -> String {
    let seconds = ublk_mirror::fsutil::now_micros() / 1_000_000;
    format!("{:02}:{:02}:{:02} UTC", seconds / 3600 % 24, seconds / 60 % 60, seconds % 60)
}

fn dump(args: DumpArgs) -> Result<()> {
    let dir: &Path = &args.dir.join(JOURNAL_DIR);
    if !args.dir.join(ublk_mirror::volume::config::CONFIG_FILE).exists() {
        bail!("{} holds no volume", args.dir.display());
    }
    let (journal, report) = Journal::open_read_only(dir).with_context(|| format!("read journal {}", dir.display()))?;
    let mut reader = JournalReader::new(journal, args.from.unwrap_or(report.first_lsn))?;
    let mut printed = 0;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    use std::io::Write;
    while let Some(record) = reader.next_record()? {
        if args.limit.is_some_and(|limit| printed >= limit) {
            break;
        }
        let h = record.header;
        let crc = crc32c::crc32c(&record.payload);
        if args.json {
            let line = serde_json::json!({
                "lsn": h.lsn, "kind": h.kind.name(), "offset": h.offset, "length": h.length,
                "flags": h.flags, "timestamp_us": h.timestamp_us, "payload_crc32c": format!("{crc:08x}"),
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{:>10} {:<12} offset {:>14} length {:>10} flags {:#x} crc32c {crc:08x}", h.lsn, h.kind.name(), h.offset, h.length, h.flags)?;
        }
        printed += 1;
    }
    Ok(())
}

fn mirror_add(args: MirrorAddArgs) -> Result<()> {
    let config = ublk_mirror::replication::mirror::MirrorConfig {
        name: args.name.clone(),
        address: args.to,
        fingerprint: args.fingerprint,
        max_rate: args.max_rate,
        idle_timeout: args.idle_timeout,
        congestion: args.congestion.map(Into::into),
    };
    ublk_mirror::replication::mirror::add(&args.dir, &config).with_context(|| format!("add mirror to {}", args.dir.display()))?;
    println!("added mirror {} -> {} (starts with the next `run`)", config.name, config.address);
    Ok(())
}

fn mirror_set(args: MirrorSetArgs) -> Result<()> {
    let max_rate = match args.max_rate.as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(text) => Some(Some(parse_size(text).context("--max-rate")?)),
    };
    if max_rate.is_none() && args.idle_timeout.is_none() {
        bail!("nothing to change: give --max-rate RATE|none and/or --idle-timeout SECONDS");
    }
    let config = ublk_mirror::replication::mirror::set(&args.dir, &args.name, max_rate, args.idle_timeout)?;
    let rate = config.max_rate.map_or("none".to_string(), |r| format!("{}/s", ublk_mirror::size::format_size(r)));
    println!("mirror {}: max rate {rate}, idle timeout {} s", config.name, config.idle_timeout().as_secs());
    if ublk_mirror::volume::is_locked(&args.dir) {
        let reply = control::request(&args.dir.join(CONTROL_SOCKET), "reload-mirrors").context("tell the running volume")?;
        if let Some(error) = reply["error"].as_str() {
            bail!("the running volume could not apply the change: {error}");
        }
        println!("applied to the running volume (the idle timeout at the next connection)");
    }
    Ok(())
}

fn install_units(args: InstallArgs) -> Result<()> {
    let binary = std::env::current_exe().context("find this binary")?;
    for line in ublk_mirror::install::install(&args.root, &binary)? {
        println!("{line}");
    }
    if args.root == Path::new("/") {
        for line in ublk_mirror::install::reload_managers() {
            println!("{line}");
        }
        println!("next: ublk-mirror volume create --dir /var/lib/ublk-mirror/NAME ...; set [run] in its volume.toml; systemctl enable --now ublk-mirror@NAME");
    }
    Ok(())
}

fn uninstall_units(args: InstallArgs) -> Result<()> {
    for line in ublk_mirror::install::uninstall(&args.root)? {
        println!("{line}");
    }
    if args.root == Path::new("/") {
        for line in ublk_mirror::install::reload_managers() {
            println!("{line}");
        }
    }
    Ok(())
}

fn applier(command: ApplierCommand) -> Result<()> {
    use ublk_mirror::replication::applier;
    match command {
        ApplierCommand::Init { dir } => {
            let fingerprint = applier::init(&dir).with_context(|| format!("initialise applier in {}", dir.display()))?;
            println!("initialised applier in {}", dir.display());
            println!("certificate fingerprint:");
            println!("{fingerprint}");
        }
        ApplierCommand::Replica(ReplicaCommand::Add { dir, volume, image }) => {
            let path = applier::attach_image(&dir, &volume, &image)?;
            println!("replica of {volume} will use {} (synchronised on the first connection)", path.display());
        }
        ApplierCommand::Allow { dir, fingerprint } => {
            if applier::allow(&dir, &fingerprint)? {
                println!("allowed {fingerprint}");
            } else {
                println!("{fingerprint} was already allowed");
            }
        }
        ApplierCommand::Run { dir, listen, allow, metrics } => {
            for fingerprint in &allow {
                ublk_mirror::identity::parse_fingerprint(fingerprint)?;
            }
            if !dir.join(applier::IDENTITY_DIR).exists() {
                bail!("{} holds no applier; run `ublk-mirror applier init --dir {}` first", dir.display(), dir.display());
            }
            let config = ublk_mirror::replication::applier_config::ApplierConfig::load(&dir)?;
            let config_file = dir.join(ublk_mirror::replication::applier_config::CONFIG_FILE);
            let Some(listen) = listen.or(config.listen_address()) else {
                bail!("no address to listen on: give --listen IP:PORT or set listen in {}", config_file.display());
            };
            let metrics_address = metrics.or(config.metrics_address());
            let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")).with_context(|| format!("open {}", dir.join("lock").display()))?;
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| anyhow::anyhow!("applier {} is in use by another process", dir.display()))?;
            let state = applier::Applier::new(&dir, allow, config.idle_timeout());
            let status_state = state.clone();
            let _metrics = match metrics_address {
                Some(address) => {
                    let state = state.clone();
                    Some(ublk_mirror::metrics::MetricsServer::start(address, Arc::new(move || ublk_mirror::metrics::render_applier(&state.status())))?)
                }
                None => None,
            };
            let _control = control::ControlServer::start(
                &dir.join(applier::CONTROL_SOCKET),
                Arc::new(move |command: &str| match command {
                    "status" => serde_json::to_value(status_state.status()).unwrap_or_default(),
                    other => serde_json::json!({ "error": format!("unknown request {other:?}") }),
                }),
            )?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = stop_tx.send(());
                }
            });
            let reporter = daemon::StatusReporter::start({
                let state = state.clone();
                move || applier::one_line(&state.status())
            });
            let ready = state.clone();
            runtime.block_on(state.serve(
                listen,
                move |address| daemon::notify(&format!("READY=1\nSTATUS=listening on {address}; {}", applier::one_line(&ready.status()))),
                async move {
                    let _ = stop_rx.await;
                    drop(reporter);
                    daemon::notify("STOPPING=1\nSTATUS=stopping");
                },
            ))?;
            tracing::info!("applier stopped");
        }
        ApplierCommand::Status { dir, json } => {
            let socket = dir.join(applier::CONTROL_SOCKET);
            let status: applier::ApplierStatus = match control::request(&socket, "status") {
                Ok(value) => serde_json::from_value(value)?,
                Err(_) => applier::offline_status(&dir).with_context(|| format!("read applier {}", dir.display()))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("applier {} ({}), {}", dir.display(), status.fingerprint, if status.running { format!("listening on {}", status.listen.unwrap_or_default()) } else { "not running".into() });
                for r in &status.replicas {
                    println!(
                        "  {:<20} received {:>10} applied {:>10} {} {}  {}",
                        r.volume,
                        r.received_lsn,
                        r.applied_lsn,
                        if r.consistent { "consistent" } else { "INCONSISTENT" },
                        if r.connected { "connected" } else { "disconnected" },
                        r.image
                    );
                }
            }
        }
    }
    Ok(())
}
