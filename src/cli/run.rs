//! `run`: serves a volume (NBD exports and/or /dev/ublkbN) and replicates it to its mirrors
//! until SIGTERM or SIGINT, then drains, flushes and exits 0. Settings come from the
//! volume's `[run]` table; flags replace them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use ublk_mirror::address::{parse_listen_address, NbdAddress};
use ublk_mirror::frontend::nbd::{NbdServer, NbdTls, TlsMode};
use ublk_mirror::frontend::ublk::{self, UblkOptions, UblkServer};
use ublk_mirror::journal::OnFull;
use ublk_mirror::layout::VolumeDir;
use ublk_mirror::mirror::{self, Senders};
use ublk_mirror::status::{self, Status};
use ublk_mirror::volume::{Volume, VolumeConfig};
use ublk_mirror::{control, daemon, metrics};

#[derive(Args)]
pub struct RunArgs {
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
    /// (1..64; default 1, or run.queues). With --recover the device keeps its own; a value
    /// given then must match it.
    #[arg(long, requires = "ublk")]
    queues: Option<u16>,
    /// Requests in flight per queue (1..4096; default 128, or run.depth). With --recover the
    /// device keeps its own; a value given then must match it.
    #[arg(long, requires = "ublk")]
    depth: Option<u16>,
    /// Re-attach to the ublk device left behind by a server of this volume that was killed
    /// (user recovery): I/O the kernel held meanwhile is re-issued, a mounted filesystem sees
    /// no error. The device, its queues and depth come from DIR/ublk-device.json and the
    /// kernel; --ublk-id, if given, must name the same device. If recovery cannot complete,
    /// the error says where the device stands (`ublk-mirror ublk delete --id N` gives it up).
    #[arg(long, requires = "ublk")]
    recover: bool,
    /// NBD over TLS (NBD_OPT_STARTTLS, TLS 1.3) on the TCP exports, with the credentials in
    /// DIR laid out as QEMU's tls-creds-x509: server-cert.pem, server-key.pem and, to require
    /// client certificates signed by it, ca-cert.pem (default: run.nbd_tls_creds). Unix socket
    /// exports stay plaintext (they are private to the volume's owner).
    #[arg(long, value_name = "DIR")]
    nbd_tls_creds: Option<PathBuf>,
    /// require (the default with --nbd-tls-creds: every option before STARTTLS is refused
    /// with NBD_REP_ERR_TLS_REQD) or off (no TLS, e.g. to override run.nbd_tls_creds).
    #[arg(long, value_name = "MODE")]
    nbd_tls: Option<TlsMode>,
    /// Allow a TCP export on a non-loopback address without TLS: anyone who can reach the
    /// port then reads and writes the whole disk, unencrypted (default: run.nbd_insecure).
    #[arg(long)]
    nbd_insecure: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9420 (default:
    /// run.metrics in DIR/volume.toml).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// The `switchover` control request: on success the volume is fenced and `run` stops
/// itself (a moment later, so the answer goes out first).
fn switchover(volume: &Volume, senders: &Senders, body: &str) -> serde_json::Value {
    let request: mirror::SwitchoverRequest = match serde_json::from_str(body) {
        Ok(request) => request,
        Err(error) => return serde_json::json!({ "error": format!("bad switchover request: {error}") }),
    };
    match mirror::switchover(volume, senders, &request) {
        Ok(switched) => {
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
            });
            serde_json::to_value(switched).unwrap_or_default()
        }
        Err(error) => serde_json::json!({ "error": format!("{error}") }),
    }
}

/// The NBD TLS credentials to serve with (loaded and checked now, before anything starts), and
/// the refusal of a non-loopback TCP export without TLS unless told it is wanted.
fn nbd_tls(args: &RunArgs, settings: &ublk_mirror::volume::config::RunConfig, addresses: &[NbdAddress]) -> Result<Option<NbdTls>> {
    let mode = match (args.nbd_tls, settings.nbd_tls.as_deref()) {
        (Some(mode), _) => mode,
        (None, Some(text)) => text.parse::<TlsMode>().map_err(anyhow::Error::msg)?,
        (None, None) => TlsMode::Require,
    };
    let creds = args.nbd_tls_creds.clone().or_else(|| settings.nbd_tls_creds.clone());
    let tls = match (mode, creds) {
        (TlsMode::Off, _) => None,
        (TlsMode::Require, None) if args.nbd_tls == Some(TlsMode::Require) => bail!("--nbd-tls require needs --nbd-tls-creds DIR (or run.nbd_tls_creds)"),
        (TlsMode::Require, None) => None,
        (TlsMode::Require, Some(dir)) => Some(NbdTls::load(&dir).with_context(|| format!("NBD TLS credentials in {}", dir.display()))?),
    };
    if tls.is_none() && !(args.nbd_insecure || settings.nbd_insecure) {
        if let Some(open) = addresses.iter().find(|a| matches!(a, NbdAddress::Tcp(_)) && !a.is_local()) {
            bail!(
                "refusing to serve {open} without TLS: it is not a loopback address, and anyone who can reach the port would read and write the whole disk, unencrypted. Give --nbd-tls-creds DIR, listen on 127.0.0.1 or a unix: socket, or pass --nbd-insecure if the network is trusted"
            );
        }
    }
    Ok(tls)
}

pub fn execute(args: RunArgs) -> Result<()> {
    if args.ublk {
        ublk::require_root()?;
    }
    // The volume's file first: a bad [run] table must be reported before anything starts.
    let layout = VolumeDir::new(&args.dir);
    let config = VolumeConfig::load(&layout).with_context(|| format!("open volume {}", args.dir.display()))?;
    let settings = config.run.clone();
    // So are the mirrors' files; each mirror's saved checkpoint is its journal hold.
    let holds = mirror::holds(&layout, config.size)?;
    let config_file = layout.config();
    // Exports: the command line's --nbd/--ublk, if any, replace the configured ones.
    let (nbd, use_ublk) = if args.nbd.is_empty() && !args.ublk { (settings.nbd.clone(), settings.ublk) } else { (args.nbd.clone(), args.ublk) };
    if nbd.is_empty() && !use_ublk {
        bail!(
            "nothing to serve: give --ublk and/or at least one --nbd unix:PATH or --nbd tcp:HOST:PORT, or set run.ublk / run.nbd in {}",
            config_file.display()
        );
    }
    let addresses = nbd.iter().map(|a| a.parse::<NbdAddress>()).collect::<Result<Vec<_>, _>>()?;
    let tls = nbd_tls(&args, &settings, &addresses)?;
    let from_file = !args.ublk;
    let ublk_options = UblkOptions {
        id: args.ublk_id.or(if from_file { settings.ublk_id } else { None }),
        queues: args.queues.or(if from_file { settings.queues } else { None }),
        depth: args.depth.or(if from_file { settings.depth } else { None }),
        recover: args.recover,
    };
    let metrics_address = match args.metrics {
        Some(address) => Some(address),
        None => settings.metrics.as_deref().map(parse_listen_address).transpose()?,
    };
    if use_ublk {
        // Before opening the volume: a missing driver must change nothing.
        ublk::preflight(&ublk_options)?;
    }
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]).context("install signal handlers")?;
    let volume = Arc::new(Volume::open(&args.dir, holds).with_context(|| format!("open volume {}", args.dir.display()))?);
    let name = volume.config().name.clone();
    let server = NbdServer::start(&addresses, volume.clone(), &name, tls)?;
    let mut exports: Vec<String> = server.bound_addresses().iter().map(|a| a.to_string()).collect();
    let ublk_server = if use_ublk {
        let started = UblkServer::start(volume.clone(), &ublk_options).context("start ublk device")?;
        // The device path alone on a line, for scripts.
        println!("{}", started.record().device);
        exports.push(format!("ublk:{}", started.record().device));
        Some(started)
    } else {
        None
    };
    let device = ublk_server.as_ref().map(|s| s.record().device.clone());
    let senders = Arc::new(Senders::start(volume.clone()).context("start mirrors")?);
    let live_status: Arc<dyn Fn() -> Status + Send + Sync> = {
        let (volume, exports, device, senders) = (volume.clone(), exports.clone(), device.clone(), senders.clone());
        Arc::new(move || status::live(&volume, &exports, device.clone(), senders.statuses()))
    };
    let control = {
        let (live_status, senders, control_volume) = (live_status.clone(), senders.clone(), volume.clone());
        control::ControlServer::start(
            &layout.control_socket(),
            Arc::new(move |command: &str| -> control::Reply {
                if command.starts_with("marker") {
                    if senders.count() == 0 {
                        let error = format!(
                            "volume {} has no mirrors: a marker would mark nothing (add one with `ublk-mirror mirror add`)",
                            control_volume.config().name
                        );
                        return serde_json::json!({ "error": error }).into();
                    }
                    if let Some(reply) = ublk_mirror::volume::markers::control_request(&control_volume, command) {
                        return reply;
                    }
                }
                if let Some(body) = command.strip_prefix("switchover ") {
                    return control::Reply::Done(switchover(&control_volume, &senders, body));
                }
                control::Reply::Done(match command {
                    "status" => serde_json::to_value(live_status()).unwrap_or_default(),
                    "reload-mirrors" => match senders.reload() {
                        Ok(reloaded) => serde_json::json!({ "reloaded": true, "started": reloaded.started, "updated": reloaded.updated }),
                        Err(error) => serde_json::json!({ "error": format!("{error:#}") }),
                    },
                    request if request.starts_with("verify-mirror ") => {
                        let mut words = request["verify-mirror ".len()..].split(' ');
                        let name = words.next().unwrap_or_default();
                        let repair = match words.next() {
                            None => Ok(false),
                            Some("repair") => Ok(true),
                            Some(other) => Err(format!("unknown verify option {other:?}")),
                        };
                        match repair.and_then(|repair| senders.verify(name, repair).map_err(|error| format!("{error:#}"))) {
                            Ok(id) => serde_json::json!({ "verify": id }),
                            Err(error) => serde_json::json!({ "error": error }),
                        }
                    }
                    request if request.starts_with("remove-mirror ") => match senders.remove(&request["remove-mirror ".len()..]) {
                        Ok(()) => serde_json::json!({ "removed": &request["remove-mirror ".len()..] }),
                        Err(error) => serde_json::json!({ "error": format!("{error:#}") }),
                    },
                    request if request.starts_with("set-on-full ") => match request["set-on-full ".len()..].parse::<OnFull>() {
                        Ok(policy) => match control_volume.set_on_full(policy) {
                            Ok(()) => serde_json::json!({ "on_full": policy.as_str() }),
                            Err(error) => serde_json::json!({ "error": format!("{error:#}") }),
                        },
                        Err(error) => serde_json::json!({ "error": error }),
                    },
                    other => serde_json::json!({ "error": format!("unknown request {other:?}") }),
                })
            }),
        )
        .context("start control socket")?
    };
    let metrics = match metrics_address {
        Some(address) => {
            let (live_status, volume) = (live_status.clone(), volume.clone());
            Some(metrics::MetricsServer::start(address, Arc::new(move || metrics::render_volume(&live_status(), volume.latency())))?)
        }
        None => None,
    };
    let scheduler = {
        let senders = senders.clone();
        ublk_mirror::volume::markers::MarkerScheduler::start(volume.clone(), move || senders.count() > 0)
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
    drop(scheduler);
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
