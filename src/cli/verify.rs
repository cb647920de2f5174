//! `mirror verify`: an online comparison of replicas with the running volume, chunk by chunk
//! at the same LSN on both sides (see `mirror/verify_source.rs`), optionally repairing what
//! differs through a resync. Exit status: 0 identical, 1 differences found (repaired or not)
//! or the verify could not be done (the message says which).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use ublk_mirror::layout::VolumeDir;
use ublk_mirror::mirror;
use ublk_mirror::status::{VerifyReport, VerifyState};

#[derive(Args)]
pub struct MirrorVerifyArgs {
    /// State directory of the (running) volume.
    #[arg(long)]
    dir: PathBuf,
    /// Verify this mirror only (default: every mirror of the volume).
    #[arg(long)]
    name: Option<String>,
    /// Resend the differing regions through a resync (staged: the replica is never torn) and
    /// wait until it committed.
    #[arg(long)]
    repair: bool,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

/// How often the running volume's status is read while waiting.
const POLL: Duration = Duration::from_millis(200);
/// How often progress is printed (to stderr) while a verify runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub fn verify(args: MirrorVerifyArgs) -> Result<()> {
    let dir = VolumeDir::new(&args.dir);
    let names: Vec<String> = match &args.name {
        Some(name) => {
            mirror::load(&dir, name).with_context(|| format!("verify a mirror of {}", args.dir.display()))?;
            vec![name.clone()]
        }
        None => mirror::list(&dir)?.into_iter().map(|m| m.name).collect(),
    };
    if names.is_empty() {
        bail!("volume {} has no mirrors to verify (add one with `ublk-mirror mirror add`)", args.dir.display());
    }
    if !ublk_mirror::volume::is_locked(&args.dir) {
        bail!(
            "volume {} is not running: an online verify compares each replica with the running volume at the same LSN (start it with `ublk-mirror run --dir {}` or its systemd unit)",
            args.dir.display(),
            args.dir.display()
        );
    }
    let mut started = Vec::new();
    for name in &names {
        let request = format!("verify-mirror {name}{}", if args.repair { " repair" } else { "" });
        let reply = super::status::running_volume(&dir, &request).with_context(|| format!("start the verify of mirror {name}"))?;
        let id = reply["verify"].as_u64().with_context(|| format!("the running volume's answer has no verify id: {reply}"))?;
        started.push((name.clone(), id));
    }
    let reports = wait(&args, &started)?;
    if args.json {
        let mirrors: Vec<serde_json::Value> = reports
            .iter()
            .map(|(name, report)| {
                let mut value = serde_json::to_value(report).expect("a report serialises");
                value["name"] = serde_json::Value::String(name.clone());
                value
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "volume": args.dir.display().to_string(), "mirrors": mirrors }))?);
    } else {
        for (name, report) in &reports {
            println!("{}", describe(name, report));
        }
    }
    let failed: Vec<String> =
        reports.iter().filter(|(_, r)| r.state == VerifyState::Failed).map(|(name, r)| format!("{name}: {}", r.error.as_deref().unwrap_or("failed"))).collect();
    if !failed.is_empty() {
        bail!("the verify could not be completed: {}", failed.join("; "));
    }
    if reports.iter().any(|(_, r)| r.differing_regions > 0) {
        std::process::exit(1);
    }
    Ok(())
}

/// Waits until every started verify is done (and, with `--repair`, its regions resynced).
fn wait(args: &MirrorVerifyArgs, started: &[(String, u64)]) -> Result<Vec<(String, VerifyReport)>> {
    let mut last_progress = Instant::now();
    loop {
        let status = super::status::live_status(&args.dir)?;
        let mut reports = Vec::new();
        for (name, id) in started {
            let mirror = status.mirrors.iter().find(|m| &m.name == name).with_context(|| format!("mirror {name} was removed during the verify"))?;
            let report = mirror.verify.clone().filter(|r| r.id == *id).with_context(|| format!("the verify of mirror {name} was replaced by another"))?;
            reports.push((name.clone(), report, mirror.connected()));
        }
        let pending = |report: &VerifyReport| {
            report.is_running() || (report.repair && report.state == VerifyState::Done && report.differing_regions > 0 && !report.repaired)
        };
        if reports.iter().all(|(_, report, _)| !pending(report)) {
            return Ok(reports.into_iter().map(|(name, report, _)| (name, report)).collect());
        }
        // Every PROGRESS_EVERY, on stderr: a repair waiting for a mirror that is away, and
        // (unless --json) how far each running verify is.
        if last_progress.elapsed() >= PROGRESS_EVERY {
            if let Some((name, _, _)) = reports.iter().find(|(_, report, connected)| !report.is_running() && pending(report) && !connected) {
                eprintln!("mirror {name}: waiting for its applier to resync the differing regions (the mirror is disconnected; it reconnects by itself)");
            }
            for (name, report, _) in reports.iter().filter(|(_, report, _)| !args.json && report.is_running()) {
                eprintln!(
                    "mirror {name}: {} of {} compared ({})",
                    ublk_mirror::size::human_size(report.compared_bytes),
                    ublk_mirror::size::human_size(report.total_bytes),
                    per_second(report)
                );
            }
            last_progress = Instant::now();
        }
        std::thread::sleep(POLL);
    }
}

fn per_second(report: &VerifyReport) -> String {
    format!("{:.1} MiB/s", report.rate() / (1 << 20) as f64)
}

/// One line per mirror, e.g. `mirror m: 2.0G compared at LSNs 10..96 in 3.1 s (660.2 MiB/s): identical`.
fn describe(name: &str, report: &VerifyReport) -> String {
    let lsns = match (report.first_lsn, report.last_lsn) {
        (Some(first), Some(last)) if first != last => format!(" at LSNs {first}..{last}"),
        (Some(first), _) => format!(" at LSN {first}"),
        _ => String::new(),
    };
    let head = format!(
        "mirror {name}: {} compared{lsns} in {:.1} s ({})",
        ublk_mirror::size::human_size(report.compared_bytes),
        report.duration_seconds,
        per_second(report)
    );
    if report.state == VerifyState::Failed {
        return format!("{head}: failed: {}", report.error.as_deref().unwrap_or("unknown"));
    }
    if report.differing_regions == 0 {
        return format!("{head}: identical");
    }
    let offsets: Vec<String> = report.differing_offsets.iter().map(|o| o.to_string()).collect();
    let more = if report.differing_regions as usize > offsets.len() { ", ..." } else { "" };
    let outcome = if report.repaired { "repaired (resent through a resync)" } else { "not repaired (run `mirror verify --repair`)" };
    format!(
        "{head}: {} differing region{} of {} ({}) at offsets {}{more}; {outcome}",
        report.differing_regions,
        if report.differing_regions == 1 { "" } else { "s" },
        ublk_mirror::size::human_size(report.chunk_bytes),
        ublk_mirror::size::human_size(report.differing_bytes),
        offsets.join(", ")
    )
}
