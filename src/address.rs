//! Addresses as administrators write them in files and flags: where to listen (IP:PORT),
//! where a peer is (HOST:PORT), and where an NBD export listens (unix:PATH or tcp:HOST:PORT).
//! Parsing only; nothing here opens a socket.

use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("invalid NBD address {0:?}: use unix:PATH or tcp:HOST:PORT")]
    Export(String),
    #[error("{0:?} is not an address to listen on (IP:PORT, e.g. 127.0.0.1:9420 or [::1]:9420)")]
    Listen(String),
    #[error("{0:?} must be HOST:PORT")]
    HostPort(String),
}

/// A HOST:PORT to listen on (an IP address, not a name: listening must not depend on DNS).
pub fn parse_listen_address(text: &str) -> Result<std::net::SocketAddr, AddressError> {
    text.parse().map_err(|_| AddressError::Listen(text.to_string()))
}

/// Checks a peer address, HOST:PORT (HOST may be a name, resolved when connecting).
pub fn check_host_port(text: &str) -> Result<(), AddressError> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(AddressError::HostPort(text.to_string())),
    }
}

/// Where an NBD export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for NbdAddress {
    type Err = AddressError;
    fn from_str(text: &str) -> Result<Self, AddressError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddressError::Export(text.into()));
            }
            return Ok(NbdAddress::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:") {
            if check_host_port(address).is_err() {
                return Err(AddressError::Export(text.into()));
            }
            return Ok(NbdAddress::Tcp(address.to_string()));
        }
        Err(AddressError::Export(text.into()))
    }
}

impl NbdAddress {
    /// True for a Unix socket or a TCP address that resolves only to loopback addresses
    /// (what an unauthenticated, unencrypted export may listen on without being told to).
    pub fn is_local(&self) -> bool {
        match self {
            NbdAddress::Unix(_) => true,
            NbdAddress::Tcp(address) => {
                use std::net::ToSocketAddrs;
                match address.to_socket_addrs() {
                    Ok(resolved) => {
                        let resolved: Vec<_> = resolved.collect();
                        !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback())
                    }
                    Err(_) => false,
                }
            }
        }
    }
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            NbdAddress::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_refusals() {
        assert_eq!("unix:/run/x.sock".parse::<NbdAddress>().unwrap(), NbdAddress::Unix("/run/x.sock".into()));
        assert_eq!("tcp:127.0.0.1:10809".parse::<NbdAddress>().unwrap().to_string(), "tcp:127.0.0.1:10809");
        for bad in ["unix:", "tcp:host", "tcp::1", "tcp:h:99999", "/run/x.sock"] {
            assert!(bad.parse::<NbdAddress>().is_err(), "{bad}");
        }
        assert!(parse_listen_address("localhost:1").is_err(), "names are not listen addresses");
        parse_listen_address("[::1]:9420").unwrap();
        check_host_port("replica-host:7420").unwrap();
        assert!(check_host_port("replica-host").is_err());
    }
}
