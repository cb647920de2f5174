//! The subcommands of `ublk-mirror`, one file per group: `volume`, `run`, `status`,
//! `journal`, `mirror`, `marker`, `applier`, `ublk`, `install-units`. Each file holds its clap arguments and
//! what the command does; the work itself is the library's.

mod applier;
mod install;
mod journal;
mod marker;
mod mirror;
mod run;
mod snapshot;
mod status;
mod switchover;
mod ublk;
mod verify;
mod volume;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create and inspect volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Serve a volume until SIGTERM or SIGINT (then drain, flush and exit 0).
    Run(run::RunArgs),
    /// Show a volume's mode, LSNs and journal use (live if it is running).
    Status(status::StatusArgs),
    /// Read a volume's journal.
    #[command(subcommand)]
    Journal(journal::JournalCommand),
    /// Configure where a volume is mirrored (takes effect at the next `run`).
    #[command(subcommand)]
    Mirror(mirror::MirrorCommand),
    /// Consistency points: markers on running volumes (one, or a group at one instant); the
    /// appliers keep a snapshot of each replica at each marker.
    #[command(subcommand)]
    Marker(marker::MarkerCommand),
    /// The receiving side: a daemon that keeps replicas of volumes from allowed sources.
    #[command(subcommand)]
    Applier(applier::ApplierCommand),
    /// The host's ublk devices: list them, delete one whose server is gone.
    #[command(subcommand)]
    Ublk(ublk::UblkCommand),
    /// Install the binary, systemd units (ublk-mirror@.service, ublk-mirror-applier.service),
    /// udev rules, the ublk module-load snippet and /etc/default/ublk-mirror (kept if present).
    InstallUnits(install::InstallArgs),
    /// Remove what install-units installed (state directories and an edited
    /// /etc/default/ublk-mirror are kept). Stop the services first.
    UninstallUnits(install::InstallArgs),
}

/// Runs one subcommand.
pub fn execute(command: Command) -> Result<()> {
    match command {
        Command::Volume(command) => volume::execute(command),
        Command::Run(args) => run::execute(args),
        Command::Status(args) => status::execute(args),
        Command::Journal(command) => journal::execute(command),
        Command::Mirror(command) => mirror::execute(command),
        Command::Marker(command) => marker::execute(command),
        Command::Applier(command) => applier::execute(command),
        Command::Ublk(command) => ublk::execute(command),
        Command::InstallUnits(args) => install::install(args),
        Command::UninstallUnits(args) => install::uninstall(args),
    }
}
