//! Property tests of what an NBD client sends (the handshake's options, the transmission
//! phase's requests), driven through in-memory readers against a read-only export whose reads
//! panic outside the device: no byte stream panics, and a request beyond the export's size
//! is answered with an error, never served.

use std::io::Cursor;
use std::sync::{mpsc, Arc};

use proptest::prelude::*;

use super::super::negotiation::negotiate;
use super::*;
use crate::store::ReadView;

/// A device of `size` zero bytes that refuses (by panicking) any read outside it.
struct Zeros {
    size: u64,
}

impl ReadView for Zeros {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).expect("read extent overflows");
        assert!(end <= self.size, "read of {} bytes at {offset} served beyond the {}-byte export", buf.len(), self.size);
        buf.fill(0);
        Ok(())
    }
}

fn export(size: u64) -> Export {
    Export::ReadOnly(Arc::new(Zeros { size }))
}

#[derive(Debug, Clone)]
struct Request {
    magic_ok: bool,
    flags: u16,
    command: u16,
    offset: u64,
    length: u32,
}

fn request(size: u64) -> impl Strategy<Value = Request> {
    let command = prop_oneof![Just(CMD_READ), Just(CMD_WRITE), Just(CMD_FLUSH), Just(CMD_TRIM), Just(CMD_WRITE_ZEROES), Just(CMD_DISC), any::<u16>()];
    let offset = prop_oneof![0..size + 8192, Just(size), Just(u64::MAX), (u64::MAX - 8192..=u64::MAX), any::<u64>()];
    let length = prop_oneof![0u32..10_000, Just(0), any::<u32>()];
    (prop_oneof![9 => Just(true), 1 => Just(false)], prop_oneof![Just(0u16), Just(CMD_FLAG_FUA), any::<u16>()], command, offset, length)
        .prop_map(|(magic_ok, flags, command, offset, length)| Request { magic_ok, flags, command, offset, length })
}

/// The request stream, cookie = index; a write carries its payload when it is small.
fn encode(requests: &[Request]) -> Vec<u8> {
    let mut stream = Vec::new();
    for (cookie, r) in requests.iter().enumerate() {
        let magic = if r.magic_ok { REQUEST_MAGIC } else { REQUEST_MAGIC ^ 1 };
        let header = RequestHeader { magic, flags: r.flags, command: r.command, cookie: cookie as u64, offset: r.offset, length: r.length };
        stream.extend_from_slice(&header.encode());
        if r.command == CMD_WRITE && r.length <= 64 << 10 {
            stream.resize(stream.len() + r.length as usize, 0xa5);
        }
    }
    stream
}

/// Runs the transmission phase over `stream`; the replies, by cookie.
fn serve(stream: &[u8], volume: &Export) -> Vec<Reply> {
    let (tx, rx) = mpsc::channel();
    let _ = read_requests(&mut Cursor::new(stream), volume, &tx);
    drop(tx);
    rx.into_iter().collect()
}

proptest! {
    #[test]
    fn request_headers_round_trip(bytes in any::<[u8; REQUEST_HEADER_SIZE]>()) {
        prop_assert_eq!(RequestHeader::decode(&bytes).encode(), bytes);
    }

    #[test]
    fn info_requests_parse_within_their_data(data in proptest::collection::vec(any::<u8>(), 0..64), name in "\\PC{0,8}", types in proptest::collection::vec(any::<u16>(), 0..4)) {
        if let Some((name, types)) = parse_info_request(&data) {
            prop_assert!(4 + name.len() + 2 + 2 * types.len() == data.len());
        }
        let mut built = (name.len() as u32).to_be_bytes().to_vec();
        built.extend_from_slice(name.as_bytes());
        built.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in &types {
            built.extend_from_slice(&t.to_be_bytes());
        }
        prop_assert_eq!(parse_info_request(&built), Some((name, types)));
    }

    #[test]
    fn arbitrary_request_streams_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..400), size in 0u64..1 << 20) {
        serve(&stream, &export(size));
    }

    #[test]
    fn requests_beyond_the_export_are_refused(size in prop_oneof![0u64..1 << 20, Just(0)], requests in proptest::collection::vec(request(1 << 20), 0..12)) {
        let volume = export(size);
        for reply in serve(&encode(&requests), &volume) {
            let request = &requests[reply.cookie as usize];
            let in_range = Extent::new(request.offset, request.length as u64).fits(size);
            if reply.error == 0 {
                prop_assert!(in_range || request.command == CMD_FLUSH, "{:?} beyond a {}-byte export succeeded", request, size);
            }
            if let Some(data) = &reply.data {
                prop_assert_eq!(request.command, CMD_READ);
                prop_assert_eq!(data.len(), request.length as usize);
            }
        }
    }

    #[test]
    fn option_haggling_of_arbitrary_bytes_never_panics(
        flags in prop_oneof![Just(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES), any::<u32>()],
        options in proptest::collection::vec((prop_oneof![Just(OPT_GO), Just(OPT_INFO), Just(OPT_LIST), Just(OPT_ABORT), Just(OPT_EXPORT_NAME), any::<u32>()], proptest::collection::vec(any::<u8>(), 0..40), prop_oneof![9 => Just(None), 1 => any::<u32>().prop_map(Some)]), 0..6),
        garbage in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut stream = flags.to_be_bytes().to_vec();
        for (option, data, claimed) in &options {
            stream.extend_from_slice(&IHAVEOPT.to_be_bytes());
            stream.extend_from_slice(&option.to_be_bytes());
            stream.extend_from_slice(&claimed.unwrap_or(data.len() as u32).to_be_bytes());
            stream.extend_from_slice(data);
        }
        stream.extend_from_slice(&garbage);
        let mut replies = Vec::new();
        let _ = negotiate(&mut Cursor::new(&stream), &mut replies, &export(1 << 20), "vol");
        prop_assert!(replies.len() <= 18 + stream.len() + 200 * (options.len() + 1), "{} bytes of replies", replies.len());
        let _ = negotiate(&mut Cursor::new(&garbage), &mut Vec::new(), &export(0), "vol");
    }
}
