//! `applier snapshot list|delete|export`: the replicas' snapshots taken at markers, and a
//! read-only NBD view of one (or of the replica's latest consistent state).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use ublk_mirror::address::NbdAddress;
use ublk_mirror::applier::replica::{Replica, ReplicaState};
use ublk_mirror::applier::replicas::{self, Found};
use ublk_mirror::applier::snapshot::{self, group, SnapshotReader, Snapshots};
use ublk_mirror::control;
use ublk_mirror::frontend::{nbd::NbdServer, Export};
use ublk_mirror::layout::{ApplierDir, DirLock, LockError};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// The snapshots of the replicas (`snapshots[]`) and the group snapshots they form
    /// (`groups[]`).
    List {
        #[arg(long)]
        dir: PathBuf,
        /// Only this volume's replica.
        #[arg(long)]
        volume: Option<String>,
        /// With --volume, when sources share the name: the replica's source (its id in
        /// `applier status`, or a unique prefix; `unbound` for one not bound yet).
        #[arg(long, requires = "volume")]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while it is exported).
    Delete {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        volume: String,
        /// The replica's source, when sources share the volume name.
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        snapshot: String,
    },
    /// Serve a snapshot read-only over NBD until SIGTERM or SIGINT, while the applier goes
    /// on applying to the replica. The export name is the volume's name; writes fail with
    /// EPERM.
    Export {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        volume: String,
        /// The replica's source, when sources share the volume name.
        #[arg(long)]
        source: Option<String>,
        #[arg(long, required_unless_present = "latest", conflicts_with = "latest")]
        snapshot: Option<String>,
        /// Serve the replica's latest consistent state instead (a temporary snapshot, frozen
        /// while exported and deleted afterwards).
        #[arg(long)]
        latest: bool,
        /// unix:PATH or tcp:HOST:PORT.
        #[arg(long, value_name = "ADDRESS")]
        nbd: String,
        /// Allow a TCP address that is not loopback (the export has no authentication).
        #[arg(long)]
        allow_remote: bool,
    },
}

pub fn execute(command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::List { dir, volume, source, json } => list(&dir, volume.as_deref(), source.as_deref(), json),
        SnapshotCommand::Delete { dir, volume, source, snapshot } => {
            let replica = replica_dir(&dir, &volume, source.as_deref())?;
            delete(&dir, &replica, &snapshot)?;
            println!("deleted snapshot {snapshot} of {}", replica.key);
            Ok(())
        }
        SnapshotCommand::Export { dir, volume, source, snapshot, latest, nbd, allow_remote } => {
            let replica = replica_dir(&dir, &volume, source.as_deref())?;
            export(&dir, &replica, snapshot.as_deref(), latest, &nbd, allow_remote)
        }
    }
}

/// The replica a command names (by volume name, and source when sources share it).
fn replica_dir(dir: &Path, volume: &str, source: Option<&str>) -> Result<Found> {
    let layout = ApplierDir::new(dir);
    if !layout.holds_applier() {
        bail!("{} holds no applier", dir.display());
    }
    Ok(replicas::resolve(&layout, volume, source)?)
}

fn list(dir: &Path, volume: Option<&str>, source: Option<&str>, json: bool) -> Result<()> {
    let layout = ApplierDir::new(dir);
    if !layout.holds_applier() {
        bail!("{} holds no applier", dir.display());
    }
    let chosen: Vec<Found> = match volume {
        Some(volume) => vec![replica_dir(dir, volume, source)?],
        None => replicas::list(&layout),
    };
    let snapshots: Vec<_> = chosen
        .iter()
        .flat_map(|found| snapshot::list_on_disk(&found.dir).into_iter().map(|info| snapshot::SnapshotInfo { source: found.key.source.clone(), ..info }))
        .collect();
    let groups = group::list(&layout, &snapshots, |member| replicas::named(&layout, member).iter().flat_map(snapshot::metas_on_disk).collect());
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "snapshots": snapshots, "groups": groups }))?);
        return Ok(());
    }
    if snapshots.is_empty() {
        println!("no snapshots");
        return Ok(());
    }
    println!("{:<16} {:<16} {:<32} {:>10} {:<12} {:<20} {:>10} {:<8} STATE", "VOLUME", "SOURCE", "SNAPSHOT", "LSN", "GROUP", "CREATED", "SIZE", "KIND");
    for s in &snapshots {
        let state = match (&s.invalid_reason, s.exported) {
            (Some(reason), _) => format!("invalid: {reason}"),
            (None, true) => "valid, exported".into(),
            (None, false) => "valid".into(),
        };
        let kind = serde_json::to_value(s.kind)?.as_str().unwrap_or("").to_string();
        println!(
            "{:<16} {:<16} {:<32} {:>10} {:<12} {:<20} {:>10} {:<8} {state}",
            s.volume,
            s.source.as_deref().unwrap_or(ublk_mirror::layout::UNBOUND),
            s.name,
            s.lsn,
            s.group.as_deref().unwrap_or("-"),
            s.created,
            ublk_mirror::size::format_size(s.size_bytes),
            kind
        );
    }
    for g in &groups {
        let members: Vec<String> = g.members.iter().map(|(m, lsn)| format!("{m}@{}", lsn.map_or("-".into(), |l| l.to_string()))).collect();
        println!("group {} {}: {} ({})", g.group, g.name, if g.complete { "complete" } else { "incomplete" }, members.join(" "));
    }
    Ok(())
}

/// Whether an applier runs on the directory (it then owns the replicas' snapshots).
fn applier_running(dir: &Path) -> bool {
    DirLock::is_held(&ApplierDir::new(dir).lock())
}

fn ask_applier(dir: &Path, request: &str) -> Result<serde_json::Value> {
    let socket = ApplierDir::new(dir).control_socket();
    let reply = control::request(&socket, request).with_context(|| format!("the running applier ({})", socket.display()))?;
    if let Some(error) = reply["error"].as_str() {
        bail!("{error}");
    }
    Ok(reply)
}

/// The applier directory's lock, for changes made while no applier runs.
fn lock_applier(dir: &Path) -> Result<DirLock> {
    DirLock::acquire(&ApplierDir::new(dir).lock()).map_err(|error| match error {
        LockError::Held { holder } => anyhow::anyhow!("applier {} is in use by another process ({holder}); try again", dir.display()),
        other => anyhow::Error::from(other),
    })
}

/// How the running applier's control requests name the replica (`SOURCE/NAME`).
fn reference(replica: &Found) -> String {
    replicas::reference(&replica.key.volume, Some(replica.key.source_text()))
}

fn delete(dir: &Path, replica: &Found, name: &str) -> Result<()> {
    ublk_mirror::name::validate(name).map_err(|e| anyhow::anyhow!("snapshot name {e}"))?;
    if applier_running(dir) {
        ask_applier(dir, &format!("snapshot-delete {} {name}", reference(replica)))?;
        return Ok(());
    }
    let _lock = lock_applier(dir)?;
    let state = ReplicaState::load(&replica.dir)?;
    Snapshots::open(&replica.dir, &replica.key.volume, state.size)?.delete(name)?;
    Ok(())
}

fn export(dir: &Path, found: &Found, name: Option<&str>, latest: bool, nbd: &str, allow_remote: bool) -> Result<()> {
    let (replica, volume) = (&found.dir, found.key.volume.as_str());
    let address: NbdAddress = nbd.parse()?;
    if !address.is_local() && !allow_remote {
        bail!("--nbd {address} is not a loopback address: the export is unauthenticated and unencrypted; give --allow-remote to serve it anyway");
    }
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]).context("install signal handlers")?;
    let (name, temporary) = match name {
        Some(name) => {
            ublk_mirror::name::validate(name).map_err(|e| anyhow::anyhow!("snapshot name {e}"))?;
            (name.to_string(), false)
        }
        None if applier_running(dir) => {
            let reply = ask_applier(dir, &format!("snapshot-latest {}", reference(found)))?;
            (reply["name"].as_str().unwrap_or_default().to_string(), true)
        }
        None => {
            // No applier: open the replica here (its journal redone) for the moment it takes.
            let _lock = lock_applier(dir)?;
            let mut opened = Replica::open(replica.root())?;
            (opened.snapshot_latest()?.0, true)
        }
    };
    debug_assert!(latest == temporary);
    let reader = SnapshotReader::open(replica, &name).with_context(|| format!("export snapshot {name} of {volume}"));
    let result = reader.and_then(|reader| {
        let lsn = reader.meta().lsn;
        let server = NbdServer::start(std::slice::from_ref(&address), Export::ReadOnly(Arc::new(reader)), volume, None)?;
        let bound: Vec<String> = server.bound_addresses().iter().map(|a| a.to_string()).collect();
        println!("exporting snapshot {name} of {volume} (LSN {lsn}) read-only at {}", bound.join(", "));
        use std::io::Write;
        std::io::stdout().flush()?;
        ublk_mirror::daemon::notify(&format!("READY=1\nSTATUS=exporting snapshot {name} of {volume}"));
        let mut signals = signals;
        let _ = signals.forever().next();
        server.shutdown();
        Ok(())
    });
    if temporary {
        // The reader is gone: the temporary snapshot can go too.
        let removed =
            if applier_running(dir) { ask_applier(dir, &format!("snapshot-delete {} {name}", reference(found))).map(drop) } else { delete(dir, found, &name) };
        if let Err(error) = removed {
            tracing::warn!(error = %format!("{error:#}"), "the temporary snapshot stays until the applier's next cleanup");
        }
    }
    result
}
