//! Malformed and out-of-range NBD traffic from a hand-made client: clear errors or a closed
//! connection, never a panic, and nothing written.

mod common;
use common::nbd_client::*;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn closed(stream: &mut UnixStream) -> bool {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    // EOF or a reset: the server closed. A timeout is not a close.
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn malformed_and_out_of_range_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    create_volume(&dir, "vol0", "8M", &["--journal-size", "8M"]);
    let served = Served::start(&dir, &[]);
    let socket = served.socket.clone();

    // Negotiation: unknown export is refused and the client may try again.
    let mut stream = UnixStream::connect(&socket).unwrap();
    greeting(&mut stream).unwrap();
    send_option(&mut stream, 7, &go_payload("other")).unwrap();
    let (kind, message) = read_option_reply(&mut stream).unwrap();
    assert_eq!(kind, 0x8000_0006, "NBD_REP_ERR_UNKNOWN");
    assert!(String::from_utf8_lossy(&message).contains("unknown export"));
    // Truncated GO payload: NBD_REP_ERR_INVALID.
    send_option(&mut stream, 7, &[0, 0, 0, 9, b'v']).unwrap();
    assert_eq!(read_option_reply(&mut stream).unwrap().0, 0x8000_0003);
    // Unsupported option (structured replies): NBD_REP_ERR_UNSUP.
    send_option(&mut stream, 8, &[]).unwrap();
    assert_eq!(read_option_reply(&mut stream).unwrap().0, 0x8000_0001);
    // LIST names the export.
    send_option(&mut stream, 3, &[]).unwrap();
    let (kind, data) = read_option_reply(&mut stream).unwrap();
    assert_eq!(kind, 2);
    assert_eq!(&data[4..], b"vol0");
    assert_eq!(read_option_reply(&mut stream).unwrap().0, 1);
    // A huge option length closes the connection.
    stream.write_all(b"IHAVEOPT").unwrap();
    stream.write_all(&7u32.to_be_bytes()).unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(closed(&mut stream));

    // Garbage instead of the option magic closes the connection.
    let mut stream = UnixStream::connect(&socket).unwrap();
    greeting(&mut stream).unwrap();
    stream.write_all(&[0xde; 64]).unwrap();
    assert!(closed(&mut stream));
    // Unknown client flags close the connection.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).unwrap();
    stream.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(closed(&mut stream));
    // A client that hangs up mid-handshake is fine too.
    drop(UnixStream::connect(&socket).unwrap());

    // Transmission: out-of-range requests get errors, nothing is journaled.
    let mut client = NbdClient::connect(&socket, "vol0").unwrap();
    assert_eq!(client.size, 8 << 20);
    let size = client.size;
    assert_eq!(client.call(CMD_READ, 0, size, 512, &[]).error, 22, "read past the end: EINVAL");
    assert_eq!(client.call(CMD_READ, 0, size - 512, 1024, &[]).error, 22);
    assert_eq!(client.call(CMD_WRITE, 0, size - 512, 1024, &[1; 1024]).error, 28, "write past the end: ENOSPC");
    assert_eq!(client.call(CMD_WRITE, 0, u64::MAX - 10, 512, &[1; 512]).error, 28, "offset overflow");
    assert_eq!(client.call(CMD_TRIM, 0, size, 4096, &[]).error, 22);
    assert_eq!(client.call(CMD_WRITE_ZEROES, 0, size - 4096, 8192, &[]).error, 28);
    assert_eq!(client.call(CMD_READ, 0, 0, 0, &[]).error, 22, "empty read");
    assert_eq!(client.call(99, 0, 0, 0, &[]).error, 22, "unknown command");
    assert_eq!(client.call(CMD_WRITE, 0x8000, 0, 512, &[1; 512]).error, 22, "unknown command flag");
    // The connection still works.
    assert_eq!(client.write(0, &[9u8; 4096]), 0);
    assert_eq!(client.read(0, 4096), vec![9u8; 4096]);
    let status = status_json(&dir);
    assert_eq!(status["volume"]["last_lsn"], 1, "only the valid write was journaled");

    // A bad request magic closes the connection; a write already sent completes first.
    client.send(CMD_WRITE, 0, 4096, 4096, &[5u8; 4096]);
    client.stream.write_all(&[0xab; 28]).unwrap();
    let reply = client.receive().unwrap();
    assert_eq!(reply.error, 0);
    assert!(closed(&mut client.stream));

    // A write longer than the advertised maximum closes the connection unread.
    let mut client = NbdClient::connect(&socket, "vol0").unwrap();
    client.send(CMD_WRITE, 0, 0, 64 << 20, &[]);
    assert!(closed(&mut client.stream));

    // A write whose payload never fully arrives is not journaled.
    let mut client = NbdClient::connect(&socket, "vol0").unwrap();
    client.send(CMD_WRITE, 0, 8192, 4096, &[7u8; 100]);
    drop(client);

    // The server is alive and nothing else was written.
    let mut client = NbdClient::connect(&socket, "vol0").unwrap();
    assert_eq!(client.read(4096, 4096), vec![5u8; 4096]);
    assert_eq!(client.read(8192, 4096), vec![0u8; 4096]);
    client.disconnect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let status = status_json(&dir);
    assert_eq!(status["volume"]["last_lsn"], 2, "{status}");
    let log = served.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("bad request magic") && log.contains("unknown export"), "errors are logged: {log}");
}
