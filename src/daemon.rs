//! Service-manager integration: sd_notify (READY=1, STOPPING=1, STATUS=...) when started by
//! systemd with `Type=notify`; a no-op otherwise.

use std::os::unix::net::UnixDatagram;

/// Sends `message` to the socket named by `$NOTIFY_SOCKET`, if any. Errors are logged, not fatal.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &address)?;
        } else {
            socket.send_to(message.as_bytes(), std::path::Path::new(&path))?;
        }
        Ok(())
    })();
    if let Err(error) = result {
        tracing::warn!(%error, "sd_notify failed");
    }
}

/// Sends `STATUS=<line>` every few seconds while started by systemd (what `systemctl status`
/// shows under the unit). Stops when dropped.
pub struct StatusReporter {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl StatusReporter {
    pub fn start(line: impl Fn() -> String + Send + 'static) -> StatusReporter {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return StatusReporter { stop: None, thread: None };
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sd-status".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(STATUS_INTERVAL) {
                    notify(&format!("STATUS={}", line()));
                }
            })
            .ok();
        StatusReporter { stop: Some(stop), thread }
    }
}

impl Drop for StatusReporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
