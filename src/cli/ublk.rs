//! `ublk list` and `ublk delete`: the host's ublk devices as the kernel sees them, and giving
//! up a device whose server is gone (its waiting I/O fails instead of hanging).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use ublk_mirror::frontend::ublk;
use ublk_mirror::layout::VolumeDir;

#[derive(Subcommand)]
pub enum UblkCommand {
    /// List the host's ublk devices: state (live, quiesced: I/O waits for a server, fail-io,
    /// dead), queues, depth, size and the server that attached last.
    List(ListArgs),
    /// Stop and delete a ublk device whose server is gone: every request that waited for it
    /// (and every later one) fails with EIO, so processes blocked on a mounted filesystem
    /// get errors instead of hanging; unmount the filesystem afterwards. The volume's data
    /// is untouched (what was acknowledged as flushed is in its journal); `run` serves it
    /// again on a new device. A device whose server still runs is refused (stop the server
    /// with SIGTERM instead) unless --force.
    Delete(DeleteArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// Print JSON (an array; field names are stable).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// The device's id N (/dev/ublkbN).
    #[arg(long, required_unless_present = "dir", conflicts_with = "dir")]
    id: Option<u32>,
    /// The volume whose left-behind device to delete (from DIR/ublk-device.json, which is
    /// removed too).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Delete even a device whose server still runs (its requests fail).
    #[arg(long)]
    force: bool,
}

pub fn execute(command: UblkCommand) -> Result<()> {
    match command {
        UblkCommand::List(args) => {
            let devices = ublk::list()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
                return Ok(());
            }
            if devices.is_empty() {
                println!("no ublk devices");
            }
            for d in devices {
                println!(
                    "{:<14} {:<9} {} queue(s) x {} deep, {} bytes, server pid {}{}",
                    d.device,
                    d.state.as_str(),
                    d.queues,
                    d.depth,
                    d.size,
                    d.server_pid,
                    if d.server_alive { "" } else { " (gone)" }
                );
            }
            Ok(())
        }
        UblkCommand::Delete(args) => {
            let record_path = args.dir.as_ref().map(|dir| VolumeDir::new(dir).ublk_device());
            let id = match (args.id, &record_path) {
                (Some(id), _) => id,
                (None, Some(path)) => match ublk::DeviceRecord::load(path) {
                    Some(record) => record.id,
                    None => bail!("{} does not exist or is unreadable: no device recorded for this volume; give --id N", path.display()),
                },
                (None, None) => bail!("give --id N or --dir VDIR"),
            };
            let info = ublk::delete(id, args.force)?;
            if let Some(path) = &record_path {
                ublk::forget(path, id);
            }
            println!(
                "deleted ublk device {id} ({}, was {}): I/O that waited for it failed with EIO; unmount any filesystem that was on it",
                info.device,
                info.state.as_str()
            );
            Ok(())
        }
    }
}
