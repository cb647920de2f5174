//! `mirror switchover`: a planned swap of roles between a running volume and its replica.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use ublk_mirror::applier::{self, DemoteOptions};
use ublk_mirror::control::Session;
use ublk_mirror::layout::{ApplierDir, VolumeDir};
use ublk_mirror::mirror::{SwitchedOver, SwitchoverRequest};

#[derive(Args)]
pub struct SwitchoverArgs {
    /// State directory of the running volume.
    #[arg(long)]
    dir: PathBuf,
    /// The mirror whose replica becomes the primary.
    #[arg(long, default_value = "mirror")]
    name: String,
    /// An applier directory on this host (made by `applier init`) that will hold this
    /// volume's replica once the roles are swapped.
    #[arg(long)]
    applier: PathBuf,
    /// Where the new primary reaches that applier (HOST:PORT, UDP).
    #[arg(long, value_name = "HOST:PORT")]
    applier_address: String,
    /// The new primary's volume directory on the replica's host (default: ADIR/volumes/NAME
    /// of the replica's applier).
    #[arg(long)]
    to: Option<String>,
    /// Seconds the mirror may take to apply everything while writes are held (default 60).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[arg(long)]
    json: bool,
}

pub fn switchover(args: SwitchoverArgs) -> Result<()> {
    let applier_dir = ApplierDir::new(&args.applier);
    if !applier_dir.holds_applier() {
        bail!("{} holds no applier: run `ublk-mirror applier init --dir {}` first", args.applier.display(), args.applier.display());
    }
    let applier_fingerprint = ublk_mirror::identity::fingerprint(&applier_dir.identity())?;
    let layout = VolumeDir::new(&args.dir);
    let request = SwitchoverRequest {
        mirror: args.name.clone(),
        to: args.to.clone().unwrap_or_default(),
        applier_address: args.applier_address.clone(),
        applier_fingerprint,
        timeout_ms: args.timeout.saturating_mul(1000),
    };
    let started = Instant::now();
    let mut session = Session::connect(&layout.control_socket(), Duration::from_secs(args.timeout + 120))
        .with_context(|| format!("reach the running volume in {} (switchover needs `run`)", args.dir.display()))?;
    let reply = session.request(&format!("switchover {}", serde_json::to_string(&request)?)).context("the running volume")?;
    if let Some(error) = reply["error"].as_str() {
        bail!("switchover: {error}");
    }
    let switched: SwitchedOver = serde_json::from_value(reply).context("the running volume's answer")?;
    // `run` stops by itself once fenced; then the directory becomes the new primary's replica.
    let deadline = Instant::now() + Duration::from_secs(120);
    while ublk_mirror::volume::is_locked(&args.dir) {
        if Instant::now() >= deadline {
            bail!(
                "switched over, but `run` of {} did not stop within 120 s: stop it, then `ublk-mirror volume demote --dir {} --applier {}`",
                args.dir.display(),
                args.dir.display(),
                args.applier.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    applier::allow(&args.applier, &switched.fingerprint)?;
    let report = applier::demote(&args.dir, &args.applier, &DemoteOptions { mirror: Some(args.name.clone()), discard_local_changes: false })
        .with_context(|| format!("switched over; make {} the new primary's replica (finish with `ublk-mirror volume demote`)", args.dir.display()))?;
    let total_us = started.elapsed().as_micros() as u64;
    if args.json {
        println!("{}", serde_json::json!({ "switched_over": switched, "demoted": report, "total_us": total_us }));
        return Ok(());
    }
    println!(
        "switched over at LSN {}: the new primary is the volume in {} on the replica's host (generation {})",
        switched.branch_lsn, switched.to, switched.generation
    );
    println!("  writes were held {:.1} ms; writes sent meanwhile failed (EIO): unmount or stop the application first", switched.held_us as f64 / 1000.0);
    println!("  this volume is now its replica in {} (run `ublk-mirror applier run --dir {}`)", report.replica_dir.display(), args.applier.display());
    println!("  on the replica's host: ublk-mirror run --dir {} --ublk (or --nbd ADDR); it mirrors back as {}", switched.to, args.name);
    println!("new primary's certificate fingerprint:");
    println!("{}", switched.fingerprint);
    Ok(())
}
