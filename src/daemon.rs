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
