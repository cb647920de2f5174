//! The control socket of a running `run` (`VDIR/control.sock`) or `applier run`
//! (`ADIR/control.sock`): one request line in, one JSON line out. A request may instead open a
//! short conversation ([`Reply::Continue`]): its answer is followed by one more line, which
//! must come within a deadline (a marker's write hold ends when its caller goes away).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// Answers the line that follows a [`Reply::Continue`].
pub type FollowUp = Box<dyn FnOnce(Option<&str>) -> serde_json::Value + Send>;

/// What the handler answers to a request line.
pub enum Reply {
    Done(serde_json::Value),
    /// Send `answer`, then read one more line within `deadline` and answer it with `then`
    /// (`None`: the client closed, sent nothing in time, or sent more than a line can hold).
    Continue {
        answer: serde_json::Value,
        deadline: Duration,
        then: FollowUp,
    },
}

impl From<serde_json::Value> for Reply {
    fn from(value: serde_json::Value) -> Reply {
        Reply::Done(value)
    }
}

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
        // Whoever can connect can drive the volume (markers, switchover): root only. The
        // directory (0700) already keeps others out between bind and this.
        crate::permissions::make_private(path)?;
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

/// A request line's limit: a group marker's payload names every member.
const MAX_LINE: u64 = 64 * 1024;

fn answer(stream: UnixStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    (&mut reader).take(MAX_LINE).read_line(&mut line)?;
    let mut writer = &stream;
    match handler(line.trim()) {
        Reply::Done(reply) => writeln!(writer, "{reply}"),
        Reply::Continue { answer, deadline, then } => {
            if let Err(error) = writeln!(writer, "{answer}") {
                then(None);
                return Err(error);
            }
            stream.set_read_timeout(Some(deadline.max(Duration::from_millis(1))))?;
            let mut next = String::new();
            let got = matches!((&mut reader).take(MAX_LINE).read_line(&mut next), Ok(n) if n > 0 && next.ends_with('\n'));
            let reply = then(got.then_some(next.trim()));
            writeln!(writer, "{reply}")
        }
    }
}

use std::io::Read;

/// A conversation with a control socket: requests sent one after the other on one connection
/// (the steps of a [`Reply::Continue`]).
pub struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Session {
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Session> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Session { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Sends one line and reads the answer.
    pub fn request(&mut self, line: &str) -> std::io::Result<serde_json::Value> {
        writeln!(self.writer, "{line}")?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        serde_json::from_str(&answer).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

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
