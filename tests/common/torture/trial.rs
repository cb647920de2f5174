//! One seeded trial: random distinguishable writes with FLUSHes through NBD (queue depth 1),
//! faults at random moments, and the checks after each fault and at the end.

use super::faults::{Kind, TrialStats, APPLIER_DISK, SOURCE_DISK};
use super::model::{Fate, History, BLOCK};
use super::rng::Rng;
use super::site::{Env, Site, BLOCKS, JOURNAL_BYTES, VOLUME};
use crate::common::nbd_client::*;
use crate::common::relay::Impairment;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FLAG_FUA_BIT: u16 = 1;
const POWER_CUT: &str = "journal-power-cut-before-commit";

/// What a trial will do, drawn from its seed before anything starts.
#[derive(Debug)]
pub struct Plan {
    pub writes: u64,
    /// (before write number, fault), in order.
    pub events: Vec<(u64, Kind)>,
    pub loss: Option<f64>,
}

pub fn plan(rng: &mut Rng, kinds: &[Kind]) -> Plan {
    let writes = rng.range(150, 350);
    let pickable: Vec<Kind> = kinds.iter().copied().filter(|&k| k != Kind::Loss).collect();
    let mut events = Vec::new();
    if !pickable.is_empty() {
        for _ in 0..rng.range(1, 4) {
            events.push((rng.range(10, writes - 10), *rng.pick(&pickable)));
        }
    }
    events.sort();
    let loss = (kinds.contains(&Kind::Loss) && (pickable.is_empty() || rng.chance(0.3))).then(|| rng.range(1, 8) as f64 / 100.0);
    Plan { writes, events, loss }
}

/// A fault that lasts: ended at the first write >= `until` once `not_before` has passed.
struct Ongoing {
    kind: Kind,
    until: u64,
    not_before: Instant,
    file: Option<PathBuf>,
}

struct Trial<'a> {
    rng: Rng,
    site: Site,
    history: History,
    client: Option<NbdClient>,
    stats: &'a Mutex<TrialStats>,
    ongoing: Vec<Ongoing>,
    /// The initial synchronisation finished (the replica is consistent from then on).
    synced: bool,
}

/// Runs trial `seed` in `root` (an empty directory); Err is the one-line reason it failed.
pub fn run(seed: u64, kinds: &[Kind], root: &Path, stats: &Mutex<TrialStats>) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let plan = plan(&mut rng, kinds);
    let planned = |k: Kind| plan.events.iter().any(|&(_, e)| e == k);
    let mut source_env: Env = Vec::new();
    let mut points = Vec::new();
    if planned(Kind::PowerCut) {
        points.push(format!("{POWER_CUT}={}", root.join(POWER_CUT).display()));
    }
    if planned(Kind::DiskSource) {
        points.extend(SOURCE_DISK.iter().map(|(name, _)| format!("{name}=while:{}", root.join(name).display())));
    }
    if !points.is_empty() {
        source_env.push(("UBLK_MIRROR_FAILPOINTS".into(), points.join(",")));
    }
    let mut applier_env: Env = Vec::new();
    if planned(Kind::DiskApplier) {
        let points: Vec<String> = APPLIER_DISK.iter().map(|name| format!("{name}=while:{}", root.join(name).display())).collect();
        applier_env.push(("UBLK_MIRROR_FAILPOINTS".into(), points.join(",")));
    }
    let impairment = Impairment { loss: plan.loss.unwrap_or(0.0), ..Impairment::clean() };
    // 1 to 7 % of the packets, both directions, the whole trial.
    if plan.loss.is_some() {
        stats.lock().unwrap().fault(Kind::Loss.name());
    }
    stats.lock().unwrap().step = "setting up".into();
    let started = Instant::now();
    let site = Site::new(root, impairment, seed, source_env, applier_env)?;
    stats.lock().unwrap().phase("setup", started);
    let started = Instant::now();
    let mut trial = Trial { rng, site, history: History::new(seed, BLOCKS), client: None, stats, ongoing: Vec::new(), synced: false };
    let mut events = plan.events.iter().peekable();
    for i in 0..plan.writes {
        while let Some(&(_, kind)) = events.next_if(|&&(at, _)| at <= i) {
            if !trial.synced {
                trial.step("waiting for the initial synchronisation");
                trial.site.wait_mirror(Duration::from_secs(30), "the initial synchronisation", |m| m["consistent"] == true)?;
                trial.synced = true;
            }
            trial.step(&format!("{} before write {i}", kind.name()));
            trial.inject(kind, i)?;
        }
        trial.end_due(i, false)?;
        trial.random_write()?;
        trial.maybe_flush_or_read()?;
    }
    trial.end_due(u64::MAX, true)?;
    stats.lock().unwrap().phase("workload and faults", started);
    trial.finish()
}

impl Trial<'_> {
    fn step(&self, what: &str) {
        self.stats.lock().unwrap().step = what.to_string();
    }

    fn count_fault(&self, label: &str) {
        self.stats.lock().unwrap().fault(label);
    }

    fn count_check(&self, label: &str) {
        self.stats.lock().unwrap().check(label);
    }

    fn client(&mut self) -> Result<&mut NbdClient, String> {
        if self.client.is_none() {
            let client = NbdClient::connect(&self.site.socket(), VOLUME).map_err(|e| format!("NBD negotiation refused ({e})"))?;
            client.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            self.client = Some(client);
        }
        Ok(self.client.as_mut().unwrap())
    }

    /// Sends one write of `count` stamped blocks from block `first` and waits for its
    /// reply: Some(errno), or None if the connection broke (the fate stays unknown).
    fn write(&mut self, first: u64, count: u64, flags: u16) -> Result<Option<u32>, String> {
        let seq = self.history.push(first, count);
        let data: Vec<u8> = (first..first + count).flat_map(|b| super::model::stamp(self.history.trial, seq, b)).collect();
        self.stats.lock().unwrap().writes += 1;
        let client = self.client()?;
        let reply = match client.try_send(CMD_WRITE, flags, first * BLOCK as u64, data.len() as u32, &data) {
            Ok(_) => client.receive().ok(),
            Err(_) => None,
        };
        let Some(reply) = reply else {
            self.client = None;
            return Ok(None);
        };
        if reply.error == 0 {
            self.history.set_fate(seq, Fate::Acked);
            if flags & FLAG_FUA_BIT != 0 {
                self.history.flushed_through(seq);
            }
        }
        Ok(Some(reply.error))
    }

    /// A FLUSH: Some(errno) or None if the connection broke.
    fn flush(&mut self) -> Result<Option<u32>, String> {
        let last = self.history.next_seq() - 1;
        let client = self.client()?;
        let reply = match client.try_send(CMD_FLUSH, 0, 0, 0, &[]) {
            Ok(_) => client.receive().ok(),
            Err(_) => None,
        };
        let Some(reply) = reply else {
            self.client = None;
            return Ok(None);
        };
        if reply.error == 0 {
            self.history.flushed_through(last);
            self.stats.lock().unwrap().flushes += 1;
        }
        Ok(Some(reply.error))
    }

    /// Where the next write goes: half of them into a hot 1 MiB so that blocks are
    /// overwritten often (an old version showing through is then detectable).
    fn pick_extent(&mut self, most: u64) -> (u64, u64) {
        let count = if most >= 8 && self.rng.chance(0.1) { self.rng.range(8, most + 1) } else { self.rng.range(1, most.min(4) + 1) };
        let span = if self.rng.chance(0.5) { 256 } else { BLOCKS };
        (self.rng.range(0, span - count + 1), count)
    }

    /// A write that must succeed (no disk fault on the source is active).
    fn random_write(&mut self) -> Result<(), String> {
        let (first, count) = self.pick_extent(16);
        let flags = if self.rng.chance(0.03) { FLAG_FUA_BIT } else { 0 };
        let seq = self.history.next_seq();
        match self.write(first, count, flags)? {
            Some(0) => Ok(()),
            Some(errno) => Err(format!("write {seq} failed with errno {errno}, no source fault active")),
            None => Err(format!("the source went away during write {seq}: {}", last_line(&self.site.source_log()))),
        }
    }

    fn maybe_flush_or_read(&mut self) -> Result<(), String> {
        if self.rng.chance(1.0 / 12.0) {
            match self.flush()? {
                Some(0) => {}
                other => return Err(format!("FLUSH failed ({other:?}), no source fault active")),
            }
        }
        if self.rng.chance(0.05) && !self.history.epoch_has_unknown() {
            // Read back a recent write's blocks: they must be exactly what was acknowledged.
            let recent = self.history.writes.len().saturating_sub(self.rng.range(1, 20) as usize);
            let (first, count) = {
                let w = &self.history.writes[recent.max(self.history.epoch_start as usize - 1).min(self.history.writes.len() - 1)];
                (w.first, w.count)
            };
            let expected = self.history.expected();
            let data = self.client()?.call(CMD_READ, 0, first * BLOCK as u64, (count as usize * BLOCK) as u32, &[]);
            if data.error != 0 {
                return Err(format!("read of blocks {first}+{count} failed with errno {}", data.error));
            }
            for (i, b) in (first..first + count).enumerate() {
                let got = super::model::identify(self.history.trial, b, &data.data[i * BLOCK..(i + 1) * BLOCK])?;
                if got != expected[b as usize] {
                    return Err(format!("read-after-write: block {b} reads as write {got}, expected {}", expected[b as usize]));
                }
            }
            self.count_check("read-after-write");
        }
        Ok(())
    }

    /// The whole source device read over NBD.
    fn read_source(&mut self) -> Result<Vec<u8>, String> {
        let client = self.client()?;
        let mut image = Vec::with_capacity(BLOCKS as usize * BLOCK);
        let chunk = 256 << 10;
        for offset in (0..BLOCKS * BLOCK as u64).step_by(chunk) {
            let reply = client.call(CMD_READ, 0, offset, chunk as u32, &[]);
            if reply.error != 0 {
                return Err(format!("source read at {offset} failed with errno {}", reply.error));
            }
            image.extend_from_slice(&reply.data);
        }
        Ok(image)
    }

    /// After the source died: restart it and check that it holds a prefix state with every
    /// flushed write (the history then continues from what it holds).
    fn restart_source_and_check(&mut self, label: &str) -> Result<(), String> {
        self.client = None;
        self.step(&format!("restarting the source after {label}"));
        self.site.start_source();
        let image = self.read_source()?;
        let acked: Vec<u64> = self.history.writes[self.history.epoch_start as usize - 1..].iter().filter(|w| w.fate == Fate::Acked).map(|w| w.seq).collect();
        self.history.recover_source(&image, 0).map_err(|e| format!("after {label}: {e}"))?;
        let lost = acked.iter().filter(|&&s| self.history.writes[s as usize - 1].fate == Fate::Lost).count() as u64;
        self.stats.lock().unwrap().lost_acked += lost;
        self.count_check("source-after-crash");
        Ok(())
    }

    fn check_replica_of_killed_applier(&mut self, label: &str) -> Result<(), String> {
        let image = self.site.recovered_replica()?;
        self.history.check_replica(&image).map_err(|e| format!("{label}: {e}"))?;
        self.count_check("replica-prefix");
        Ok(())
    }

    fn lasting(&mut self, kind: Kind, at: u64, writes: (u64, u64), millis: (u64, u64), file: Option<PathBuf>) {
        let until = at + self.rng.range(writes.0, writes.1);
        let not_before = Instant::now() + Duration::from_millis(self.rng.range(millis.0, millis.1));
        self.ongoing.push(Ongoing { kind, until, not_before, file });
    }

    fn inject(&mut self, kind: Kind, at: u64) -> Result<(), String> {
        match kind {
            Kind::KillSource => {
                // Half the time with a write in flight: its fate is unknown.
                if self.rng.chance(0.5) {
                    let (first, count) = self.pick_extent(16);
                    let seq = self.history.push(first, count);
                    let data: Vec<u8> = (first..first + count).flat_map(|b| super::model::stamp(self.history.trial, seq, b)).collect();
                    let _ = self.client()?.try_send(CMD_WRITE, 0, first * BLOCK as u64, data.len() as u32, &data);
                }
                self.site.kill_source();
                self.count_fault(kind.name());
                self.restart_source_and_check("kill -9 of the source")
            }
            Kind::PowerCut => self.power_cut(),
            Kind::KillApplier => {
                if self.site.applier.is_none() {
                    return Ok(());
                }
                self.site.kill_applier();
                self.count_fault(kind.name());
                self.check_replica_of_killed_applier("replica after kill -9 of the applier")?;
                self.lasting(kind, at, (0, 60), (0, 800), None);
                Ok(())
            }
            Kind::Partition => {
                self.site.relay.partition(true);
                self.count_fault(kind.name());
                self.lasting(kind, at, (10, 150), (50, 1500), None);
                Ok(())
            }
            Kind::Overflow => self.overflow(),
            Kind::DiskSource => self.disk_source(),
            Kind::DiskApplier => {
                let name = *self.rng.pick(&APPLIER_DISK);
                let file = self.site.root.join(name);
                std::fs::write(&file, b"").map_err(|e| e.to_string())?;
                self.count_fault(&format!("{} ({name})", kind.name()));
                self.lasting(kind, at, (20, 120), (200, 1500), Some(file));
                Ok(())
            }
            Kind::Loss => Ok(()),
        }
    }

    /// Ends the lasting faults that are due (all of them, after waiting out their minimum
    /// time, if `all`).
    fn end_due(&mut self, i: u64, all: bool) -> Result<(), String> {
        let now = Instant::now();
        let (due, rest): (Vec<Ongoing>, Vec<Ongoing>) =
            std::mem::take(&mut self.ongoing).into_iter().partition(|o| all || (o.until <= i && o.not_before <= now));
        self.ongoing = rest;
        for fault in due {
            std::thread::sleep(fault.not_before.saturating_duration_since(Instant::now()));
            self.step(&format!("ending {}", fault.kind.name()));
            match fault.kind {
                Kind::KillApplier if self.site.applier.is_none() => self.site.start_applier(),
                Kind::Partition => self.site.relay.partition(false),
                Kind::DiskApplier => {
                    // Seen by the applier if a batch reached it meanwhile (not if the link was
                    // down or the source between reconnects): counted, not required.
                    if self.site.applier.is_some() {
                        let output = crate::common::cli(&["applier", "status", "--dir", self.site.adir.to_str().unwrap(), "--json"]);
                        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
                        if status["replicas"][0]["disk_error"].is_string() {
                            self.count_check("applier-disk-error-shown");
                        }
                    }
                    // Nothing the applier wrote while failing may have torn the replica.
                    let killed = self.site.applier.is_some() && self.rng.chance(0.5);
                    if killed {
                        self.site.kill_applier();
                        self.check_replica_of_killed_applier("replica after a disk fault on the applier")?;
                    }
                    // Two overlapping faults may share a file: the last to end repairs.
                    let shared = self.ongoing.iter().any(|o| o.file == fault.file);
                    if let (Some(file), false) = (&fault.file, shared) {
                        match std::fs::remove_file(file) {
                            // (Already removed by an overlapping fault ending in the same batch.)
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("remove {}: {e}", file.display())),
                            _ => {}
                        }
                    }
                    if killed {
                        self.site.start_applier();
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn power_cut(&mut self) -> Result<(), String> {
        let trigger = self.site.root.join(POWER_CUT);
        std::fs::write(&trigger, b"").map_err(|e| e.to_string())?;
        self.count_fault(Kind::PowerCut.name());
        // The cut happens at the next journal commit: keep writing until the source dies.
        let started = Instant::now();
        let mut died = false;
        for _ in 0..64 {
            let (first, count) = self.pick_extent(16);
            match self.write(first, count, 0)? {
                Some(0) => {}
                Some(errno) => return Err(format!("write failed with errno {errno} while waiting for the power cut")),
                None => {
                    died = true;
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        if !died {
            return Err("the power-cut failpoint did not fire within 64 writes".into());
        }
        self.site.wait_source_exit(Duration::from_secs(10))?;
        if !self.site.source_log().contains("simulating a power cut") {
            return Err(format!("the source died without the power cut: {}", last_line(&self.site.source_log())));
        }
        std::fs::remove_file(&trigger).map_err(|e| e.to_string())?;
        self.restart_source_and_check("a power cut")
    }

    /// A partition while more than the journal holds is written: the mirror must switch to
    /// tracking (writes never wait), then resync back once the link heals.
    fn overflow(&mut self) -> Result<(), String> {
        self.site.relay.partition(true);
        self.count_fault(Kind::Overflow.name());
        let mut written = 0u64;
        let mut tracking = false;
        while written < 4 * JOURNAL_BYTES {
            let first = self.rng.range(0, BLOCKS - 16 + 1);
            let seq = self.history.next_seq();
            match self.write(first, 16, 0)? {
                Some(0) => {}
                other => return Err(format!("write {seq} during the overflow failed ({other:?})")),
            }
            written += 16 * BLOCK as u64;
            if written.is_multiple_of(16 * 16 * BLOCK as u64) {
                match self.flush()? {
                    Some(0) => {}
                    other => return Err(format!("FLUSH during the overflow failed ({other:?})")),
                }
                if written >= JOURNAL_BYTES && self.site.status()?["mirrors"][0]["state"] == "tracking" {
                    tracking = true;
                    break;
                }
            }
        }
        if !tracking {
            let status = self.site.status()?;
            return Err(format!(
                "{written} bytes written into a {JOURNAL_BYTES}-byte journal during a partition and no tracking: {}",
                super::site::compact(&status["mirrors"][0])
            ));
        }
        self.count_check("overflow-to-tracking");
        self.site.relay.partition(false);
        Ok(())
    }

    /// An EIO/ENOSPC failpoint on the source: the request hitting it fails with its errno,
    /// later ones with EIO, status says failed; after the fault is gone a restart recovers.
    fn disk_source(&mut self) -> Result<(), String> {
        let (name, errno) = *self.rng.pick(&SOURCE_DISK);
        // Nothing unsynced before the fault: the background journal sync (every 10 ms, when
        // records wait) would otherwise hit a sync fault before our request does, fail the
        // volume, and our request get EIO (seed 20014 in CI).
        if self.flush()? != Some(0) {
            return Err(format!("{name}: the flush before the fault failed"));
        }
        let file = self.site.root.join(name);
        std::fs::write(&file, b"").map_err(|e| e.to_string())?;
        // A sync fault is hit by a FUA write's own sync, not by a background sync between a
        // plain write and its FLUSH.
        let flags = if name.starts_with("journal-sync") { FLAG_FUA_BIT } else { 0 };
        self.count_fault(&format!("{} ({name})", Kind::DiskSource.name()));
        let mut first_error = None;
        // A write-back error shows only once the (lower-priority, asynchronous) writeback
        // thread applies a record while the file exists, which can take longer than many fast
        // writes (seed 20132: 64 writes, each FLUSHed, all succeeded first): flush often and
        // bound the wait by time, not count.
        let started = Instant::now();
        let mut attempts = 0;
        while started.elapsed() < Duration::from_secs(5) && attempts < 2000 {
            attempts += 1;
            let (first, count) = self.pick_extent(4);
            let result = match self.write(first, count, flags)? {
                Some(0) => self.flush()?,
                other => other,
            };
            match result {
                Some(0) => {}
                Some(e) => {
                    first_error = Some(e);
                    break;
                }
                None => return Err(format!("the source died on {name}: {}", last_line(&self.site.source_log()))),
            }
            if name.starts_with("backing") {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let Some(first_error) = first_error else {
            return Err(format!("{name}: {attempts} writes and flushes in {:?} succeeded while the fault was present", started.elapsed()));
        };
        if first_error != errno {
            return Err(format!("{name}: the request that hit it failed with errno {first_error}, expected {errno}"));
        }
        let (first, count) = self.pick_extent(4);
        match self.write(first, count, 0)? {
            Some(5) => {}
            other => return Err(format!("{name}: a write after the error got {other:?}, expected EIO (5)")),
        }
        let status = self.site.status()?;
        let volume = &status["volume"];
        if volume["mode"] != "failed" {
            return Err(format!("{name}: volume mode {} after the error, expected failed", volume["mode"]));
        }
        let reason = ["failure", "reason"].iter().find_map(|k| volume[k].as_str().filter(|s| !s.is_empty()).map(str::to_string));
        if reason.is_none() {
            return Err(format!("{name}: the failed volume's status gives no reason: {volume}"));
        }
        self.count_check("disk-error-reported");
        std::fs::remove_file(&file).map_err(|e| e.to_string())?;
        self.site.kill_source();
        self.restart_source_and_check(name)
    }

    /// Heals everything, then: the source holds exactly every acknowledged write, the mirror
    /// converges, the replica equals the source byte for byte, the source stops cleanly on
    /// SIGTERM and no log holds a panic.
    fn finish(&mut self) -> Result<(), String> {
        self.step("final checks");
        self.site.relay.partition(false);
        if self.site.applier.is_none() {
            self.site.start_applier();
        }
        match self.flush()? {
            Some(0) => {}
            other => return Err(format!("the final FLUSH failed ({other:?})")),
        }
        let source = self.read_source()?;
        let last = self.history.next_seq() - 1;
        self.history.recover_source(&source, last).map_err(|e| format!("final source check: {e}"))?;
        self.count_check("source-final");
        self.step("waiting for convergence");
        let started = Instant::now();
        self.site.wait_converged(Duration::from_secs(60))?;
        self.stats.lock().unwrap().phase("convergence", started);
        let started = Instant::now();
        self.count_check("converged");
        let replica = self.site.replica_bytes()?;
        if replica != source {
            let why = self.history.check_replica(&replica).err().unwrap_or_else(|| "a prefix state, but behind".into());
            let differing = (0..BLOCKS as usize).filter(|&b| replica[b * BLOCK..(b + 1) * BLOCK] != source[b * BLOCK..(b + 1) * BLOCK]).count();
            return Err(format!("replica differs from the source after convergence in {differing} blocks ({why})"));
        }
        self.count_check("replica-equal");
        if let Some(client) = self.client.take() {
            client.disconnect();
        }
        self.site.stop_source()?;
        self.count_check("clean-stop");
        self.stats.lock().unwrap().phase("final compare and stop", started);
        for (what, log) in [("source", self.site.source_log()), ("applier", self.site.applier_log())] {
            if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
                return Err(format!("the {what} log holds a panic: {line}"));
            }
        }
        self.count_check("no-panic");
        Ok(())
    }
}

fn last_line(log: &str) -> String {
    log.lines().last().unwrap_or("(empty log)").chars().take(300).collect()
}
