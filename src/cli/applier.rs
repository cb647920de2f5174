//! `applier init`, `applier allow`, `applier replica add`, `applier run` and
//! `applier status`: the receiving side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use ublk_mirror::applier::{self, ApplierConfig};
use ublk_mirror::layout::{ApplierDir, DirLock, LockError};
use ublk_mirror::status::{self, ApplierStatus};
use ublk_mirror::{control, daemon, metrics};

#[derive(Subcommand)]
pub enum ApplierCommand {
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
    /// The snapshots taken at markers: list, delete, export read-only over NBD.
    #[command(subcommand)]
    Snapshot(super::snapshot::SnapshotCommand),
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
    /// Show the replicas: their source (the id of the certificate that feeds them), LSNs
    /// received and applied, consistency, connection.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ReplicaCommand {
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
        /// The source that will feed it: an allowed fingerprint or a unique prefix of one.
        /// Absent: the first source presenting that volume name gets it.
        #[arg(long)]
        source: Option<String>,
        /// The image file or block device.
        #[arg(long)]
        image: PathBuf,
    },
    /// Turn the replica of volume NAME (its latest consistent state, or a snapshot) into a
    /// volume directory that `run` serves, with a new generation branching from the
    /// replica's history. The image becomes the volume's backing store where it is (no copy).
    /// Prints the new volume's certificate fingerprint on a line of its own.
    Promote {
        #[arg(long)]
        dir: PathBuf,
        /// The source volume's name.
        #[arg(long)]
        volume: String,
        /// The replica's source (its id in `applier status`, or a unique prefix), when
        /// sources share the volume name.
        #[arg(long)]
        source: Option<String>,
        /// The volume directory to make (empty or absent).
        #[arg(long)]
        to: PathBuf,
        /// Promote this snapshot (`applier snapshot list`) instead of the latest state.
        #[arg(long)]
        snapshot: Option<String>,
        /// Promote even while the source is connected (it is disconnected, then refused).
        #[arg(long)]
        force: bool,
        /// The new volume's journal size (default 1G, like `volume create`).
        #[arg(long, value_parser = ublk_mirror::size::parse_size)]
        journal_size: Option<u64>,
        /// Print what was made as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn execute(command: ApplierCommand) -> Result<()> {
    match command {
        ApplierCommand::Init { dir } => {
            let fingerprint = applier::init(&dir).with_context(|| format!("initialise applier in {}", dir.display()))?;
            println!("initialised applier in {}", dir.display());
            println!("certificate fingerprint:");
            println!("{fingerprint}");
        }
        ApplierCommand::Replica(ReplicaCommand::Add { dir, volume, source, image }) => {
            let path = applier::attach_image(&dir, &volume, source.as_deref(), &image)?;
            println!("replica of {volume} will use {} (synchronised on the first connection)", path.display());
        }
        ApplierCommand::Replica(ReplicaCommand::Promote { dir, volume, source, to, snapshot, force, journal_size, json }) => {
            promote(&dir, applier::PromoteRequest { volume, source, to, snapshot, force, journal_size }, json)?
        }
        ApplierCommand::Allow { dir, fingerprint } => {
            if applier::allow(&dir, &fingerprint)? {
                println!("allowed {fingerprint}");
            } else {
                println!("{fingerprint} was already allowed");
            }
        }
        ApplierCommand::Run { dir, listen, allow, metrics } => serve(&dir, listen, allow, metrics)?,
        ApplierCommand::Snapshot(command) => super::snapshot::execute(command)?,
        ApplierCommand::Status { dir, json } => {
            let socket = ApplierDir::new(&dir).control_socket();
            let status: ApplierStatus = match control::request(&socket, "status") {
                Ok(value) => serde_json::from_value(value)?,
                Err(_) => applier::offline_status(&dir).with_context(|| format!("read applier {}", dir.display()))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::applier_text(&dir, &status));
            }
        }
    }
    Ok(())
}

/// `applier replica promote`: through the running applier (which knows whether the source is
/// connected), or on the directory when none runs.
fn promote(dir: &Path, request: applier::PromoteRequest, json: bool) -> Result<()> {
    let context = || format!("promote the replica of {} in {}", request.volume, dir.display());
    let socket = ApplierDir::new(dir).control_socket();
    let promoted: applier::replica::Promoted = match control::request(&socket, &format!("replica-promote {}", serde_json::to_string(&request)?)) {
        Ok(reply) => {
            if let Some(error) = reply["error"].as_str() {
                return Err(anyhow::anyhow!("{error}")).with_context(context);
            }
            serde_json::from_value(reply).context("the applier's answer")?
        }
        Err(_) if !DirLock::is_held(&ApplierDir::new(dir).lock()) => applier::promote_offline(dir, &request).with_context(context)?,
        Err(error) => return Err(anyhow::Error::from(error)).with_context(|| format!("ask the running applier in {}", dir.display())).with_context(context),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&promoted)?);
        return Ok(());
    }
    let from = promoted.snapshot.as_ref().map(|s| format!("snapshot {s}")).unwrap_or_else(|| "its latest state".into());
    println!("promoted the replica of {} ({from}, LSN {}) to the volume in {}", promoted.volume, promoted.branch_lsn, promoted.dir.display());
    println!("  generation {} (parent {}, branched at LSN {})", promoted.generation, promoted.parent, promoted.branch_lsn);
    if promoted.copied_bytes > 0 {
        println!(
            "  backing    {} (the replica image; {} of snapshot chunks written back over it)",
            promoted.backing.display(),
            ublk_mirror::size::human_size(promoted.copied_bytes)
        );
    } else {
        println!("  backing    {} (used where it is: no copy)", promoted.backing.display());
    }
    println!("  serve it:  ublk-mirror run --dir {} --ublk (or --nbd ADDR)", promoted.dir.display());
    println!("certificate fingerprint:");
    println!("{}", promoted.fingerprint);
    Ok(())
}

/// `applier run`: serves replicas until SIGTERM or SIGINT.
fn serve(dir: &Path, listen: Option<std::net::SocketAddr>, allow: Vec<String>, metrics_address: Option<std::net::SocketAddr>) -> Result<()> {
    for fingerprint in &allow {
        ublk_mirror::identity::parse_fingerprint(fingerprint)?;
    }
    let layout = ApplierDir::new(dir);
    if !layout.holds_applier() {
        bail!("{} holds no applier; run `ublk-mirror applier init --dir {}` first", dir.display(), dir.display());
    }
    let config = ApplierConfig::load(&layout)?;
    let config_file = layout.config();
    let Some(listen) = listen.or(config.listen_address()) else {
        bail!("no address to listen on: give --listen IP:PORT or set listen in {}", config_file.display());
    };
    let metrics_address = metrics_address.or(config.metrics_address());
    let _lock = DirLock::acquire(&layout.lock()).map_err(|error| match error {
        LockError::Held { holder } => anyhow::anyhow!("applier {} is in use by another process ({holder})", dir.display()),
        other => anyhow::Error::from(other),
    })?;
    // Before serving: replicas' images, journals and snapshots are disks' contents
    // (docs/security.md); placed journals are reached through links, so their directory too.
    ublk_mirror::permissions::tighten_tree(dir)?;
    if let Some(journals) = config.journal_dir.as_deref().filter(|journals| journals.is_dir()) {
        ublk_mirror::permissions::tighten_tree(journals)?;
    }
    let state = applier::Applier::new(dir, allow, config.idle_timeout());
    let status_state = state.clone();
    let _metrics = match metrics_address {
        Some(address) => {
            let state = state.clone();
            Some(metrics::MetricsServer::start(address, Arc::new(move || metrics::render_applier(&state.status())))?)
        }
        None => None,
    };
    let _control = control::ControlServer::start(
        &layout.control_socket(),
        Arc::new(move |command: &str| {
            control::Reply::Done(match command {
                "status" => serde_json::to_value(status_state.status()).unwrap_or_default(),
                other => status_state
                    .snapshot_request(other)
                    .or_else(|| status_state.replica_request(other))
                    .unwrap_or_else(|| serde_json::json!({ "error": format!("unknown request {other:?}") })),
            })
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
        move || status::applier_one_line(&state.status())
    });
    let ready = state.clone();
    runtime.block_on(state.serve(
        listen,
        move |address| daemon::notify(&format!("READY=1\nSTATUS=listening on {address}; {}", status::applier_one_line(&ready.status()))),
        async move {
            let _ = stop_rx.await;
            drop(reporter);
            daemon::notify("STOPPING=1\nSTATUS=stopping");
        },
    ))?;
    tracing::info!("applier stopped");
    Ok(())
}
