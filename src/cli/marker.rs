//! `marker create`, `marker list`, `marker schedule`: consistency points at the source, on
//! one volume or on a consistency group at one instant (see docs/markers.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use ublk_mirror::control::Session;
use ublk_mirror::freeze::{self, Frozen, TerminationDeferred};
use ublk_mirror::layout::VolumeDir;
use ublk_mirror::marker::{self, Groups, Marker};
use ublk_mirror::volume::{self, MarkerEntry, VolumeConfig};

#[derive(Subcommand)]
pub enum MarkerCommand {
    /// Append a marker to running volumes' journals and print each one's marker LSN. With
    /// several volumes (or --group) the markers mark one instant on all of them.
    Create(CreateArgs),
    /// Show a volume's markers still in its journal and which mirrors have applied them.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// Also markers already trimmed from the journal (the volume's whole history).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take a group's markers at the interval its entry in the groups file sets, until
    /// SIGTERM or SIGINT (a failed marker is logged and the next one taken on time).
    Schedule {
        #[arg(long)]
        group: String,
        #[arg(long, default_value = marker::DEFAULT_GROUPS_FILE)]
        groups: PathBuf,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// A volume directory (repeat for a consistency group).
    #[arg(long = "dir")]
    dirs: Vec<PathBuf>,
    /// The marker's name (default: PREFIX-YYYYMMDDTHHMMSSZ, the group's prefix or "manual").
    #[arg(long)]
    name: Option<String>,
    /// A group of the groups file: its volumes (and freeze list) instead of --dir.
    #[arg(long)]
    group: Option<String>,
    #[arg(long, default_value = marker::DEFAULT_GROUPS_FILE)]
    groups: PathBuf,
    /// Freeze this mounted filesystem around the marker (FIFREEZE/FITHAW; repeatable).
    #[arg(long)]
    freeze: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// What `marker create` reports (`--json`).
#[derive(Debug, Serialize)]
pub struct Created {
    pub name: String,
    pub id: uuid::Uuid,
    pub group: Option<String>,
    pub volumes: Vec<CreatedOn>,
    /// The longest write hold among the members, microseconds.
    pub max_hold_us: u64,
    pub frozen: Vec<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct CreatedOn {
    pub dir: PathBuf,
    pub volume: String,
    pub lsn: u64,
    pub hold_us: u64,
}

pub fn execute(command: MarkerCommand) -> Result<()> {
    match command {
        MarkerCommand::Create(args) => {
            let (dirs, group, mut freeze, prefix) = match &args.group {
                Some(group) => {
                    if !args.dirs.is_empty() {
                        bail!("give either --group or --dir, not both");
                    }
                    let groups = Groups::load(&args.groups).map_err(anyhow::Error::msg)?;
                    let Some(entry) = groups.get(group) else { bail!("{} declares no group {group:?}", args.groups.display()) };
                    (entry.volumes.clone(), Some(group.clone()), entry.schedule.freeze.clone(), entry.schedule.prefix().to_string())
                }
                None => (args.dirs.clone(), None, Vec::new(), "manual".to_string()),
            };
            freeze.extend(args.freeze.iter().cloned());
            let name = args.name.clone().unwrap_or_else(|| marker::scheduled_name(&prefix, std::time::SystemTime::now()));
            let created = create(&dirs, &name, group.as_deref(), &freeze)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                for on in &created.volumes {
                    println!("{}: marker {} at LSN {} (writes held {} us)", on.volume, created.name, on.lsn, on.hold_us);
                }
            }
            Ok(())
        }
        MarkerCommand::List { dir, all, json } => list(&dir, all, json),
        MarkerCommand::Schedule { group, groups } => schedule(&group, &groups),
    }
}

/// Takes one marker on `dirs` (a group instant when more than one): freezes `freeze`,
/// holds every member, appends the markers, thaws.
pub fn create(dirs: &[PathBuf], name: &str, group: Option<&str>, freeze: &[PathBuf]) -> Result<Created> {
    if dirs.is_empty() {
        bail!("name at least one volume (--dir) or a group (--group)");
    }
    let mut members = Vec::new();
    for dir in dirs {
        let config = VolumeConfig::load(&VolumeDir::new(dir)).with_context(|| format!("volume {}", dir.display()))?;
        if members.iter().any(|(_, name): &(PathBuf, String)| *name == config.name) {
            bail!("two members are named {:?}: a group's volumes need distinct names (an applier matches group members by volume name)", config.name);
        }
        if !volume::is_locked(dir) {
            bail!("volume {} ({}) is not running: markers are appended by its `ublk-mirror run`", config.name, dir.display());
        }
        members.push((dir.clone(), config.name));
    }
    for path in freeze {
        if !freeze::is_mount_point(path) {
            bail!("--freeze {}: not the mount point of a filesystem", path.display());
        }
    }
    let grouped = members.len() > 1 || group.is_some();
    let id = uuid::Uuid::new_v4();
    let names: Vec<String> = members.iter().map(|(_, name)| name.clone()).collect();
    // An ad hoc group (several --dir) is named after its marker.
    let group_name = grouped.then(|| group.unwrap_or(name).to_string());
    let markers: Vec<Marker> = members
        .iter()
        .map(|_| match &group_name {
            Some(group) => Marker::of_group(name, group, names.clone(), id),
            None => Marker { id, ..Marker::single(name) },
        })
        .collect();
    markers[0].validate().map_err(anyhow::Error::msg)?;

    // Frozen from here: a termination signal waits until the thaw, every path thaws.
    let deferred = TerminationDeferred::new();
    let frozen = Frozen::freeze(freeze)?;
    let result = if grouped { mark_group(&members, &markers) } else { mark_one(&members[0], &markers[0]).map(|on| vec![on]) };
    frozen.thaw();
    drop(deferred);
    let volumes = result?;
    Ok(Created {
        name: name.to_string(),
        id,
        group: group_name,
        max_hold_us: volumes.iter().map(|v| v.hold_us).max().unwrap_or(0),
        volumes,
        frozen: freeze.to_vec(),
    })
}

fn connect(dir: &Path) -> Result<Session> {
    let socket = VolumeDir::new(dir).control_socket();
    Session::connect(&socket, Duration::from_secs(10)).with_context(|| format!("connect to the running volume ({})", socket.display()))
}

fn answer(reply: std::io::Result<serde_json::Value>, volume: &str) -> Result<serde_json::Value> {
    let reply = reply.with_context(|| format!("volume {volume}"))?;
    if let Some(error) = reply["error"].as_str() {
        bail!("volume {volume}: {error}");
    }
    Ok(reply)
}

fn created_on((dir, volume): &(PathBuf, String), reply: &serde_json::Value) -> CreatedOn {
    CreatedOn { dir: dir.clone(), volume: volume.clone(), lsn: reply["lsn"].as_u64().unwrap_or(0), hold_us: reply["hold_us"].as_u64().unwrap_or(0) }
}

fn mark_one(member: &(PathBuf, String), marker: &Marker) -> Result<CreatedOn> {
    let mut session = connect(&member.0)?;
    let reply = answer(session.request(&format!("marker {}", serde_json::to_string(marker)?)), &member.1)?;
    Ok(created_on(member, &reply))
}

/// Holds every member (in parallel), then appends every member's marker (in parallel). A
/// member that cannot be held releases all (nothing is appended anywhere).
fn mark_group(members: &[(PathBuf, String)], markers: &[Marker]) -> Result<Vec<CreatedOn>> {
    let started = Instant::now();
    let held: Vec<Result<Session>> = std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .iter()
            .zip(markers)
            .map(|((dir, volume), marker)| {
                scope.spawn(move || -> Result<Session> {
                    let mut session = connect(dir)?;
                    let reply = answer(session.request(&format!("marker-hold {}", serde_json::to_string(marker)?)), volume)?;
                    if reply["held"] != true {
                        bail!("volume {volume}: unexpected answer {reply}");
                    }
                    Ok(session)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a holding thread panicked")))).collect()
    });
    let failures: Vec<String> = held.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))).collect();
    if !failures.is_empty() {
        // Dropping the sessions releases the holds that were granted.
        drop(held);
        bail!("no marker was appended: {}", failures.join("; "));
    }
    tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "every member held");
    let sessions: Vec<Session> = held.into_iter().map(|r| r.expect("checked")).collect();
    let results: Vec<Result<CreatedOn>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .into_iter()
            .zip(members)
            .map(|(mut session, member)| scope.spawn(move || answer(session.request("marker-commit"), &member.1).map(|reply| created_on(member, &reply))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a marking thread panicked")))).collect()
    });
    let mut done = Vec::new();
    let mut reasons = Vec::new();
    for result in results {
        match result {
            Ok(on) => done.push(on),
            Err(error) => reasons.push(format!("{error:#}")),
        }
    }
    if !reasons.is_empty() {
        let appended: Vec<&str> = done.iter().map(|d| d.volume.as_str()).collect();
        bail!(
            "the group marker is incomplete (appended on: {}): {}",
            if appended.is_empty() { "none".into() } else { appended.join(", ") },
            reasons.join("; ")
        );
    }
    Ok(done)
}

/// One marker as `marker list` shows it.
#[derive(Debug, Serialize)]
struct Listed {
    #[serde(flatten)]
    entry: MarkerEntry,
    /// RFC 3339 time the marker was requested.
    created: String,
    in_journal: bool,
    mirrors: Vec<MirrorMark>,
}

#[derive(Debug, Serialize)]
struct MirrorMark {
    name: String,
    /// `applied` (the replica passed it: it has its snapshot), `pending`, or `lost` (the
    /// replica got that stretch by a resync: the mirror was tracking).
    state: ublk_mirror::status::MarkerState,
}

fn list(dir: &Path, all: bool, json: bool) -> Result<()> {
    let status = super::status::read_status(dir)?;
    let history = volume::marker_history(dir).with_context(|| format!("volume {}", dir.display()))?;
    let first_lsn = status.journal.first_lsn;
    let listed: Vec<Listed> = history
        .into_iter()
        .filter(|m| all || m.lsn >= first_lsn)
        .map(|entry| Listed {
            created: humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_micros(entry.created_us)).to_string(),
            in_journal: entry.lsn >= first_lsn,
            mirrors: status.mirrors.iter().map(|mirror| MirrorMark { name: mirror.name.clone(), state: mirror.marker_state(entry.lsn, first_lsn) }).collect(),
            entry,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "volume": status.volume.name, "markers": listed }))?);
        return Ok(());
    }
    if listed.is_empty() {
        println!("{}: no markers{}", status.volume.name, if all { "" } else { " in the journal" });
        return Ok(());
    }
    println!("{:<32} {:>10} {:<20} {:<12} MIRRORS", "MARKER", "LSN", "CREATED", "GROUP");
    for m in &listed {
        let mirrors: Vec<String> = m
            .mirrors
            .iter()
            .map(|mm| format!("{}:{}", mm.name, serde_json::to_value(mm.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()))
            .collect();
        println!("{:<32} {:>10} {:<20} {:<12} {}", m.entry.name, m.entry.lsn, m.created, m.entry.group.as_deref().unwrap_or("-"), mirrors.join(" "));
    }
    Ok(())
}

/// `marker schedule`: the group's markers every interval until a termination signal.
fn schedule(group: &str, groups_file: &Path) -> Result<()> {
    let groups = Groups::load(groups_file).map_err(anyhow::Error::msg)?;
    let Some(entry) = groups.get(group) else { bail!("{} declares no group {group:?}", groups_file.display()) };
    let Some(interval) = entry.schedule.interval() else { bail!("group.{group}.every is not set in {}: nothing to schedule", groups_file.display()) };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    tracing::info!(group, every = ?interval, "taking scheduled group markers");
    let mut next = Instant::now() + interval;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(200)));
            continue;
        }
        next += interval;
        let name = marker::scheduled_name(entry.schedule.prefix(), std::time::SystemTime::now());
        match create(&entry.volumes, &name, Some(group), &entry.schedule.freeze) {
            Ok(created) => tracing::info!(group, marker = %name, max_hold_us = created.max_hold_us, "group marker taken"),
            Err(error) => tracing::error!(group, marker = %name, error = %format!("{error:#}"), "group marker failed"),
        }
    }
    Ok(())
}
