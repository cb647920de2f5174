//! One trial's processes: a source volume served over NBD, mirrored through the seeded relay
//! to an applier. Every wait is bounded and returns an error (with the state it saw) rather
//! than panicking, so a failing trial reports one line and the campaign goes on.

use crate::common::relay::{Impairment, Relay};
use crate::common::*;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const VOLUME: &str = "vol0";
/// 16 MiB: small enough to read whole at every check, large enough for 4096 distinct blocks.
pub const BLOCKS: u64 = 4096;
/// The journal is small so that an outage of a few megabytes of writes overflows it.
pub const JOURNAL_BYTES: u64 = 4 << 20;

/// (trial seed, pid) of every process the running trials started, so a trial that hangs can
/// have exactly its own processes killed by the watchdog.
static PIDS: Mutex<Vec<(u64, u32)>> = Mutex::new(Vec::new());

fn register(seed: u64, pid: u32) {
    PIDS.lock().unwrap().push((seed, pid));
}

fn unregister(pid: u32) {
    PIDS.lock().unwrap().retain(|&(_, p)| p != pid);
}

/// SIGKILLs the processes trial `seed` started and still runs (by pid, nothing else).
pub fn kill_processes_of(seed: u64) {
    let pids: Vec<u32> = PIDS.lock().unwrap().iter().filter(|(s, _)| *s == seed).map(|(_, p)| *p).collect();
    for pid in pids {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
        unregister(pid);
    }
}

pub struct Site {
    pub seed: u64,
    pub root: PathBuf,
    pub vdir: PathBuf,
    pub adir: PathBuf,
    pub port: u16,
    pub source: Option<Served>,
    pub applier: Option<Applier>,
    pub relay: Relay,
    source_env: Vec<(String, String)>,
    applier_env: Vec<(String, String)>,
}

pub type Env = Vec<(String, String)>;

fn env_refs(env: &Env) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl Site {
    /// Makes the volume, the applier and the mirror and starts both ends. The initial
    /// synchronisation runs while the trial's first writes go on (the caller waits for it
    /// before the first fault: only a consistent replica must be a prefix state).
    pub fn new(root: &Path, impairment: Impairment, seed: u64, source_env: Env, applier_env: Env) -> Result<Site, String> {
        let vdir = root.join("vol");
        let adir = root.join("applier");
        let size = format!("{}M", (BLOCKS * 4096) >> 20);
        let volume_fp = fingerprint_line(&create_volume(
            &vdir,
            VOLUME,
            &size,
            &["--journal-size", &JOURNAL_BYTES.to_string(), "--segment-size", "1M", "--pending-window", "1M"],
        ));
        let output = cli(&["applier", "init", "--dir", adir.to_str().unwrap()]);
        if !output.status.success() {
            return Err(format!("applier init: {}", stderr(&output)));
        }
        let applier_fp = fingerprint_line(&stdout(&output));
        // A restarted source is refused while the applier still holds its dead connection:
        // a short idle timeout keeps that wait short.
        let toml = adir.join("applier.toml");
        let config = std::fs::read_to_string(&toml).map_err(|e| e.to_string())?;
        std::fs::write(&toml, config.replace("# idle_timeout = 15", "idle_timeout = 1")).map_err(|e| e.to_string())?;
        if !cli(&["applier", "allow", "--dir", adir.to_str().unwrap(), &volume_fp]).status.success() {
            return Err("applier allow failed".into());
        }
        let port = free_udp_port();
        let relay = Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), impairment, impairment, seed);
        let to = relay.address().to_string();
        let output = cli(&["mirror", "add", "--dir", vdir.to_str().unwrap(), "--to", &to, "--fingerprint", &applier_fp, "--idle-timeout", "1"]);
        if !output.status.success() {
            return Err(format!("mirror add: {}", stderr(&output)));
        }
        let mut site = Site { seed, root: root.to_path_buf(), vdir, adir, port, source: None, applier: None, relay, source_env, applier_env };
        site.start_applier();
        site.start_source();
        Ok(site)
    }

    pub fn start_source(&mut self) {
        let served = Served::start(&self.vdir, &env_refs(&self.source_env));
        register(self.seed, served.child.id());
        self.source = Some(served);
    }

    pub fn start_applier(&mut self) {
        let applier = Applier::start_with_env(&self.adir, self.port, &env_refs(&self.applier_env));
        register(self.seed, applier.child.id());
        self.applier = Some(applier);
    }

    pub fn kill_source(&mut self) {
        if let Some(mut served) = self.source.take() {
            unregister(served.child.id());
            served.kill9();
        }
    }

    pub fn kill_applier(&mut self) {
        if let Some(mut applier) = self.applier.take() {
            unregister(applier.child.id());
            applier.kill9();
        }
    }

    /// Waits (bounded) until the source process exits by itself (a power-cut failpoint).
    pub fn wait_source_exit(&mut self, within: Duration) -> Result<(), String> {
        let served = self.source.as_mut().ok_or("no source running")?;
        let deadline = Instant::now() + within;
        while served.child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if Instant::now() > deadline {
                return Err(format!("the source did not exit within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let served = self.source.take().unwrap();
        unregister(served.child.id());
        Ok(())
    }

    /// SIGTERM: the source must drain and exit 0.
    pub fn stop_source(&mut self) -> Result<(), String> {
        let mut served = self.source.take().ok_or("no source running")?;
        let code = served.terminate();
        unregister(served.child.id());
        match code {
            Some(0) => Ok(()),
            other => Err(format!("the source exited {other:?} on SIGTERM")),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.vdir.with_extension("sock")
    }

    pub fn source_log(&self) -> String {
        std::fs::read_to_string(self.vdir.with_extension(format!("log.{}", std::process::id()))).unwrap_or_default()
    }

    pub fn applier_log(&self) -> String {
        std::fs::read_to_string(self.adir.with_extension("log")).unwrap_or_default()
    }

    /// `status --json`, or why not.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let output = cli(&["status", "--dir", self.vdir.to_str().unwrap(), "--json"]);
        if !output.status.success() {
            return Err(format!("status failed: {}", stderr(&output).trim()));
        }
        serde_json::from_slice(&output.stdout).map_err(|e| format!("status --json: {e}"))
    }

    /// Polls the mirror's status (bounded) until `done` holds; returns the status that did.
    pub fn wait_mirror(&self, within: Duration, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status()?;
            if done(&status["mirrors"][0]) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!("timed out after {within:?} waiting for {what}: mirror {}", compact(&status["mirrors"][0])));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the replica holds everything the volume journaled: the source's mirror
    /// connected, consistent, replicating, with everything received, and the applier's own
    /// status applied through the last LSN (the source hears of `applied` only at the next
    /// checkpoint, up to a second later; the image holds the records as soon as they are
    /// applied).
    pub fn wait_converged(&self, within: Duration) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status()?;
            let last = status["volume"]["last_lsn"].as_u64().unwrap_or(0);
            let m = &status["mirrors"][0];
            if m["received_lsn"].as_u64() == Some(last) && m["connected"] == true && m["consistent"] == true && m["state"] == "replicating" {
                let output = cli(&["applier", "status", "--dir", self.adir.to_str().unwrap(), "--json"]);
                let applier: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
                let replica = &applier["replicas"][0];
                if replica["applied_lsn"].as_u64() == Some(last) && replica["consistent"] == true {
                    return Ok(status);
                }
            }
            if Instant::now() > deadline {
                let log = self.applier_log();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(format!("no convergence within {within:?}: last_lsn {last}, mirror {}; applier log tail: {}", compact(m), tail.join(" | ")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The replica as the applier would recover it on its next start (its journal redone):
    /// only call with the applier stopped.
    pub fn recovered_replica(&self) -> Result<Vec<u8>, String> {
        let dir = replica_dir(&self.adir, VOLUME);
        let replica = ublk_mirror::applier::replica::Replica::open(&dir).map_err(|e| format!("the killed applier's replica does not open: {e:#}"))?;
        if !replica.state().is_consistent() {
            return Err("the killed applier's replica is not consistent after recovery".into());
        }
        drop(replica);
        std::fs::read(dir.join("data.img")).map_err(|e| e.to_string())
    }

    pub fn replica_bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(replica_image(&self.adir, VOLUME)).map_err(|e| e.to_string())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill_source();
        self.kill_applier();
    }
}

/// The interesting fields of a mirror's status on one line.
pub fn compact(m: &serde_json::Value) -> String {
    format!(
        "state={} connected={} consistent={} applied_lsn={} received_lsn={} last_error={}",
        m["state"], m["connected"], m["consistent"], m["applied_lsn"], m["received_lsn"], m["last_error"]
    )
}
