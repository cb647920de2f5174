//! A minimal NBD client for tests: fixed newstyle + NBD_OPT_GO, pipelined requests, and raw
//! access to the socket for sending malformed bytes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub struct NbdClient {
    pub stream: UnixStream,
    pub size: u64,
    next_cookie: u64,
    /// Read lengths of outstanding read requests, by cookie.
    reads: HashMap<u64, u32>,
}

#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

pub fn greeting(stream: &mut UnixStream) -> std::io::Result<()> {
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello)?;
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    stream.write_all(&3u32.to_be_bytes()) // fixed newstyle + no zeroes
}

pub fn send_option(stream: &mut UnixStream, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut bytes = b"IHAVEOPT".to_vec();
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    stream.write_all(&bytes)
}

/// Reads one option reply: (reply type, data).
pub fn read_option_reply(stream: &mut UnixStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head)?;
    assert_eq!(u64::from_be_bytes(head[0..8].try_into().unwrap()), 0x0003_e889_0455_65a9);
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let length = u32::from_be_bytes(head[16..20].try_into().unwrap());
    let mut data = vec![0u8; length as usize];
    stream.read_exact(&mut data)?;
    Ok((kind, data))
}

pub fn go_payload(export: &str) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

impl NbdClient {
    /// Connects and negotiates `export` with NBD_OPT_GO; Err(reply type) if refused.
    pub fn connect(socket: &Path, export: &str) -> Result<NbdClient, u32> {
        let mut stream = UnixStream::connect(socket).expect("connect NBD socket");
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        greeting(&mut stream).unwrap();
        send_option(&mut stream, 7, &go_payload(export)).unwrap();
        let mut size = None;
        loop {
            let (kind, data) = read_option_reply(&mut stream).unwrap();
            match kind {
                1 => break,
                3 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == 0 {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    }
                }
                error => return Err(error),
            }
        }
        Ok(NbdClient { stream, size: size.expect("export info"), next_cookie: 1, reads: HashMap::new() })
    }

    /// Sends a request without waiting; returns its cookie.
    pub fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> u64 {
        self.try_send(command, flags, offset, length, data).expect("send NBD request")
    }

    /// Like `send`, but a dead server is an error, not a panic (crash tests).
    pub fn try_send(&mut self, command: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> std::io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut bytes = Vec::with_capacity(28 + data.len());
        bytes.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(data);
        self.stream.write_all(&bytes)?;
        if command == CMD_READ {
            self.reads.insert(cookie, length);
        }
        Ok(cookie)
    }

    /// Receives the next reply (any order).
    pub fn receive(&mut self) -> std::io::Result<Reply> {
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head)?;
        assert_eq!(u32::from_be_bytes(head[0..4].try_into().unwrap()), 0x6744_6698, "simple reply magic");
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let mut data = Vec::new();
        if let Some(length) = self.reads.remove(&cookie) {
            if error == 0 {
                data = vec![0u8; length as usize];
                self.stream.read_exact(&mut data)?;
            }
        }
        Ok(Reply { cookie, error, data })
    }

    pub fn call(&mut self, command: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> Reply {
        let cookie = self.send(command, flags, offset, length, data);
        let reply = self.receive().expect("reply");
        assert_eq!(reply.cookie, cookie);
        reply
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data).error
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let reply = self.call(CMD_READ, 0, offset, length, &[]);
        assert_eq!(reply.error, 0, "read at {offset} failed");
        reply.data
    }

    pub fn flush(&mut self) -> u32 {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).error
    }

    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}
