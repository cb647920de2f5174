//! The sweep workload (tests/tracking.rs, tests/coalescing.rs): writes whose every prefix
//! leaves a recognisable device state, so a replica can be checked to be a prefix state of
//! the source's history (never torn), and the replica image as the applier recovers it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::nbd_client::*;
use super::{replica_dir, replica_image};

pub const BLOCK: usize = 4096;

/// The sweep workload: pass after pass, blocks `0..blocks` are written in order, each
/// holding its pass and index. Any state of the device after a prefix of the writes reads
/// as blocks `0..=j` of pass p and the rest of pass p - 1; a state that is not a prefix of
/// the history (torn) breaks that shape. A FLUSH ends every 64 writes; the last flushed
/// (pass, index) is published. Stops after `limit` writes or when `stop` is set.
pub fn sweep(socket: PathBuf, blocks: u64, limit: u64, stop: Arc<AtomicBool>, flushed: Arc<AtomicU64>) -> std::thread::JoinHandle<(u64, Duration)> {
    std::thread::spawn(move || {
        let mut client = NbdClient::connect(&socket, "vol0").expect("connect");
        let mut worst = Duration::ZERO;
        let mut written = 0u64;
        while written < limit && !stop.load(Ordering::SeqCst) {
            let (pass, index) = (written / blocks + 1, written % blocks);
            let started = Instant::now();
            // A server killed by the test ends the writer quietly.
            let acked = client.try_send(CMD_WRITE, 0, index * BLOCK as u64, BLOCK as u32, &sweep_block(pass, index)).is_ok()
                && client.receive().is_ok_and(|reply| reply.error == 0);
            worst = worst.max(started.elapsed());
            if !acked {
                break;
            }
            written += 1;
            if written.is_multiple_of(64) {
                if client.try_send(CMD_FLUSH, 0, 0, 0, &[]).is_err() || !client.receive().is_ok_and(|reply| reply.error == 0) {
                    break;
                }
                flushed.store(written, Ordering::SeqCst);
            }
        }
        (written, worst)
    })
}

pub fn sweep_block(pass: u64, index: u64) -> Vec<u8> {
    let mut block = vec![(pass % 251) as u8; BLOCK];
    block[..8].copy_from_slice(&pass.to_le_bytes());
    block[8..16].copy_from_slice(&index.to_le_bytes());
    block
}

/// The sweep state of an image: the number of writes it reflects, or why it is no prefix.
pub fn sweep_state(image: &[u8], blocks: u64) -> Result<u64, String> {
    let mut passes = Vec::with_capacity(blocks as usize);
    for index in 0..blocks {
        let block = &image[index as usize * BLOCK..(index as usize + 1) * BLOCK];
        if block.iter().all(|&b| b == 0) {
            passes.push(0);
            continue;
        }
        let pass = u64::from_le_bytes(block[..8].try_into().unwrap());
        if block != sweep_block(pass, index).as_slice() {
            return Err(format!("block {index} is not any write of the sweep"));
        }
        passes.push(pass);
    }
    let top = passes[0];
    let edge = passes.iter().position(|&p| p != top).unwrap_or(blocks as usize);
    if passes[edge..].iter().any(|&p| p + 1 != top) {
        return Err(format!(
            "blocks 0..{edge} are of pass {top}, but later ones are not all of pass {}: {:?}",
            top.saturating_sub(1),
            &passes[edge..edge + 8.min(passes.len() - edge)]
        ));
    }
    Ok(top.saturating_sub(1) * blocks + edge as u64)
}

/// The replica image as the applier would recover it (its journal redone), then read.
pub fn recovered_replica(adir: &Path) -> Vec<u8> {
    let replica = ublk_mirror::applier::replica::Replica::open(&replica_dir(adir, "vol0")).expect("open the replica as the applier would");
    assert!(replica.state().is_consistent(), "the replica is consistent after recovery");
    drop(replica);
    std::fs::read(replica_image(adir, "vol0")).unwrap()
}
