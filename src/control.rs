//! The control socket `VDIR/control.sock` of a running `run`: one request line in, one JSON
//! line out. Requests: `status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub type Handler = Arc<dyn Fn(&str) -> serde_json::Value + Send + Sync>;

pub struct ControlServer {
    path: PathBuf,
    /// The listening socket, shut down to wake the accepting thread when stopping.
    listener: UnixListener,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path`; the caller holds the volume lock, so a file already there is stale.
    pub fn start(path: &Path, handler: Handler) -> std::io::Result<ControlServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let accepting = listener.try_clone()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new().name("control".into()).spawn(move || {
            for stream in accepting.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let handler = handler.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &handler);
                });
            }
        })?;
        Ok(ControlServer { path: path.to_path_buf(), listener, stopping, thread: Some(thread) })
    }
}

fn answer(stream: UnixStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line)?;
    let reply = handler(line.trim());
    let mut stream = stream;
    writeln!(stream, "{reply}")
}

use std::io::Read;

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Shutting the listener down makes a blocked accept fail at once (Linux); connecting
        // to the path would not reach it if the file was removed or replaced meanwhile.
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::ReadWrite);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to the control socket at `path` and returns the parsed reply.
pub fn request(path: &Path, command: &str) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{command}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
