//! Helpers shared by the integration tests: run the real binary, talk NBD to it.
#![allow(dead_code)]

pub mod nbd_client;
pub mod pair;
pub mod relay;
pub mod sweep;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ublk-mirror")
}

/// Runs the binary to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run ublk-mirror")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails the test loudly when an external tool the test needs is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "this test needs `{tool}`: install it with `apt-get install -y {package}` (.ci/run does)");
}

pub fn create_volume(dir: &Path, name: &str, size: &str, extra: &[&str]) -> String {
    let mut args = vec!["volume", "create", "--dir", dir.to_str().unwrap(), "--name", name, "--size", size];
    args.extend_from_slice(extra);
    let output = cli(&args);
    assert!(output.status.success(), "volume create failed: {}", stderr(&output));
    stdout(&output)
}

/// A `ublk-mirror run` process serving NBD on a Unix socket; killed (SIGKILL) when dropped.
pub struct Served {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Served {
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Served {
        Served::start_with_args(dir, &[], env)
    }

    /// Like `start`, with more arguments for `run` (e.g. --metrics).
    pub fn start_with_args(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let socket = dir.with_extension("sock");
        let log = dir.with_extension(format!("log.{}", std::process::id()));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut command = Command::new(bin());
        command.args(["run", "--dir", dir.to_str().unwrap(), "--nbd", &format!("unix:{}", socket.display())]).args(args).stdout(Stdio::null()).stderr(log_file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start ublk-mirror run");
        let mut served = Served { child, socket, dir: dir.to_path_buf(), log };
        served.wait_ready();
        served
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("run exited early ({status}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if self.dir.join("control.sock").exists() && std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("run did not become ready: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        unsafe_kill(self.child.id(), libc_sigterm());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("run did not stop within 60 s after SIGTERM");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn libc_sigterm() -> &'static str {
    "TERM"
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn status_json(dir: &Path) -> serde_json::Value {
    let output = cli(&["status", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "status failed: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("status --json prints JSON")
}

pub fn qemu_io<S: AsRef<str>>(uri: &str, commands: &[S]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw", uri]);
    for c in commands {
        command.args(["-c", c.as_ref()]);
    }
    command.output().expect("run qemu-io")
}

pub fn fingerprint_line(output: &str) -> String {
    output.lines().find(|l| l.starts_with("sha256:")).expect("fingerprint line").to_string()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Applier {
    pub child: Child,
}

impl Applier {
    pub fn start(dir: &Path, port: u16) -> Applier {
        Applier::start_with_env(dir, port, &[])
    }

    /// Like `start`, with environment variables (e.g. UBLK_MIRROR_FAILPOINTS).
    pub fn start_with_env(dir: &Path, port: u16, env: &[(&str, &str)]) -> Applier {
        Applier::start_with_args(dir, port, &[], env)
    }

    /// Like `start_with_env`, with more arguments for `applier run` (e.g. --metrics).
    pub fn start_with_args(dir: &Path, port: u16, args: &[&str], env: &[(&str, &str)]) -> Applier {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
        let _ = std::fs::remove_file(dir.join("control.sock"));
        let mut child = Command::new(bin())
            .args(["applier", "run", "--dir", dir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("control.sock").exists() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("applier did not start ({exited:?}); its log, newest first:\n{}", tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Applier { child }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn applier_status(dir: &Path) -> serde_json::Value {
    let output = cli(&["applier", "status", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The directory of the one replica of volume `name` in the applier directory `adir`:
/// `replicas/SOURCE/NAME` (or `replicas/NAME` while it is not bound to a source yet). Waits
/// (bounded) for the source's first connection to make it; panics if there is none then, or
/// several (sources sharing the name: use `replica_dirs`).
pub fn replica_dir(adir: &Path, name: &str) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = replica_dirs(adir, name);
    while found.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        found = replica_dirs(adir, name);
    }
    assert_eq!(found.len(), 1, "replicas of {name} in {}: {found:?}", adir.display());
    found.remove(0)
}

/// Every replica directory of volume `name` in `adir` (any source).
pub fn replica_dirs(adir: &Path, name: &str) -> Vec<PathBuf> {
    let replicas = adir.join("replicas");
    let flat = replicas.join(name);
    let mut found: Vec<PathBuf> = if flat.join("replica.json").exists() { vec![flat] } else { Vec::new() };
    for entry in std::fs::read_dir(&replicas).into_iter().flatten().flatten() {
        let candidate = entry.path().join(name);
        if candidate.join("replica.json").exists() {
            found.push(candidate);
        }
    }
    found.sort();
    found
}

/// The image of the one replica of volume `name` (`replica_dir`/data.img).
pub fn replica_image(adir: &Path, name: &str) -> PathBuf {
    replica_dir(adir, name).join("data.img")
}

pub fn compare(a: &str, b: &str) -> bool {
    let output = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]).output().unwrap();
    output.status.success()
}

/// Waits (bounded) until the mirror's initial synchronisation is complete.
pub fn wait_consistent(volume: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while status_json(volume)["mirrors"][0]["consistent"] != true {
        assert!(Instant::now() < deadline, "mirror never became consistent: {}", status_json(volume));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until the mirror has applied everything the volume journaled.
pub fn wait_caught_up(volume: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = status_json(volume);
        let last = status["volume"]["last_lsn"].as_u64().unwrap();
        let mirror = &status["mirrors"][0];
        if mirror["applied_lsn"].as_u64() == Some(last) && mirror["connected"] == true && mirror["consistent"] == true && last > 0 {
            return status;
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(volume.parent().unwrap().join("applier.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            panic!("mirror did not catch up: {status}\napplier log (last lines, newest first):\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET /metrics, parsed by a real Prometheus text parser.
pub fn scrape(address: SocketAddr) -> prometheus_parse::Scrape {
    let text = scrape_text(address);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("the metrics page parses")
}

/// GET /metrics: the page's text.
pub fn scrape_text(address: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of `name` whose labels include all of `labels`.
pub fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name} is not a plain value: {other:?}"),
    }
}

/// A filesystem of its own (a loop device on a sparse file, mkfs'd and mounted), for tests
/// that need a particular filesystem (XFS with reflink, ext4) or a small one that fills up.
/// Unmounted and detached when dropped. Needs root and loop devices; fails loudly otherwise.
pub struct LoopFs {
    pub mount: PathBuf,
    device: String,
    image: PathBuf,
}

impl LoopFs {
    /// `kind` is "ext4", "xfs" (with reflink) or "tmpfs" (no loop device; `size` bytes).
    pub fn new(base: &Path, kind: &str, size: u64) -> LoopFs {
        let mount = base.join(format!("{kind}-mount"));
        std::fs::create_dir_all(&mount).unwrap();
        if kind == "tmpfs" {
            let status =
                Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs", mount.to_str().unwrap()]).status().unwrap();
            assert!(status.success(), "mount tmpfs at {} (needs root)", mount.display());
            return LoopFs { mount, device: String::new(), image: PathBuf::new() };
        }
        let image = base.join(format!("{kind}.fs"));
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(size).unwrap();
        let output = Command::new("losetup").args(["-f", "--show", image.to_str().unwrap()]).output().expect("losetup (util-linux)");
        assert!(output.status.success(), "losetup failed (needs root and /dev/loop*): {}", String::from_utf8_lossy(&output.stderr));
        let device = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let mkfs = match kind {
            "xfs" => {
                require_tool("mkfs.xfs", "xfsprogs");
                Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1", &device]).output().unwrap()
            }
            _ => Command::new("mkfs.ext4").args(["-q", "-F", &device]).output().unwrap(),
        };
        assert!(mkfs.status.success(), "mkfs {kind}: {}", String::from_utf8_lossy(&mkfs.stderr));
        let status = Command::new("mount").args([&device, mount.to_str().unwrap()]).status().unwrap();
        assert!(status.success(), "mount {device} at {}", mount.display());
        LoopFs { mount, device, image }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.mount).status().map(|s| s.success()).unwrap_or(false) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.device.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.device]).status();
            let _ = std::fs::remove_file(&self.image);
        }
    }
}
